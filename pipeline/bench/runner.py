"""The decoder benchmark as one call: load the model, run the grid of cases, write the sweep files.

``jobs/benchmark.py decoder`` maps its flags one-to-one onto :class:`DecoderBenchConfig` (``jobs/_cli.py``
reads each field's ``flag`` metadata) and prints what :func:`run_decoder_benchmark` returns.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import torch

from pipeline.bench.decoder import BenchModel, DecoderCase, run_case
from pipeline.bench.measure import DEFAULT_VARIANTS, VARIANTS, torch_threads
from pipeline.bench.presets import PRESETS, build_model, get_preset
from pipeline.bench.report import cross_project, read_csv, write_sweep
from pipeline.config import DType, flag

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWEEP_VISUAL_TOKENS = (1024, 4096, 16384)
SWEEP_BATCHES = (1, 4, 8)
SWEEP_FRAMES = (32, 64, 128, 256)


PresetName = Literal[tuple(PRESETS)]  # the names of PRESETS, in its order
Variant = Literal[VARIANTS]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class DecoderBenchConfig:
    """Everything one decoder benchmark run needs (one field per ``jobs.benchmark decoder`` flag).

    ``visual_tokens``, ``frames`` and ``batches`` default to one case (4096 tokens or 64 frames, batch 1)
    or, with ``sweep``, to the sweep's grid (SWEEP_VISUAL_TOKENS, SWEEP_FRAMES, SWEEP_BATCHES)."""

    preset: PresetName = flag("kv-bound", "random-weight model shape")
    model: str | None = flag(None, "a checkpoint directory instead of a preset (real acceptance)")
    layers: int | None = flag(None, "shrink the preset to this many layers (and a 512-token vocabulary)")
    visual_tokens: tuple[int, ...] | None = flag(
        None, "per video, synthetic inputs; None: 4096, or 1024 4096 16384 with --sweep"
    )
    frames: tuple[int, ...] | None = flag(
        None, "demo-world clip lengths (--model); None: 64, or 32 64 128 256 with --sweep"
    )
    batches: tuple[int, ...] | None = flag(None, "batch sizes; None: 1, or 1 4 8 with --sweep", name="batch")
    gamma: int = flag(9, "drafts per StD round")
    sparse_budget: int = flag(1024, "sparse budget K + m_t", name="budget")
    max_new_tokens: int = flag(64, "new tokens per row")
    repeats: int = flag(3, "interleaved repeats (medians)")
    padding: int = flag(0, "left padding of the last row (tokens)")
    dtype: DType = flag("auto", "auto: bfloat16 on CUDA, float32 on CPU")
    device: Device = flag("auto", "auto: cuda where available, else cpu")
    threads: int = flag(1, "torch CPU threads")
    variants: tuple[Variant, ...] = flag(
        DEFAULT_VARIANTS, "the decoders timed side by side (std_sink, the sink-window draft: on request)"
    )
    fixed_gammas: tuple[int, ...] = flag(
        (), "also time fixed-γ StD at these γ (variants std_g<γ>): auto_vs_best then compares with the best"
    )
    acceptance_profile: float = flag(0.62, "profile for projections", name="acceptance")
    compile: bool = flag(
        False,
        "also time every std_core variant with compiled static steps (<variant>_compiled, side by side)",
    )
    compile_backend: str = flag("inductor", "torch.compile backend of --compile (aot_eager: no C++ compiler)")
    sweep: bool = flag(False, "write <out>/decoder-*.{md,csv,png}")
    out: str = flag("bench-out", "folder for the sweep files")
    costs_from: str | None = flag(None, "a preset sweep CSV to project at this acceptance")
    seed: int = flag(0, "seed of the random weights and the synthetic inputs")
    init_std: float | None = flag(None, "preset weight init std (0.5: varied tokens)")
    name: str | None = flag(None, "sweep file name; None: decoder-<model>-<device>")
    dry_run: bool = flag(
        False, "plan only: print the cases that would run as the final JSON line; load no model"
    )

    def __post_init__(self) -> None:
        defaults = {
            "visual_tokens": SWEEP_VISUAL_TOKENS if self.sweep else (4096,),
            "frames": SWEEP_FRAMES if self.sweep else (64,),
            "batches": SWEEP_BATCHES if self.sweep else (1,),
        }
        for name, default in defaults.items():  # frozen: the documented defaults, resolved once here
            object.__setattr__(self, name, tuple(getattr(self, name) or default))
        if self.model is None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        if not 0 < self.acceptance_profile <= 1:
            raise ValueError("acceptance_profile must be in (0, 1]")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device() == "cuda" else torch.float32
        return DTYPES[self.dtype]


def load_bench_model(config: DecoderBenchConfig) -> BenchModel:
    """The preset (random weights, built on the device) or the checkpoint (with its processor)."""
    device, dtype = config.resolved_device(), config.resolved_dtype()
    if config.model is not None:
        from pipeline.models import load_model

        model, processor = load_model(config.model, str(dtype).removeprefix("torch."), device)
        return BenchModel(model, config.model, processor)
    preset = get_preset(config.preset)
    if config.layers is not None:
        preset = preset.shrink(layers=config.layers)
    longest = max(config.visual_tokens) + 256 + config.max_new_tokens  # prompt text, drafts: slack
    return BenchModel(build_model(preset, dtype, device, longest, config.seed, config.init_std), preset.name)


def cases(config: DecoderBenchConfig) -> list[DecoderCase]:
    """The grid: (visual tokens or frames) × batch, smallest first."""
    sizes = config.frames if config.model is not None else config.visual_tokens
    key = "frames" if config.model is not None else "visual_tokens"
    common = dict(
        gamma=config.gamma,
        sparse_budget=config.sparse_budget,
        max_new_tokens=config.max_new_tokens,
        repeats=config.repeats,
        padding=config.padding,
        seed=config.seed,
        variants=config.variants,
        fixed_gammas=config.fixed_gammas,
        acceptance_profile=config.acceptance_profile,
        compile=config.compile,
        compile_backend=config.compile_backend,
    )
    return [DecoderCase(batch=b, **{key: n}, **common) for n in sizes for b in config.batches]


def run_decoder_benchmark(config: DecoderBenchConfig) -> dict:
    """Run every case; with ``sweep``, write the table (markdown, CSV) and figure. Returns the summary
    (with ``dry_run``: the cases that would run, and nothing run)."""
    if config.dry_run:
        planned = [dataclasses.asdict(case) for case in cases(config)]
        return {"benchmark": "decoder", "status": "planned", "dry_run": True, "cases": planned}
    with torch_threads(config.threads):
        return _run(config)


def _run(config: DecoderBenchConfig) -> dict:
    bench = load_bench_model(config)
    started = datetime.now(timezone.utc)
    records = []
    for case in cases(config):
        log.info(
            "[decoder] %s: visual_tokens=%s frames=%s batch=%d",
            bench.label, case.visual_tokens, case.frames, case.batch,
        )  # fmt: skip
        records.append(dataclasses.asdict(run_case(bench, case)))
    summary = {
        "benchmark": "decoder",
        "status": "ok",
        "model": bench.label,
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "std_core": std_core_version(),
        "config": dataclasses.asdict(config),
        "outputs_equal": all(r["outputs_equal"] for r in records),
        "records": records,
    }
    if config.costs_from:
        summary["cross_projection"] = cross_projections(records, read_csv(config.costs_from))
    if config.sweep:
        name = config.name or f"decoder-{bench.label.strip('/').rsplit('/', 1)[-1]}-{records[0]['device']}"
        init = "" if config.init_std is None else f", init std {config.init_std}"
        first = records[0]
        title = (
            f"{bench.label}{init} ({first['dtype']}, {first['device_name']}, {config.threads} thread(s)), "
            f"γ={config.gamma}, budget={config.sparse_budget}, {config.max_new_tokens} new tokens, "
            f"std_core {summary['std_core']}"
        )
        summary["files"] = write_sweep(records, config.out, name, title)
    return summary


def std_core_version() -> str:
    """The last commit touching ``std_core`` (``+dirty`` with uncommitted changes), or "unknown"."""
    import subprocess
    from pathlib import Path

    import std_core

    root = Path(std_core.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "log", "-1", "--format=%h", "--", "std_core"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "std_core"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")  # fmt: skip


def cross_projections(records: list[dict], cost_rows: list[dict]) -> dict:
    """The step costs of ``cost_rows`` (another run's sweep) projected at the median per-draft α that
    ``records`` measured (a trained model's acceptance)."""
    alphas = [r["measured_alpha"] for r in records if r.get("measured_alpha") is not None]
    if not alphas:
        return {"error": "no measured acceptance in this run (std variant not run?)"}
    alpha = statistics.median(alphas)
    rows = []
    for row in cost_rows:
        p = cross_project(row, alpha)
        rows.append(
            {
                "model": row["model"],
                "visual_tokens": int(row["visual_tokens"]),
                "batch": int(row["batch"]),
                "projected_decode_speedup": p.decode_speedup,
                "projected_e2e_speedup": p.e2e_speedup,
                "projected_best_gamma": p.best_gamma,
                "projected_best_decode_speedup": p.best_decode_speedup,
                "break_even_alpha": p.break_even_alpha,
            }
        )
    return {"alpha": alpha, "alphas": alphas, "rows": rows}
