"""The projection arithmetic: the i.i.d. acceptance model, its inversion, and projected speedups on
synthetic step costs (pure functions, no model)."""

from __future__ import annotations

import pytest
import torch

from pipeline.bench.projection import (
    acceptance_rate,
    alpha_for_acceptance,
    peak_bandwidth,
    project,
    step_costs,
)


def test_paper_profile_is_a_per_draft_alpha_of_about_0_90() -> None:
    alpha = alpha_for_acceptance(0.62, 9)
    assert alpha == pytest.approx(0.9025, abs=1e-3)
    assert acceptance_rate(alpha, 9) == pytest.approx(0.62)


@pytest.mark.parametrize("gamma", [1, 3, 9])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.62, 1.0])
def test_inversion_round_trips(rate: float, gamma: int) -> None:
    assert acceptance_rate(alpha_for_acceptance(rate, gamma), gamma) == pytest.approx(rate, abs=1e-9)


def test_acceptance_rate_of_gamma_one_is_alpha() -> None:
    assert acceptance_rate(0.7, 1) == pytest.approx(0.7)


def test_projection_of_free_drafts_and_verifies_is_tokens_per_round() -> None:
    costs = step_costs(dense_step=1.0, draft_step=0.0, verify_step=1.0, gamma=9)
    p = project(costs, alpha=0.9, gamma=9, fixed_seconds=0.0, dense_decode=10.0)
    assert p.decode_speedup == pytest.approx(p.tokens_per_round) and p.e2e_speedup == pytest.approx(
        p.decode_speedup
    )
    assert p.best_gamma == 9 and p.break_even_alpha < 0.2


def test_projection_when_drafts_cost_a_dense_step_is_a_slowdown() -> None:
    costs = step_costs(dense_step=1.0, draft_step=1.0, verify_step=1.5, gamma=9)
    p = project(costs, alpha=0.9025, gamma=9, fixed_seconds=5.0, dense_decode=5.0)
    assert p.decode_speedup < 1 and p.best_gamma == 0 and p.best_decode_speedup == 1.0
    assert p.decode_speedup < p.e2e_speedup < 1  # the prefill dilutes a slowdown as well as a speedup
    assert p.break_even_alpha == 1.0


def test_peak_bandwidth_is_unknown_on_cpu() -> None:
    assert peak_bandwidth(torch.device("cpu")) is None
