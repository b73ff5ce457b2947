"""The decoder benchmark: every variant on the same inputs, interleaved, after a warm-up; medians.

:func:`run_case` is the whole method for one configuration (model × inputs × γ × budget):

1. build the inputs once (synthetic for presets, demo-world clips for checkpoints, whose vision
   features are computed once, timed, and shared by every variant);
2. warm up: one short call of every variant (for ``auto`` this is also its one-time step-cost
   calibration for this shape, which later calls reuse; for ``*_compiled`` variants, the compiling
   of their step buckets, reported as ``compile_s``);
3. ``repeats`` rounds; each calls every variant once, in an order rotated by one per round, so slow
   drifts of a shared machine spread over all variants;
4. once more, ``step_costs`` (what ``mode="auto"`` calibrates: fastest-of-2 forwards on fresh caches,
   rolled back), to compare auto's cost model with the step costs measured inside the runs;
5. report medians per variant (:class:`pipeline.bench.records.DecoderRecord`), whether every call of
   every variant produced the same tokens (``outputs_equal``), the measured step costs, and the
   *projected* speedup at the stated acceptance profile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from pipeline.bench.inputs import (
    SyntheticSpec,
    WorldSpec,
    encode_videos,
    fresh,
    synthetic_inputs,
    world_inputs,
)
from pipeline.bench.measure import (
    DEFAULT_VARIANTS,
    VARIANTS,
    Sample,
    compiled_variant,
    eager_of,
    fixed_gamma_of,
    fixed_variant,
    is_std_core,
    run_variant,
)
from pipeline.bench.records import DecoderRecord, build_record
from std_core import SparseToDenseDecoder, StdConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderCase:
    """One benchmark configuration. ``visual_tokens`` sizes synthetic inputs (presets); ``frames`` sizes
    demo-world clips (checkpoints); exactly one of them is > 0."""

    batch: int
    visual_tokens: int = 0
    frames: int = 0
    gamma: int = 9
    sparse_budget: int = 1024
    max_new_tokens: int = 64
    repeats: int = 3
    warmup_tokens: int = 8
    text_tokens: int = 32
    padding: int = 8
    seed: int = 0
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    fixed_gammas: tuple[int, ...] = ()  # also fixed-γ StD at these γ (variants std_g<γ>)
    acceptance_profile: float = 0.62  # projected speedups assume this accepted / drafted at γ = 9
    compile: bool = False  # also every std_core variant with compiled static steps (<variant>_compiled)
    compile_backend: str = "inductor"  # torch.compile backend of the compiled variants

    def __post_init__(self) -> None:
        if (self.visual_tokens > 0) == (self.frames > 0):
            raise ValueError("give exactly one of visual_tokens (synthetic inputs) or frames (world clips)")
        if self.repeats < 1 or self.max_new_tokens < 2 or self.batch < 1:
            raise ValueError("repeats and batch must be >= 1, max_new_tokens >= 2")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown or "dense" not in self.variants:
            raise ValueError(f"variants must include 'dense' and come from {VARIANTS}; got {self.variants}")
        if any(g < 1 for g in self.fixed_gammas):
            raise ValueError(f"fixed_gammas must be >= 1, got {self.fixed_gammas}")

    @property
    def timed_variants(self) -> tuple[str, ...]:
        """The variants, then ``std_g<γ>`` for every fixed γ other than the case's own (``std``)."""
        extra = [g for g in dict.fromkeys(self.fixed_gammas) if g != self.gamma or "std" not in self.variants]
        plain = (*self.variants, *(fixed_variant(g) for g in extra))
        compiled = tuple(compiled_variant(v) for v in plain if is_std_core(v)) if self.compile else ()
        return plain + compiled


@dataclass(frozen=True)
class BenchModel:
    """A loaded model to benchmark: ``label`` names it in records (preset name or checkpoint path);
    ``processor`` is needed for demo-world inputs only."""

    model: torch.nn.Module
    label: str
    processor: object | None = None


def run_case(bench: BenchModel, case: DecoderCase) -> DecoderRecord:
    """Benchmark ``case`` on ``bench`` (see the module docstring)."""
    inputs, vision_seconds = make_inputs(bench, case)
    decoders = make_decoders(bench.model, case)
    samples, warmups = collect_samples(bench.model, decoders, inputs, case)
    calibrated = decoders["std"].step_costs(**fresh(inputs)) if "std" in decoders else None
    return build_record(bench, case, inputs, samples, calibrated, vision_seconds, warmups)


def make_inputs(bench: BenchModel, case: DecoderCase) -> tuple[dict, float | None]:
    """The case's ``generate`` inputs (vision features precomputed), and the vision tower's seconds
    (None for synthetic inputs, which come with features)."""
    if case.visual_tokens:
        spec = SyntheticSpec(case.visual_tokens, case.batch, case.text_tokens, case.padding, case.seed)
        return synthetic_inputs(bench.model, spec), None
    if bench.processor is None:
        raise ValueError("demo-world inputs need the checkpoint's processor")
    inputs = world_inputs(bench.model, bench.processor, WorldSpec(case.frames, case.batch, case.seed))
    return encode_videos(bench.model, inputs)


def make_decoders(model: torch.nn.Module, case: DecoderCase) -> dict[str, SparseToDenseDecoder]:
    """One decoder per std_core variant, sharing the model (and ``auto``'s per-model cost cache).
    With ``case.compile`` the plain variants decode eagerly (``static_steps="off"``) and each has a
    ``_compiled`` twin."""
    common = dict(sparse_budget=case.sparse_budget)
    if case.compile:
        common["static_steps"] = "off"
    configs = {
        "std": StdConfig(gamma=case.gamma, **common),
        "std_sink": StdConfig(gamma=case.gamma, selection="sink_window", **common),
        "dense": StdConfig(mode="dense", gamma=case.gamma, **common),
        "auto": StdConfig(mode="auto", gamma=case.gamma, **common),
    }
    for variant in case.timed_variants:
        if (gamma := fixed_gamma_of(variant)) is not None:
            configs[variant] = StdConfig(gamma=gamma, **common)
    for variant in case.timed_variants:
        if variant != eager_of(variant):
            plain = configs[eager_of(variant)]
            configs[variant] = replace(plain, static_steps="compile", compile_backend=case.compile_backend)
    return {v: SparseToDenseDecoder(model, configs[v]) for v in case.timed_variants if is_std_core(v)}


def collect_samples(
    model: torch.nn.Module, decoders: dict, inputs: dict, case: DecoderCase
) -> tuple[dict[str, list[Sample]], dict[str, Sample]]:
    """Warm-up calls, then ``repeats`` interleaved rounds of every variant: samples per variant,
    and each variant's warm-up sample (where compiled variants compile)."""
    variants = list(case.timed_variants)
    warmups = {}  # kept: compiled variants compile here, and the record reports it (compile_s)
    for variant in variants:
        warmups[variant] = run_variant(
            variant, model, decoders, inputs, min(case.warmup_tokens, case.max_new_tokens)
        )
    samples: dict[str, list[Sample]] = {v: [] for v in variants}
    for r in range(case.repeats):
        for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
            sample = run_variant(variant, model, decoders, inputs, case.max_new_tokens)
            samples[variant].append(sample)
            log.info("  repeat %d/%d %-7s %8.3f s", r + 1, case.repeats, variant, sample.wall_seconds)
    return samples, warmups
