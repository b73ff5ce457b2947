"""The decoder benchmark as one call: load the model, run the grid of cases, write the sweep files.

``jobs/benchmark.py decoder`` maps its flags one-to-one onto :class:`DecoderBenchConfig` and prints
what :func:`run_decoder_benchmark` returns.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from pipeline.bench.decoder import BenchModel, DecoderCase, run_case
from pipeline.bench.measure import DEFAULT_VARIANTS, torch_threads
from pipeline.bench.presets import PRESETS, build_model, get_preset
from pipeline.bench.report import cross_project, read_csv, write_sweep

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWEEP_VISUAL_TOKENS = (1024, 4096, 16384)
SWEEP_BATCHES = (1, 4, 8)
SWEEP_FRAMES = (32, 64, 128, 256)


@dataclass(frozen=True)
class DecoderBenchConfig:
    """Everything one decoder benchmark run needs (one field per ``jobs.benchmark decoder`` flag)."""

    preset: str = "kv-bound"
    model: str | None = None  # a checkpoint directory: overrides the preset, inputs become demo-world clips
    layers: int | None = None  # shrink the preset to this many layers (and a 512-token vocabulary)
    visual_tokens: tuple[int, ...] = (4096,)
    frames: tuple[int, ...] = (64,)
    batches: tuple[int, ...] = (1,)
    gamma: int = 9
    sparse_budget: int = 1024
    max_new_tokens: int = 64
    repeats: int = 3
    padding: int = 0
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 1
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    acceptance_profile: float = 0.62
    sweep: bool = False
    out: str = "bench-out"
    costs_from: str | None = None  # a preset sweep's CSV: project its step costs at this run's acceptance
    seed: int = 0
    init_std: float | None = None  # presets: weight init std (see presets.build_model)
    name: str | None = None  # sweep file name (default: decoder-<model>-<device>)

    def __post_init__(self) -> None:
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
        acceptance_profile=config.acceptance_profile,
    )
    return [DecoderCase(batch=b, **{key: n}, **common) for n in sizes for b in config.batches]


def run_decoder_benchmark(config: DecoderBenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run every case; with ``sweep``, write the table (markdown, CSV) and figure. Returns the summary."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    with torch_threads(config.threads):
        return _run(config, log)


def _run(config: DecoderBenchConfig, log: Callable[[str], None]) -> dict:
    bench = load_bench_model(config)
    started = datetime.now(timezone.utc)
    records = []
    for case in cases(config):
        log(
            f"[decoder] {bench.label}: visual_tokens={case.visual_tokens} frames={case.frames} batch={case.batch}"
        )
        records.append(dataclasses.asdict(run_case(bench, case, log)))
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
