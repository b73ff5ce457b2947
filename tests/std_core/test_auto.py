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
    verify_sizes,
)


def _phases(costs: StepCosts, gamma: int, scale: float = 1.0) -> dict[str, float]:
    """A round of γ drafts under ``costs`` as the decoder reports it: its wall, draft and verify seconds."""
    draft = scale * gamma * costs.draft_step
    verify = scale * (costs.dense_step if gamma == 0 else costs.verify(gamma + 1))
    return {"seconds": draft + verify, "draft_seconds": draft, "verify_seconds": verify}


def _advance(outcomes: list[RowStats]) -> int | None:
    """How far a round moved a batch of these rows' counts (one row: its committed tokens)."""
    return min(o.generated for o in outcomes) if outcomes else None


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
    policy.record([], gamma=0, **_phases(costs, 0))
    choices = [policy.choose() for _ in range(40)]
    assert choices.count(0) >= 36 and max(choices) > 0  # mostly dense, with short probes
    accepted_all = [RowStats(3, 1, 2, 2, 0), RowStats(3, 1, 2, 2, 0)]
    for _ in range(20):  # probes fully accepted
        policy.record(accepted_all, gamma=2, **_phases(costs, 2), advance=_advance(accepted_all))
    assert policy.choose() == 5  # longer rounds, at most one more than twice the longest measured
    accepted_5 = [RowStats(6, 1, 5, 5, 0)]
    policy.record(accepted_5, gamma=5, **_phases(costs, 5), advance=_advance(accepted_5))
    assert policy.choose() >= 6  # and longer again once those are measured to pay


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
            policy.record(rejected, gamma=2, **_phases(costs, 2), advance=_advance(rejected))
        else:
            policy.record([], gamma=0, seconds=1.0)
    assert gaps[-1] > gaps[0] >= 8  # probes get rarer while they keep failing


def test_probe_backoff_carries_over_to_the_next_call_on_the_same_costs() -> None:
    """The probe interval and the rounds since the last probe belong to the model and shape bucket, not
    to a call: short calls (a caption's 20 tokens) probe as rarely, and as surely, as long ones."""
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    shared = RoundCosts(costs)

    def probe_rounds(calls: int, rounds: int, accepted: bool) -> list[int]:
        """The rounds (counted over all calls) that probed."""
        found, counted = [], 0
        outcome = [RowStats(3, 1, 2, 2, 0)] if accepted else [RowStats(1, 1, 2, 0, 1)]
        for _ in range(calls):
            policy = AutoPolicy(shared, gamma_max=9, prior_alpha=0.0)
            for _ in range(rounds):
                gamma = policy.choose()
                counted += 1
                if gamma:
                    found.append(counted)
                policy.record(
                    outcome if gamma else [], gamma=gamma, **_phases(costs, gamma), advance=_advance(outcome)
                )
        return found

    failing = probe_rounds(calls=16, rounds=16, accepted=False)  # calls as short as the first interval
    gaps = [b - a for a, b in zip(failing, failing[1:], strict=False)]
    assert failing[0] == 17 and gaps == [32, 64, 128], failing  # round 1 measures dense; each failure doubles
    assert shared.probe_every == 16 * 16  # at most 16x
    shared.probe_every, shared.since_probe = 16, 0
    assert len(probe_rounds(calls=4, rounds=16, accepted=True)) >= 1


def test_a_probe_with_a_lucky_acceptance_still_backs_off() -> None:
    """Eight rows, one of which accepts one draft by chance: dense stays better, so probes get rarer."""
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    shared = RoundCosts(costs)
    policy = AutoPolicy(shared, gamma_max=9, prior_alpha=0.0)
    lucky = [RowStats(2, 1, 2, 1, 1)] + [RowStats(1, 1, 2, 0, 1)] * 7
    for _ in range(200):
        gamma = policy.choose()
        policy.record(lucky if gamma else [], gamma=gamma, **_phases(costs, gamma), advance=_advance(lucky))
    assert shared.probe_every > 16 and policy.estimate.alpha < 0.2


def test_measured_rounds_override_a_wrong_calibration() -> None:
    """A calibration that made drafts look as dear as dense steps is corrected by measured rounds: the
    draft step they measure holds for every γ, not only for those that ran."""
    wrong = StepCosts(dense_step=1.0, draft_step=1.0, verify_base=1.0, verify_per_token=0.04)
    true = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    costs = RoundCosts(wrong)
    assert best_gamma(costs, 0.9, 9) == 0
    for gamma in (0, 2, 4):
        costs.observe(gamma, **_phases(true, gamma))
    assert best_gamma(costs, 0.9, 9) >= 4
    assert costs.round_seconds(4) == pytest.approx(true.round_seconds(4))
    assert costs.round_seconds(7) == pytest.approx(true.round_seconds(7))  # never ran


def test_unmeasured_rounds_scale_with_the_measured_ones() -> None:
    costs = RoundCosts(StepCosts(dense_step=1.0, draft_step=0.1, verify_base=1.0, verify_per_token=0.0))
    costs.observe(0, seconds=2.0, draft_seconds=0.0, verify_seconds=2.0)  # a busy machine: twice as slow
    assert costs.round_seconds(3) == pytest.approx(2 * (3 * 0.1 + 1.0))


def test_dense_rounds_cost_what_they_measured_not_the_verify_scaled_calibration() -> None:
    """A calibration whose verify of 2 tokens is 15% under what the rounds measure (on the development
    CPU 1.13 against 1.27 dense steps) must not make the dense rounds look 15% dearer once γ = 1 runs:
    the dense step is what dense rounds measured."""
    calibrated = StepCosts.from_verifies(1.0, 0.3, [(1, 1.0), (2, 1.1), (10, 2.0)])
    costs = RoundCosts(calibrated)
    costs.observe(0, seconds=1.0, draft_seconds=0.0, verify_seconds=1.0)
    for _ in range(9):
        costs.observe(1, seconds=1.65, draft_seconds=0.35, verify_seconds=1.265, advance=2, alpha=1.0)
    assert costs.round_seconds(0) == pytest.approx(1.0)
    assert costs.round_seconds(1) == pytest.approx(1.65)  # its own measured round, as it ran
    assert costs.tokens(1, 1.0) / costs.round_seconds(1) > 1 / costs.round_seconds(0)  # 2/1.65 vs 1


def test_a_round_is_worth_how_far_it_moved_the_batch() -> None:
    """Each γ's measured advance, as a share of the expected tokens at the α of the time, scales what a
    round of it is worth at any later α; a γ that has not run takes the share interpolated between its
    measured neighbours (the nearest past the ends), and 1 before any has run."""
    costs = RoundCosts(CPU_LIKE)
    assert costs.tokens(4, 0.9) == pytest.approx(expected_tokens(0.9, 4))
    for _ in range(3):  # moved the batch half of what the i.i.d. model expects
        costs.observe(2, **_phases(CPU_LIKE, 2), advance=expected_tokens(1.0, 2) / 2, alpha=1.0)
        costs.observe(6, **_phases(CPU_LIKE, 6), advance=expected_tokens(1.0, 6) / 4, alpha=1.0)
    assert costs.tokens(2, 0.8) == pytest.approx(expected_tokens(0.8, 2) / 2)
    assert costs.tokens(6, 1.0) == pytest.approx(7 / 4)
    assert costs.efficiency_of(4) == pytest.approx((1 / 2 + 1 / 4) / 2)  # between 2 and 6
    assert costs.efficiency_of(1) == pytest.approx(1 / 2) and costs.efficiency_of(9) == pytest.approx(1 / 4)
    assert costs.tokens(0, 0.8) == 1.0
    assert costs.reach(9) == 9 and costs.reach(20) == 13  # at most 2 × 6 + 1 once 6 has run


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
    assert first.policy.estimate.alpha == pytest.approx(0.9)  # no earlier call: the default prior
    assert first.next_gamma(9) == 0  # the first round measures dense
    first.record(0, [], 0.0, 1.0)
    for _ in range(20):
        first.record(2, [RowStats(3, 1, 2, 2, 0, committed=3)], 0.16, 1.12, 3)  # fully accepted rounds
    first.finish()
    second = AutoSchedule.for_model(model, 9, (2, 64, 16), calibrate)
    assert len(calls) == 1 and second.policy.costs is first.policy.costs
    assert second.policy.estimate.alpha == pytest.approx(first.policy.estimate.alpha)
    assert second.policy.estimate.alpha > 0.9
    AutoSchedule.for_model(model, 9, (2, 128, 16), calibrate)  # another shape bucket calibrates again
    AutoSchedule.for_model(torch.nn.Linear(2, 2), 9, (2, 64, 16), calibrate)  # so does another model
    assert len(calls) == 3


# A CPU-like cost profile (the demo model at 4.6k visual tokens x batch 8, in dense steps): a draft reads
# a third of a dense step's bytes, and a verify of q tokens costs far more than one dense step.
CPU_LIKE = StepCosts.from_verifies(
    dense=1.0, draft=0.4, verifies=[(1, 1.0), (2, 1.25), (3, 1.45), (5, 1.8), (10, 2.7)]
)


def test_verify_costs_follow_the_measured_points() -> None:
    assert CPU_LIKE.verify(1) == 1.0 and CPU_LIKE.verify(3) == pytest.approx(1.45)
    assert CPU_LIKE.verify(4) == pytest.approx(1.625)  # between the measured sizes: linear
    assert CPU_LIKE.verify(12) == pytest.approx(2.7 + 2 * 0.9 / 5)  # past the last: its slope
    assert (CPU_LIKE.verify_base, CPU_LIKE.verify_per_token) == pytest.approx((1.0 - 1.7 / 9, 1.7 / 9))
    assert verify_sizes(9) == [2, 3, 5, 10] and verify_sizes(1) == [2] and verify_sizes(3) == [2, 3, 4]


def test_auto_picks_gamma_from_the_measured_costs() -> None:
    """With the CPU's steep verify, the demo model's acceptance makes γ = 3-5 best, not 9; with a flat
    verify (a GPU's), long rounds win."""
    assert 3 <= best_gamma(CPU_LIKE, 0.925, 9) <= 5
    policy = AutoPolicy(RoundCosts(CPU_LIKE), gamma_max=9, prior_alpha=0.925)
    policy.record([], gamma=0, **_phases(CPU_LIKE, 0))
    assert policy.choose() == best_gamma(CPU_LIKE, 0.925, 9)
    flat = StepCosts.from_verifies(dense=1.0, draft=0.3, verifies=[(1, 1.0), (10, 1.1)])
    assert best_gamma(flat, 0.925, 9) >= 6 > best_gamma(CPU_LIKE, 0.925, 9)


def test_dense_rounds_cost_a_counter_not_a_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where dense wins, the policy re-decides only every few rounds: auto's dense rounds must cost what
    dense mode's cost."""
    from std_core import auto

    searches = []
    real = auto.round_rates
    monkeypatch.setattr(auto, "round_rates", lambda *a: searches.append(1) or real(*a))
    costs = StepCosts(dense_step=1.0, draft_step=1.0, verify_base=1.0, verify_per_token=0.05)
    policy = AutoPolicy(RoundCosts(costs), gamma_max=9, prior_alpha=0.0)
    gammas = []
    for _ in range(160):
        gammas.append(policy.choose())
        policy.record(
            [RowStats(1, 1, 2, 0, 1)] if gammas[-1] else [], gamma=gammas[-1], **_phases(costs, gammas[-1])
        )
    # one probe measures what a draft really costs (the calibration's is a guess); then dense only
    assert gammas.count(2) == 1 and gammas[-100:] == [0] * 100
    assert len(searches) <= 2 * (160 // 8 + 1) + 1  # a decision: at α and at α = 1; the probe's


def test_near_equal_choices_do_not_alternate() -> None:
    """Dense and drafting predicted within a few percent: measured jitter must not flip the choice
    every decision (each switch to drafting first copies what the sparse cache missed)."""
    costs = StepCosts(dense_step=1.0, draft_step=0.1, verify_base=1.05, verify_per_token=0.0)
    shared = RoundCosts(costs)
    policy = AutoPolicy(shared, gamma_max=1, prior_alpha=0.5)  # γ = 1: 1.5 tokens per 1.15 s vs 1 per 1 s
    choices = []
    for i in range(400):
        gamma = policy.choose()
        choices.append(gamma)
        jitter = 1.0 + (0.02 if i % 2 else -0.02)
        outcome = [RowStats(2, 1, 1, 1, 0)] if i % 2 else [RowStats(1, 1, 1, 0, 1)]  # α stays 0.5
        policy.record(
            outcome if gamma else [], gamma=gamma, **_phases(costs, gamma, jitter), advance=_advance(outcome)
        )
    switches = sum(a != b for a, b in zip(choices, choices[1:], strict=False))
    assert switches <= 4, choices


def test_a_fully_accepted_probe_switches_to_drafting() -> None:
    """Drafting wins only at an acceptance near 1 (a draft costs 80% of a dense step) and every draft is
    accepted: a short probe barely moves the estimate, but its measured progress (3 tokens a round for
    the rows behind) makes drafting the better choice at once, and longer rounds follow."""
    costs = StepCosts(dense_step=1.0, draft_step=0.8, verify_base=1.0, verify_per_token=0.0)
    assert break_even_alpha(costs, 9) > 0.95
    policy = AutoPolicy(RoundCosts(costs), gamma_max=9, prior_alpha=0.6)
    gammas = []
    for _ in range(200):
        gamma = policy.choose()
        gammas.append(gamma)
        accepted = [RowStats(gamma + 1, 1, gamma, gamma, 0, committed=gamma + 1)] if gamma else []
        policy.record(accepted, gamma=gamma, **_phases(costs, gamma), advance=_advance(accepted))
    first = next(i for i, g in enumerate(gammas) if g)
    assert first == 16 and gammas[first] == 2 and all(gammas[first + 1 : first + 40]), gammas[:60]
    assert all(g >= 5 for g in gammas[-50:]), gammas[-50:]  # then it drafts every round


def test_the_rows_a_batch_waits_for_decide_what_a_round_is_worth() -> None:
    """The pooled acceptance says long rounds win; but the batch's slowest row moves 2 tokens a round
    of 6 drafts (the batch waits for it): auto must stop drafting long rounds it measured to be worth
    little, whatever α says."""
    policy = AutoPolicy(RoundCosts(CPU_LIKE), gamma_max=9, prior_alpha=0.95)
    policy.record([], gamma=0, **_phases(CPU_LIKE, 0))
    first = policy.choose()
    assert first >= 3
    behind = [RowStats(2, 1, first, 1, 1, committed=2)]  # the lagging row: one draft, then a rejection
    for _ in range(3):
        policy.record(behind, gamma=first, **_phases(CPU_LIKE, first), advance=_advance(behind))
        policy.estimate.update(10 * first, 0)  # the other rows keep the pooled estimate high
    assert policy.choose() != first


def test_costs_measured_under_a_burst_of_load_are_measured_again() -> None:
    """A probe that measured a draft step at three dense steps (a shared machine's burst of load) makes
    drafting look hopeless even at α = 1; auto still probes, at the longest interval, and drafts again
    once probes measure the real cost."""
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    burst = StepCosts(dense_step=1.0, draft_step=3.0, verify_base=1.0, verify_per_token=0.04)
    policy = AutoPolicy(RoundCosts(costs), gamma_max=9, prior_alpha=1.0)
    gammas: list[int] = []
    for _ in range(1200):
        gamma = policy.choose()
        measured = burst if not any(gammas) else costs  # only the first drafted round is in the burst
        gammas.append(gamma)
        outcome = [RowStats(gamma + 1, 1, gamma, gamma, 0)] if gamma else []  # every draft accepted
        policy.record(outcome, gamma=gamma, **_phases(measured, gamma), advance=_advance(outcome))
    drafted = [i for i, g in enumerate(gammas) if g]
    assert gammas[1] == 9 and gammas[2:40] == [0] * 38, gammas[:40]  # the burst made drafting look hopeless
    probes = [i for i in drafted if gammas[i] == 2]
    assert probes and probes[0] - 1 == 16 * 16, probes  # still probed, at the longest interval
    assert sum(1 for g in gammas[probes[-1] :] if g > 2) > 100  # and drafts again once measured anew
