"""Benchmarks: ``python -m jobs.benchmark decoder ...`` and ``python -m jobs.benchmark pipeline ...``.

    python -m jobs.benchmark decoder --preset kv-bound --visual-tokens 1024 4096 --batch 1 8
    python -m jobs.benchmark decoder --preset kv-bound --sweep --out bench-out      # 1k/4k/16k x 1/4/8
    python -m jobs.benchmark decoder --model pipeline/demo_model --frames 64 256 --batch 8 \\
        --costs-from bench-out/decoder-kv-bound-cpu.csv                             # measured acceptance
    python -m jobs.benchmark decoder --preset qwen2-vl-7b --visual-tokens 16384 65536 --batch 1 8  # GPU
    python -m jobs.benchmark pipeline --videos 16 --num-frames 32

The last stdout line is one JSON object (the records, or the pipeline throughput summary).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: fair on a shared CPU

from jobs._cli import run_main  # noqa: E402
from pipeline.bench.measure import VARIANTS  # noqa: E402
from pipeline.bench.pipeline_bench import PipelineBenchConfig, run_pipeline_benchmark  # noqa: E402
from pipeline.bench.presets import PRESETS  # noqa: E402
from pipeline.bench.runner import (  # noqa: E402
    SWEEP_BATCHES,
    SWEEP_FRAMES,
    SWEEP_VISUAL_TOKENS,
    DecoderBenchConfig,
    run_decoder_benchmark,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", required=True)
    _decoder_flags(sub.add_parser("decoder", help="StD against dense and plain generate, side by side"))
    _pipeline_flags(sub.add_parser("pipeline", help="decode stage, annotate stage and end-to-end throughput"))
    return parser


def _decoder_flags(p: argparse.ArgumentParser) -> None:
    d = DecoderBenchConfig()
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--preset", choices=list(PRESETS), default=d.preset, help="random-weight model shape")
    p.add_argument(
        "--model", default=None, help="a checkpoint directory instead of a preset (real acceptance)"
    )
    p.add_argument("--layers", type=int, default=None, help="shrink the preset to this many layers")
    p.add_argument("--visual-tokens", type=int, nargs="+", default=None, help="per video, synthetic inputs")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="demo-world clip lengths (--model)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes")
    p.add_argument("--gamma", type=int, default=d.gamma, help="drafts per StD round")
    p.add_argument("--budget", type=int, default=d.sparse_budget, help="sparse budget K + m_t")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats, help="interleaved repeats (medians)")
    p.add_argument("--padding", type=int, default=d.padding, help="left padding of the last row (tokens)")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(d.variants))
    p.add_argument("--acceptance", type=float, default=d.acceptance_profile, help="profile for projections")
    p.add_argument("--sweep", action="store_true", help="write <out>/decoder-*.{md,csv,png}")
    p.add_argument("--out", default=d.out, help="folder for the sweep files")
    p.add_argument("--costs-from", default=None, help="a preset sweep CSV to project at this acceptance")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init-std", type=float, default=None, help="preset weight init std (0.5: varied tokens)")
    p.add_argument("--name", default=None, help="sweep file name (default: decoder-<model>-<device>)")


def _pipeline_flags(p: argparse.ArgumentParser) -> None:
    d = PipelineBenchConfig()
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--model", default=d.model, help="model directory (default: the demo model)")
    p.add_argument("--videos", type=int, default=d.videos, help="generated demo-world videos")
    p.add_argument("--num-frames", type=int, default=d.num_frames, help="frames sampled per video")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-actors", type=int, default=d.num_actors)
    p.add_argument("--ray-cpus", type=int, default=d.ray_cpus, help="CPUs of the local Ray cluster")
    p.add_argument("--decoder", choices=["std", "dense", "auto"], default=d.decoder)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads of the in-process stages")
    p.add_argument("--out", default=d.out, help="scratch folder (videos, Parquet output)")


def decoder_config(args: argparse.Namespace) -> DecoderBenchConfig:
    sweep_default = args.sweep
    return DecoderBenchConfig(
        preset=args.preset,
        model=args.model,
        layers=args.layers,
        visual_tokens=tuple(args.visual_tokens or (SWEEP_VISUAL_TOKENS if sweep_default else (4096,))),
        frames=tuple(args.frames or (SWEEP_FRAMES if sweep_default else (64,))),
        batches=tuple(args.batch or (SWEEP_BATCHES if sweep_default else (1,))),
        gamma=args.gamma,
        sparse_budget=args.budget,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        padding=args.padding,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        variants=tuple(args.variants),
        acceptance_profile=args.acceptance,
        sweep=args.sweep,
        out=args.out,
        costs_from=args.costs_from,
        seed=args.seed,
        init_std=args.init_std,
        name=args.name,
    )


def pipeline_config(args: argparse.Namespace) -> PipelineBenchConfig:
    fields = ("model", "videos", "num_frames", "batch_size", "num_actors", "ray_cpus", "decoder")
    return PipelineBenchConfig(
        **{f: getattr(args, f) for f in fields},
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        out=args.out,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark == "decoder":
        return run_main(lambda: run_decoder_benchmark(decoder_config(args)))
    return run_main(lambda: run_pipeline_benchmark(pipeline_config(args)))


if __name__ == "__main__":
    sys.exit(main())
