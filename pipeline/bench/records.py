"""DecoderRecord: one benchmark configuration's medians, ratios and projections, as a flat record.

Definitions (every time is the median over repeats; see :mod:`pipeline.bench.measure`):

- ``vision_ms``: the vision tower on the batch's videos, run once before the variants (checkpoints on
  demo-world clips; None for synthetic inputs, which come with features). No variant's time holds it.
- ``*_ms_per_token``: decode time / steps (steps = output positions after the first token), for
  the whole batch; ``*_e2e_ms``: the whole ``generate`` call.
- ``setup_ms``: a dense call's time outside prefill and decode (``generate``'s input preparation, the
  first token, the masks); the same for every std_core variant, in none of their decode times.
- ``decode_speedup`` = dense / std decode time; ``e2e_speedup`` = dense / std wall time. ``auto_*``
  likewise for ``mode="auto"``; ``speedup_vs_hf[_gqa]`` = plain ``generate``'s decode / std decode.
  ``fixed_gamma_ms_per_token``: ``γ:ms`` of every fixed-γ variant timed (``std`` at the case's γ and
  ``std_g<γ>``); ``best_fixed_gamma`` / ``best_fixed_ms_per_token``: the fastest of them.
  ``auto_vs_best`` = auto decode / the decode of the fastest of dense and every fixed γ (by median),
  as the median over repeats of the ratio within each repeat (the variants of a repeat run back to
  back, so a burst of load on a shared machine moves both sides); the target: ≤ 1.03.
- ``acceptance_rate`` (accepted / drafted) and ``mean_accepted_per_round`` (tokens a row commits per
  round it takes part in, bonus included) of the std run; with random weights they describe degenerate outputs, not a real model.
  ``sink_*``: the same for the ``std_sink`` variant (sink + recent-window draft, same budget), and
  ``sink_decode_speedup`` = dense / std_sink decode time.
- ``draft_share`` / ``verify_share`` / ``other_share``: the std decode time split. The bonus token is
  the verify's own argmax, so it is inside ``verify``; ``other`` is acceptance, roll-back, stop checks.
- ``dense_step_ms``: one dense forward (dense mode's verify phase / rounds); ``draft_step_ms``: std
  draft time / drafted positions; ``verify_step_ms``: std verify time / rounds (γ + 1 tokens);
  ``*_step_ratio``: relative to ``dense_step_ms``. ``round_overhead_ms``: std ``other`` (the rounds'
  bookkeeping) per round, ``round_overhead_ratio`` the same / ``dense_step_ms``;
  ``dense_round_overhead_ms`` / ``auto_round_overhead_ms``: the same for dense and auto.
  ``draft_bytes_ratio``: the bytes a draft step reads (weights + sparse KV) / a dense step's (weights
  + dense KV), at the mid-decode length: the floor of ``draft_step_ratio`` for a bandwidth-bound step.
  ``calibrated_*``: the same ratios as ``mode="auto"`` calibrates them (``step_costs``), for comparison.
- ``projected_*``: :func:`pipeline.bench.projection.project` with the measured costs (each round also
  charged its measured overhead) at the per-draft α that gives ``acceptance_profile`` at γ = 9.
  ``measured_alpha``: the same inversion of the measured acceptance rate at the run's γ.
- memory: ``*_peak_mb`` (``memory_kind``: process peak RSS on CPU, ``max_memory_allocated`` on CUDA);
  ``dense_cache_mb`` / ``sparse_cache_mb``: the decoder's KV caches.
- compiled (``--compile``; None otherwise): ``*_compiled_ms_per_token`` as above for the
  ``<variant>_compiled`` twins (static steps under ``torch.compile``, CUDA graphs on CUDA; the plain
  variants then decode with ``static_steps="off"``); ``compiled_dense_step_ms`` /
  ``compiled_draft_step_ms`` / ``compiled_verify_step_ms`` as the eager ones, and
  ``compiled_*_step_ratio`` = compiled / eager step (< 1: compiling pays); ``compiled_decode_speedup``
  = dense_compiled / std_compiled decode; ``compile_s``: the seconds of every compiled variant's first
  calls of new step buckets (trace + compile + that step), over its warm-up and timed calls, and
  ``timed_compiles`` how many of those fell in timed calls (0: no median holds a compile).
- bandwidth: ``bytes_per_dense_step`` = weights read per step + the KV cache at the mid-decode
  length; ``achieved_gbps`` = that / ``dense_step_ms``; ``bandwidth_fraction`` against the device's
  peak where it is known (GPUs).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.bench.measure import COMPILED_SUFFIX, Sample, fixed_gamma_of, memory_kind
from pipeline.bench.projection import (
    PAPER_GAMMA,
    alpha_for_acceptance,
    kv_bytes_per_token,
    peak_bandwidth,
    project,
    step_costs,
    weight_bytes_per_step,
)
from std_core.auto import StepCosts
from std_core.stats import RowStats, acceptance_rate, mean_accepted_per_round

if TYPE_CHECKING:
    from pipeline.bench.decoder import BenchModel, DecoderCase

_MB = 1e6


@dataclass(frozen=True)
class DecoderRecord:
    model: str
    arch: str
    device: str
    device_name: str
    dtype: str
    threads: int
    inputs: str
    visual_tokens: int
    prompt_tokens: int
    batch: int
    gamma: int
    sparse_budget: int
    kept_prompt_tokens: int
    new_tokens: int
    repeats: int
    outputs_equal: bool
    mismatched_variants: str
    vision_ms: float | None
    prefill_ms: float
    select_ms: float
    setup_ms: float
    dense_ms_per_token: float
    std_ms_per_token: float | None
    std_sink_ms_per_token: float | None
    auto_ms_per_token: float | None
    hf_ms_per_token: float | None
    hf_gqa_ms_per_token: float | None
    dense_e2e_ms: float
    std_e2e_ms: float | None
    std_sink_e2e_ms: float | None
    auto_e2e_ms: float | None
    hf_e2e_ms: float | None
    hf_gqa_e2e_ms: float | None
    decode_speedup: float | None
    e2e_speedup: float | None
    sink_decode_speedup: float | None
    auto_decode_speedup: float | None
    auto_e2e_speedup: float | None
    fixed_gamma_ms_per_token: str
    best_fixed_gamma: int | None
    best_fixed_ms_per_token: float | None
    auto_vs_best: float | None
    speedup_vs_hf: float | None
    speedup_vs_hf_gqa: float | None
    acceptance_rate: float | None
    mean_accepted_per_round: float | None
    sink_acceptance_rate: float | None
    sink_mean_accepted_per_round: float | None
    measured_alpha: float | None
    auto_acceptance_rate: float | None
    auto_mean_gamma: float | None
    auto_dense_round_fraction: float | None
    draft_share: float | None
    verify_share: float | None
    other_share: float | None
    dense_step_ms: float
    draft_step_ms: float | None
    verify_step_ms: float | None
    round_overhead_ms: float | None
    round_overhead_ratio: float | None
    dense_round_overhead_ms: float
    auto_round_overhead_ms: float | None
    draft_step_ratio: float | None
    draft_bytes_ratio: float | None
    verify_step_ratio: float | None
    calibrated_dense_step_ms: float | None
    calibrated_draft_step_ratio: float | None
    calibrated_verify_step_ratio: float | None
    acceptance_profile: float
    projected_alpha: float
    projected_tokens_per_round: float | None
    projected_decode_speedup: float | None
    projected_e2e_speedup: float | None
    projected_best_gamma: int | None
    projected_best_decode_speedup: float | None
    break_even_alpha: float | None
    memory_kind: str
    base_memory_mb: float
    dense_peak_mb: float
    std_peak_mb: float | None
    std_sink_peak_mb: float | None
    auto_peak_mb: float | None
    hf_peak_mb: float | None
    hf_gqa_peak_mb: float | None
    dense_cache_mb: float
    sparse_cache_mb: float | None
    bytes_per_dense_step: int
    achieved_gbps: float
    peak_gbps: float | None
    bandwidth_fraction: float | None
    dense_compiled_ms_per_token: float | None = None
    std_compiled_ms_per_token: float | None = None
    auto_compiled_ms_per_token: float | None = None
    compiled_dense_step_ms: float | None = None
    compiled_draft_step_ms: float | None = None
    compiled_verify_step_ms: float | None = None
    compiled_dense_step_ratio: float | None = None
    compiled_draft_step_ratio: float | None = None
    compiled_verify_step_ratio: float | None = None
    compiled_decode_speedup: float | None = None
    compile_s: float | None = None
    timed_compiles: int | None = None


def build_record(
    bench: BenchModel,
    case: DecoderCase,
    inputs: dict,
    samples: dict[str, list[Sample]],
    calibrated: StepCosts | None = None,
    vision_seconds: float | None = None,
    warmups: dict[str, Sample] | None = None,
) -> DecoderRecord:
    """Medians, ratios and projections of one case's samples (see the module docstring)."""
    model, dense, std = bench.model, samples["dense"], samples.get("std")
    fields = {
        **_describe(bench, case, inputs, samples),
        "vision_ms": None if vision_seconds is None else 1000 * vision_seconds,
        **_variant_times(samples),
        **_speedups(case, samples),
        **_acceptance(case, std, samples.get("auto")),
        **_sink_acceptance(samples.get("std_sink")),
        **_steps_and_projection(case, dense, std, samples.get("auto")),
        **_calibrated(calibrated, case.gamma),
        **_memory(model.device, samples),
        **_bandwidth(model, inputs, dense, std),
        **_compiled(samples, warmups or {}),
    }
    return DecoderRecord(**fields)


def _step_ms(dense: list[Sample] | None, std: list[Sample] | None) -> tuple:
    """Dense, draft and verify step milliseconds (as ``dense_step_ms`` etc.), None where not run."""

    def ms(samples: list[Sample] | None, value) -> float | None:
        median = _median(samples, value)
        return None if median is None else 1000 * median

    return (
        ms(dense, lambda s: s.verify_seconds / max(1, s.rounds)),
        ms(std, lambda s: s.draft_seconds / max(1, sum(s.round_gammas))),
        ms(std, lambda s: s.verify_seconds / max(1, s.rounds)),
    )


def _compiled(samples: dict[str, list[Sample]], warmups: dict[str, Sample]) -> dict:
    """The compiled twins' times and step costs beside the eager ones (all None without them)."""
    compiled = [v for v in samples if v.endswith(COMPILED_SUFFIX)]
    if not compiled:
        return {}
    out = {}
    for variant in ("dense", "std", "auto"):
        ss = samples.get(f"{variant}{COMPILED_SUFFIX}")
        per_token = _median(ss, lambda s: s.decode_seconds / max(1, s.steps))
        out[f"{variant}_compiled_ms_per_token"] = None if per_token is None else 1000 * per_token
    eager = _step_ms(samples.get("dense"), samples.get("std"))
    steps = _step_ms(samples.get(f"dense{COMPILED_SUFFIX}"), samples.get(f"std{COMPILED_SUFFIX}"))
    for name, mine, theirs in zip(("dense", "draft", "verify"), steps, eager, strict=True):
        out[f"compiled_{name}_step_ms"] = mine
        out[f"compiled_{name}_step_ratio"] = _ratio(mine, theirs)
    decode = {
        v: _median(samples.get(f"{v}{COMPILED_SUFFIX}"), lambda s: s.decode_seconds) for v in ("dense", "std")
    }
    out["compiled_decode_speedup"] = _ratio(decode["dense"], decode["std"])
    calls = [s for v in compiled for s in samples[v]]
    out["compile_s"] = sum(s.compile_seconds for s in calls) + sum(
        warmups[v].compile_seconds for v in compiled if v in warmups
    )
    out["timed_compiles"] = sum(s.compiles for s in calls)
    return out


def _median(samples: list[Sample] | None, value) -> float | None:
    return statistics.median(value(s) for s in samples) if samples else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _describe(bench: BenchModel, case: DecoderCase, inputs: dict, samples: dict[str, list[Sample]]) -> dict:
    model, ids = bench.model, inputs["input_ids"]
    reference = samples["dense"][0].sequences
    mismatched = {v for v, ss in samples.items() for s in ss if not torch.equal(s.sequences, reference)}
    std = samples.get("std")
    return {
        "model": bench.label,
        "arch": model.config.model_type,
        "device": model.device.type,
        "device_name": torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "cpu",
        "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "inputs": "synthetic" if case.visual_tokens else f"demo_world@{case.frames}f",
        "visual_tokens": samples["dense"][0].visual_tokens,
        "prompt_tokens": ids.shape[1],
        "batch": ids.shape[0],
        "gamma": case.gamma,
        "sparse_budget": case.sparse_budget,
        "kept_prompt_tokens": std[0].kept_prompt_tokens if std else 0,
        "new_tokens": samples["dense"][0].steps + 1,
        "repeats": case.repeats,
        "outputs_equal": not mismatched,
        "mismatched_variants": ",".join(sorted(mismatched)),
    }


def _variant_times(samples: dict[str, list[Sample]]) -> dict:
    out = {
        "prefill_ms": 1000 * _median(samples["dense"], lambda s: s.prefill_seconds),
        "select_ms": 1000 * (_median(samples.get("std"), lambda s: s.select_seconds) or 0.0),
        "setup_ms": 1000 * _median(samples["dense"], lambda s: s.setup_seconds),
    }
    for variant in ("dense", "std", "std_sink", "auto", "hf", "hf_gqa"):
        ss = samples.get(variant)
        per_token = _median(ss, lambda s: s.decode_seconds / max(1, s.steps))
        wall = _median(ss, lambda s: s.wall_seconds)
        out[f"{variant}_ms_per_token"] = None if per_token is None else 1000 * per_token
        out[f"{variant}_e2e_ms"] = None if wall is None else 1000 * wall
    return out


def _speedups(case: DecoderCase, samples: dict[str, list[Sample]]) -> dict:
    def decode(variant: str) -> float | None:
        return _median(samples.get(variant), lambda s: s.decode_seconds)

    def wall(variant: str) -> float | None:
        return _median(samples.get(variant), lambda s: s.wall_seconds)

    def per_token(variant: str) -> float:
        return 1000 * _median(samples[variant], lambda s: s.decode_seconds / max(1, s.steps))

    fixed = {fixed_gamma_of(v): v for v in samples if fixed_gamma_of(v) is not None}
    if "std" in samples:
        fixed[case.gamma] = "std"
    fastest = min(fixed, key=lambda g: decode(fixed[g])) if fixed else None
    best = min(("dense", *fixed.values()), key=decode)
    paired = (
        statistics.median(
            a.decode_seconds / b.decode_seconds for a, b in zip(samples["auto"], samples[best], strict=True)
        )
        if "auto" in samples
        else None
    )
    return {
        "decode_speedup": _ratio(decode("dense"), decode("std")),
        "e2e_speedup": _ratio(wall("dense"), wall("std")),
        "sink_decode_speedup": _ratio(decode("dense"), decode("std_sink")),
        "auto_decode_speedup": _ratio(decode("dense"), decode("auto")),
        "auto_e2e_speedup": _ratio(wall("dense"), wall("auto")),
        "fixed_gamma_ms_per_token": " ".join(f"{g}:{per_token(fixed[g]):.3f}" for g in sorted(fixed)),
        "best_fixed_gamma": fastest,
        "best_fixed_ms_per_token": None if fastest is None else per_token(fixed[fastest]),
        "auto_vs_best": paired,
        "speedup_vs_hf": _ratio(decode("hf"), decode("std")),
        "speedup_vs_hf_gqa": _ratio(decode("hf_gqa"), decode("std")),
    }


def _sink_acceptance(sink: list[Sample] | None) -> dict:
    if not sink or not sink[0].counts.drafted:
        return {"sink_acceptance_rate": None, "sink_mean_accepted_per_round": None}
    c = sink[0].counts
    return {
        "sink_acceptance_rate": acceptance_rate(c.accepted, c.drafted),
        "sink_mean_accepted_per_round": mean_accepted_per_round(c.committed, c.rounds),
    }


def _acceptance(case: DecoderCase, std: list[Sample] | None, auto: list[Sample] | None) -> dict:
    out: dict = dict.fromkeys(
        ("acceptance_rate", "mean_accepted_per_round", "measured_alpha", "auto_acceptance_rate",
         "auto_mean_gamma", "auto_dense_round_fraction")
    )  # fmt: skip
    if std:
        c = std[0].counts  # greedy decoding is deterministic: every repeat accepts the same drafts
        out["acceptance_rate"] = acceptance_rate(c.accepted, c.drafted)
        out["mean_accepted_per_round"] = mean_accepted_per_round(c.committed, c.rounds)
        if out["acceptance_rate"] is not None:
            out["measured_alpha"] = alpha_for_acceptance(out["acceptance_rate"], case.gamma)
    if auto:
        gammas = [g for s in auto for g in s.round_gammas]
        total = sum((s.counts for s in auto), RowStats())
        out["auto_acceptance_rate"] = acceptance_rate(total.accepted, total.drafted)
        out["auto_mean_gamma"] = statistics.fmean(gammas) if gammas else None
        out["auto_dense_round_fraction"] = sum(g == 0 for g in gammas) / len(gammas) if gammas else None
    return out


def _steps_and_projection(
    case: DecoderCase, dense: list[Sample], std: list[Sample] | None, auto: list[Sample] | None
) -> dict:
    dense_step = _median(dense, lambda s: s.verify_seconds / max(1, s.rounds))
    dense_token = _median(dense, lambda s: s.decode_seconds / max(1, s.steps))
    alpha = alpha_for_acceptance(case.acceptance_profile, PAPER_GAMMA)
    out: dict = {"dense_step_ms": 1000 * dense_step, "acceptance_profile": case.acceptance_profile}
    out["projected_alpha"] = alpha
    out["dense_round_overhead_ms"] = 1000 * _median(dense, lambda s: s.other_seconds / max(1, s.rounds))
    auto_overhead = _median(auto, lambda s: s.other_seconds / max(1, s.rounds))
    out["auto_round_overhead_ms"] = None if auto_overhead is None else 1000 * auto_overhead
    if not std:
        return {**out, **dict.fromkeys(_STD_STEP_FIELDS)}
    draft = _median(std, lambda s: s.draft_seconds / max(1, sum(s.round_gammas)))
    verify = _median(std, lambda s: s.verify_seconds / max(1, s.rounds))
    overhead = _median(std, lambda s: s.other_seconds / max(1, s.rounds))
    decode = _median(std, lambda s: s.decode_seconds)
    split = {k: _median(std, lambda s, k=k: getattr(s, f"{k}_seconds") / max(s.decode_seconds, 1e-12))
             for k in ("draft", "verify", "other")}  # fmt: skip
    # projection: dense tokens cost what dense decoding measured per token (bookkeeping included),
    # a round costs its measured draft and verify forwards plus its measured bookkeeping
    costs = step_costs(dense_token, draft, verify + overhead, case.gamma)
    fixed = _median(dense, lambda s: s.prefill_seconds) + _median(std, lambda s: s.select_seconds)
    projection = project(costs, alpha, case.gamma, fixed, dense_token * dense[0].steps)
    return (
        {
            **out,
            "draft_share": split["draft"],
            "verify_share": split["verify"],
            "other_share": split["other"],
            "draft_step_ms": 1000 * draft,
            "verify_step_ms": 1000 * verify,
            "round_overhead_ms": 1000 * overhead,
            "round_overhead_ratio": overhead / dense_step,
            "draft_step_ratio": draft / dense_step,
            "verify_step_ratio": verify / dense_step,
            "projected_tokens_per_round": projection.tokens_per_round,
            "projected_decode_speedup": projection.decode_speedup,
            "projected_e2e_speedup": projection.e2e_speedup,
            "projected_best_gamma": projection.best_gamma,
            "projected_best_decode_speedup": projection.best_decode_speedup,
            "break_even_alpha": projection.break_even_alpha,
        }
        if decode is not None
        else out
    )


_STD_STEP_FIELDS = (
    "draft_share", "verify_share", "other_share", "draft_step_ms", "verify_step_ms", "round_overhead_ms",
    "round_overhead_ratio", "draft_step_ratio", "verify_step_ratio", "projected_tokens_per_round",
    "projected_decode_speedup", "projected_e2e_speedup", "projected_best_gamma",
    "projected_best_decode_speedup", "break_even_alpha",
)  # fmt: skip


def _calibrated(costs: StepCosts | None, gamma: int) -> dict:
    if costs is None:
        return dict.fromkeys(
            ("calibrated_dense_step_ms", "calibrated_draft_step_ratio", "calibrated_verify_step_ratio")
        )
    return {
        "calibrated_dense_step_ms": 1000 * costs.dense_step,
        "calibrated_draft_step_ratio": costs.draft_step / costs.dense_step,
        "calibrated_verify_step_ratio": costs.verify(gamma + 1) / costs.dense_step,
    }


def _memory(device: torch.device, samples: dict[str, list[Sample]]) -> dict:
    out: dict = {
        "memory_kind": memory_kind(device),
        "base_memory_mb": min(s.base_memory_bytes for ss in samples.values() for s in ss) / _MB,
        "dense_cache_mb": samples["dense"][0].dense_cache_bytes / _MB,
        "sparse_cache_mb": samples["std"][0].sparse_cache_bytes / _MB if samples.get("std") else None,
    }
    for variant in ("dense", "std", "std_sink", "auto", "hf", "hf_gqa"):
        peak = _median(samples.get(variant), lambda s: s.peak_memory_bytes)
        out[f"{variant}_peak_mb"] = None if peak is None else peak / _MB
    return out


def _bandwidth(model: torch.nn.Module, inputs: dict, dense: list[Sample], std: list[Sample] | None) -> dict:
    batch, prompt = inputs["input_ids"].shape
    weights, per_token = weight_bytes_per_step(model), kv_bytes_per_token(model) * batch
    step_bytes = weights + per_token * (prompt + dense[0].steps // 2)
    draft_bytes = weights + per_token * (std[0].kept_prompt_tokens + dense[0].steps // 2) if std else None
    dense_step = _median(dense, lambda s: s.verify_seconds / max(1, s.rounds))
    achieved = step_bytes / dense_step
    peak = peak_bandwidth(model.device)
    return {
        "draft_bytes_ratio": None if draft_bytes is None else draft_bytes / step_bytes,
        "bytes_per_dense_step": step_bytes,
        "achieved_gbps": achieved / 1e9,
        "peak_gbps": None if peak is None else peak / 1e9,
        "bandwidth_fraction": None if peak is None else achieved / peak,
    }
