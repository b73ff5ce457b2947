"""Benchmarks: ``python -m jobs.benchmark decoder|pipeline|planning ...``.

    python -m jobs.benchmark decoder --preset kv-bound --visual-tokens 1024 4096 --batch 1 8
    python -m jobs.benchmark decoder --preset kv-bound --sweep --out bench-out      # 1k/4k/16k x 1/4/8
    python -m jobs.benchmark decoder --model pipeline/demo/model --frames 64 256 --batch 8 \\
        --costs-from bench-out/decoder-kv-bound-cpu.csv                             # measured acceptance
    python -m jobs.benchmark decoder --preset qwen2-vl-7b --visual-tokens 16384 65536 --batch 1 8  # GPU
    python -m jobs.benchmark pipeline --videos 16 --num-frames 32
    python -m jobs.benchmark planning --items 1000000 --limit 4                     # the driver at scale
    python -m jobs.benchmark prefix-memory --questions 10 50 --num-frames 128       # shared prefix layouts

The flags of each subcommand are the fields of its config (``DecoderBenchConfig``,
``PipelineBenchConfig``, ``PrefixMemoryBenchConfig``). The last stdout line is one JSON object (the records, or the pipeline
throughput summary).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: fair on a shared CPU

from jobs._cli import build_command_parser, config_from_args, exit_process, run_main  # noqa: E402
from pipeline.bench.pipeline_bench import PipelineBenchConfig, run_pipeline_benchmark  # noqa: E402
from pipeline.bench.planning import PlanningBenchConfig, run_planning_benchmark  # noqa: E402
from pipeline.bench.prefix_memory import PrefixMemoryBenchConfig, run_prefix_memory_benchmark  # noqa: E402
from pipeline.bench.runner import DecoderBenchConfig, run_decoder_benchmark  # noqa: E402

COMMANDS = {  # subcommand: (its config, its help)
    "decoder": (DecoderBenchConfig, "StD against dense and plain generate, side by side"),
    "pipeline": (PipelineBenchConfig, "decode stage, annotate stage and end-to-end throughput"),
    "planning": (PlanningBenchConfig, "the driver's planning time and memory on large inputs"),
    "prefix-memory": (
        PrefixMemoryBenchConfig,
        "shared prefill: the prefix copied per question vs stored once",
    ),
}
RUNS = {
    "decoder": run_decoder_benchmark,
    "pipeline": run_pipeline_benchmark,
    "planning": run_planning_benchmark,
    "prefix-memory": run_prefix_memory_benchmark,
}


def build_parser() -> argparse.ArgumentParser:
    return build_command_parser("python -m jobs.benchmark", __doc__.splitlines()[0], COMMANDS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config_cls, _ = COMMANDS[args.command]
    return run_main(lambda: RUNS[args.command](config_from_args(config_cls, args)), args.log_level)


if __name__ == "__main__":
    exit_process(main())
