"""Acceptance rules: which drafted tokens the dense model keeps, and the bonus token. Pure functions.

Shapes: ``drafts [B, γ]``; dense probabilities ``p [B, m, V]`` for the verified positions, where
position ``i`` predicts the token after ``[pending] + drafts[:i]`` (``m = γ + 1`` for a parallel
verify, ``m <= γ + 1`` when a sequential verify stopped early); draft probabilities ``q [B, γ, V]``.

Greedy: a draft is accepted when it equals the dense argmax; the bonus is the dense argmax at the
first disagreement (or after the last draft). Sampling: speculative sampling (Leviathan et al. 2023):
accept draft ``x`` with probability ``min(1, p(x) / q(x))``; at the first rejection sample the bonus
from ``norm(max(p - q, 0))``, or from ``p`` after the last draft. Either way every committed token is
distributed exactly as the dense model's.
"""

from __future__ import annotations

import torch


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """The greedy token of ``scores [..., V]``: the first maximal index, as ``torch.argmax`` (and
    ``generate``) picks it; ``max(dim).indices`` returns the same index and is up to twice as fast on CPU
    at a real vocabulary."""
    return scores.max(dim=-1).indices


def greedy_agreement(drafts: torch.Tensor, dense_tokens: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` bool: draft ``i`` equals the dense argmax at position ``i`` (n = min(γ, m))."""
    n = min(drafts.shape[1], dense_tokens.shape[1])
    return drafts[:, :n] == dense_tokens[:, :n]


def sampling_agreement(
    drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """``[B, n]`` bool: ``u < p(x) / q(x)`` for each draft ``x`` (``q(x) > 0``: x was drawn from q)."""
    n = min(drafts.shape[1], p.shape[1])
    index = drafts[:, :n, None]
    p_x = p[:, :n].gather(-1, index).squeeze(-1)
    q_x = q[:, :n].gather(-1, index).squeeze(-1)
    return uniforms[:, :n] * q_x < p_x


def accepted_length(agreement: torch.Tensor) -> torch.Tensor:
    """``[B]`` long: the length of the agreeing prefix (the accepted drafts)."""
    return agreement.long().cumprod(dim=1).sum(dim=1)


def greedy_bonus(dense_tokens: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """``[B]``: the dense argmax right after the accepted prefix."""
    return dense_tokens.gather(1, accepted[:, None]).squeeze(1)


def residual_distribution(p: torch.Tensor, q: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """``[B, V]``: where the bonus is sampled from. At a rejection (``accepted < γ``):
    ``norm(max(p - q, 0))`` at that position; after all γ drafts: ``p`` at position γ."""
    rows = torch.arange(p.shape[0], device=p.device)
    p_at = p[rows, accepted]
    gamma = q.shape[1]
    q_at = q[rows, accepted.clamp(max=gamma - 1)] if gamma else torch.zeros_like(p_at)
    q_at = torch.where((accepted < gamma)[:, None], q_at, torch.zeros_like(q_at))
    residual = (p_at - q_at).clamp(min=0)
    mass = residual.sum(dim=-1, keepdim=True)
    # p == q exactly leaves no residual mass; any sample from p is then correct.
    return torch.where(mass > 0, residual / mass.clamp(min=torch.finfo(p.dtype).tiny), p_at)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``[B]`` tokens drawn from ``[B, V]`` probabilities."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
