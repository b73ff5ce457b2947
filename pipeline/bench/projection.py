"""Projected speedups from measured step costs and a stated acceptance profile; bandwidth arithmetic.

The i.i.d. acceptance model (the one ``std_core.auto`` plans with): each draft of a round is accepted
with probability α independently, and a round stops at its first rejection. A round of γ drafts then
accepts ``Σ_{i=1..γ} α^i`` drafts on average, so its *acceptance rate* (accepted / drafted) is that sum
over γ, and it commits ``(1 − α^(γ+1)) / (1 − α)`` tokens (bonus included).

The paper's profile: 62% of drafts accepted at γ = 9 (its Qwen2-VL-7B/MLVU-scale figure; we read its
"acceptance rate" as accepted / drafted). Under the i.i.d. model that is a per-draft α of about 0.90,
i.e. ~6.6 tokens per round. A *projection* combines such an α with *measured* step costs:
``speedup = E[tokens per round] · dense_step / (γ · draft_step + verify(γ + 1))``. It is labelled
``projected_*`` everywhere, and never mixed with measured speedups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from std_core.auto import StepCosts, best_gamma, break_even_alpha, expected_tokens

PAPER_ACCEPTANCE_RATE = 0.62
PAPER_GAMMA = 9

# Peak memory bandwidth (bytes/s) by device name fragment, most specific first.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM (HBM3)
    ("A100-SXM4-80GB", 2.039e12),
    ("A100-SXM4-40GB", 1.555e12),
    ("A100 80GB PCIe", 1.935e12),
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
    ("L4", 0.3e12),
)


def acceptance_rate(alpha: float, gamma: int) -> float:
    """Accepted / drafted for rounds of γ drafts at per-draft acceptance α (i.i.d. model)."""
    if gamma < 1:
        raise ValueError("gamma must be >= 1")
    return sum(alpha**i for i in range(1, gamma + 1)) / gamma


def alpha_for_acceptance(rate: float, gamma: int) -> float:
    """The per-draft α whose rounds of γ drafts have acceptance rate ``rate`` (bisection)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {rate}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if acceptance_rate(mid, gamma) < rate else (lo, mid)
    return (lo + hi) / 2


def alpha_from_counts(accepted: int, drafted: int, rounds_with_rejection: int) -> float:
    """Maximum-likelihood α of the i.i.d. model from observed rounds: accepted / (accepted + rejections)."""
    total = accepted + rounds_with_rejection
    return accepted / total if total else 0.0


@dataclass(frozen=True)
class Projection:
    """Projected decode and end-to-end speedups at per-draft acceptance ``alpha`` (see module docstring)."""

    alpha: float
    gamma: int
    tokens_per_round: float
    decode_speedup: float
    e2e_speedup: float
    best_gamma: int
    best_decode_speedup: float
    break_even_alpha: float


def project(
    costs: StepCosts, alpha: float, gamma: int, fixed_seconds: float, dense_decode: float
) -> Projection:
    """Project fixed-γ StD against dense decoding. ``fixed_seconds`` (prefill + selection) is paid by
    both; ``dense_decode`` is the measured dense decode time of the same output length."""
    decode = costs.speedup(alpha, gamma)
    best = best_gamma(costs, alpha, gamma)
    e2e = (fixed_seconds + dense_decode) / (fixed_seconds + dense_decode / decode) if decode > 0 else 0.0
    return Projection(
        alpha=alpha,
        gamma=gamma,
        tokens_per_round=expected_tokens(alpha, gamma),
        decode_speedup=decode,
        e2e_speedup=e2e,
        best_gamma=best,
        best_decode_speedup=costs.speedup(alpha, best) if best else 1.0,
        break_even_alpha=break_even_alpha(costs, gamma),
    )


def step_costs(dense_step: float, draft_step: float, verify_step: float, gamma: int) -> StepCosts:
    """Measured step costs as ``std_core.auto.StepCosts``: a verify of 1 token is a dense step, a verify
    of γ + 1 tokens costs ``verify_step``, linear in between (as ``mode="auto"`` calibrates)."""
    return StepCosts.from_measurements(dense_step, draft_step, dense_step, verify_step, gamma + 1)


def peak_bandwidth(device: torch.device) -> float | None:
    """The device's peak memory bandwidth in bytes/s, or None where unknown (CPUs, other GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for fragment, bw in PEAK_BANDWIDTH if fragment in name), None)


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: the language model and LM head, not the vision tower
    and not the input embedding (a step looks up one row), unless the LM head shares it."""
    vision = {"visual", "vision_tower", "multi_modal_projector", "image_newline"}
    total = sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if not vision.intersection(name.split("."))
    )
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    return total - (0 if tied else embed.numel() * embed.element_size())


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of dense KV cache per token (all layers, keys and values) in the model's dtype."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return text.num_hidden_layers * 2 * text.num_key_value_heads * head_dim * itemsize
