"""The auto policy's cost model: expected tokens, the best γ, break-even acceptance, the estimate;
and the round schedules the decoder asks for γ."""

from __future__ import annotations

import pytest
import torch

from std_core import RowStats
from std_core.auto import (
    AcceptanceEstimate,
    AutoPolicy,
    AutoSchedule,
    FixedSchedule,
    RoundCosts,
    StepCosts,
    best_gamma,
    break_even_alpha,
    expected_tokens,
)


def test_expected_tokens() -> None:
    assert expected_tokens(0.0, 9) == 1.0
    assert expected_tokens(1.0, 9) == 10.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_weight_bound_costs_choose_dense() -> None:
    # a draft costs as much as a dense step: nothing to win, whatever the acceptance
    costs = StepCosts(dense_step=1.0, draft_step=1.0, verify_base=1.0, verify_per_token=0.05)
    assert best_gamma(costs, 0.99, 9) == 0
    assert break_even_alpha(costs, 4) == 1.0


def test_kv_bound_costs_choose_long_rounds_at_high_acceptance() -> None:
    # a draft reads 1/16 of the KV; a verify costs little more than a dense step
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    assert best_gamma(costs, 0.9, 9) >= 6
    assert 0 < best_gamma(costs, 0.5, 9) < best_gamma(costs, 0.9, 9)
    assert best_gamma(costs, 0.02, 9) == 0
    alpha = break_even_alpha(costs, 4)
    assert costs.speedup(alpha, 4) == pytest.approx(1.0, abs=1e-6)
    assert costs.speedup(0.62, best_gamma(costs, 0.62, 9)) > 1.5


def test_costs_from_measurements_fit_the_verify_line() -> None:
    costs = StepCosts.from_measurements(dense=1.0, draft=0.1, verify_1=1.0, verify_q=1.9, q=10)
    assert costs.verify(1) == pytest.approx(1.0) and costs.verify(10) == pytest.approx(1.9)


def test_acceptance_estimate_is_the_truncated_geometric_mle() -> None:
    estimate = AcceptanceEstimate(prior=0.5)
    for _ in range(200):
        estimate.update(accepted=3 + 4, rejections=1)  # one row rejected after 3, one accepted all 4
    assert estimate.alpha == pytest.approx(7 / 8, abs=0.01)


def test_policy_probes_when_it_fell_back_to_dense() -> None:
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    policy = AutoPolicy(RoundCosts(costs), gamma_max=9, prior_alpha=0.0)
    assert policy.choose() == 0  # the first round measures dense
    policy.record([], gamma=0, seconds=costs.round_seconds(0))
    choices = [policy.choose() for _ in range(40)]
    assert choices.count(0) >= 36 and max(choices) > 0  # mostly dense, with short probes
    accepted_all = [RowStats(3, 1, 2, 2, 0), RowStats(3, 1, 2, 2, 0)]
    for _ in range(20):
        policy.record(accepted_all, gamma=2, seconds=costs.round_seconds(2))  # probes fully accepted
    assert policy.choose() >= 6


def test_rejected_probes_back_off() -> None:
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    policy = AutoPolicy(RoundCosts(costs), gamma_max=9, prior_alpha=0.0)
    policy.record([], gamma=0, seconds=1.0)
    rejected = [RowStats(1, 1, 2, 0, 1)]
    gaps, last = [], 0
    for i in range(1, 400):
        if policy.choose() > 0:
            gaps.append(i - last)
            last = i
            policy.record(rejected, gamma=2, seconds=costs.round_seconds(2))
        else:
            policy.record([], gamma=0, seconds=1.0)
    assert gaps[-1] > gaps[0] >= 8  # probes get rarer while they keep failing


def test_probe_backoff_carries_over_to_the_next_call_on_the_same_costs() -> None:
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    shared = RoundCosts(costs)

    def probes_in(calls: int, rounds: int, accepted: bool) -> list[int]:
        counts = []
        outcome = [RowStats(3, 1, 2, 2, 0)] if accepted else [RowStats(1, 1, 2, 0, 1)]
        for _ in range(calls):
            policy, probes = AutoPolicy(shared, gamma_max=9, prior_alpha=0.0), 0
            for _ in range(rounds):
                gamma = policy.choose()
                probes += gamma > 0
                policy.record(outcome if gamma else [], gamma=gamma, seconds=shared.round_seconds(gamma))
            counts.append(probes)
        return counts

    failing = probes_in(calls=4, rounds=64, accepted=False)
    assert failing[0] == 2 and failing[-1] == 0  # rounds 16 and 48; later calls wait out the backoff
    assert shared.probe_every > 64
    shared.probe_every = 16
    assert probes_in(calls=1, rounds=64, accepted=True)[0] >= 1


def test_a_probe_with_a_lucky_acceptance_still_backs_off() -> None:
    """Eight rows, one of which accepts one draft by chance: dense stays better, so probes get rarer."""
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    shared = RoundCosts(costs)
    policy = AutoPolicy(shared, gamma_max=9, prior_alpha=0.0)
    lucky = [RowStats(2, 1, 2, 1, 1)] + [RowStats(1, 1, 2, 0, 1)] * 7
    for _ in range(200):
        gamma = policy.choose()
        policy.record(lucky if gamma else [], gamma=gamma, seconds=shared.round_seconds(gamma))
    assert shared.probe_every > 16 and policy.estimate.alpha < 0.2


def test_measured_rounds_override_a_wrong_calibration() -> None:
    """A calibration that made drafts look as dear as dense steps is corrected by measured rounds."""
    wrong = StepCosts(dense_step=1.0, draft_step=1.0, verify_base=1.0, verify_per_token=0.04)
    true = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    costs = RoundCosts(wrong)
    assert best_gamma(costs, 0.9, 9) == 0
    for gamma in (0, 2, 4):
        costs.observe(gamma, true.round_seconds(gamma))
    assert best_gamma(costs, 0.9, 9) >= 4
    assert costs.round_seconds(4) == true.round_seconds(4)


def test_unmeasured_rounds_scale_with_the_measured_ones() -> None:
    costs = RoundCosts(StepCosts(dense_step=1.0, draft_step=0.1, verify_base=1.0, verify_per_token=0.0))
    costs.observe(0, 2.0)  # everything runs twice as slow as calibrated (a busy machine)
    assert costs.round_seconds(3) == 2 * (3 * 0.1 + 1.0)


def test_fixed_schedule_keeps_gamma_within_the_limit() -> None:
    schedule = FixedSchedule(9)
    assert [schedule.next_gamma(limit) for limit in (20, 9, 3, 0)] == [9, 9, 3, 0]
    assert FixedSchedule(0).next_gamma(5) == 0  # mode="dense"


def test_auto_schedule_calibrates_once_per_model_and_carries_alpha_over() -> None:
    """The round costs are cached per model and shape bucket; a call's final α is the next call's prior."""
    model = torch.nn.Linear(2, 2)
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    calls: list[int] = []

    def calibrate() -> StepCosts:
        calls.append(1)
        return costs

    first = AutoSchedule.for_model(model, 9, (2, 64, 16), calibrate)
    assert first.policy.estimate.alpha == pytest.approx(0.6)  # no earlier call: the default prior
    assert first.next_gamma(9) == 0  # the first round measures dense
    first.record(0, [])
    for _ in range(20):
        first.record(2, [RowStats(3, 1, 2, 2, 0, committed=3)])  # fully accepted rounds
    first.finish()
    second = AutoSchedule.for_model(model, 9, (2, 64, 16), calibrate)
    assert len(calls) == 1 and second.policy.costs is first.policy.costs
    assert second.policy.estimate.alpha == pytest.approx(first.policy.estimate.alpha)
    assert second.policy.estimate.alpha > 0.9
    AutoSchedule.for_model(model, 9, (2, 128, 16), calibrate)  # another shape bucket calibrates again
    AutoSchedule.for_model(torch.nn.Linear(2, 2), 9, (2, 64, 16), calibrate)  # so does another model
    assert len(calls) == 3
