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
    round_worths,
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
    policy = AutoPolicy(RoundCosts(costs, AcceptanceEstimate(0.0)), gamma_max=9)
    assert policy.choose() == 0  # the first round measures dense
    policy.record([], gamma=0, **_phases(costs, 0))
    choices = [policy.choose() for _ in range(40)]
    assert choices.count(0) >= 36 and max(choices) > 0  # mostly dense, with short probes
    accepted_all = [RowStats(3, 1, 2, 2, 0), RowStats(3, 1, 2, 2, 0)]
    for _ in range(20):  # probes fully accepted
        policy.record(accepted_all, gamma=2, **_phases(costs, 2), advance=_advance(accepted_all))
    # the batch moved 3 tokens a round of 2: every draft accepted, so long rounds win at these costs
    assert policy.estimate.alpha > 0.9
    assert policy.choose() == best_gamma(costs, policy.estimate.alpha, 9) >= 6


def test_rejected_probes_back_off() -> None:
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    policy = AutoPolicy(RoundCosts(costs, AcceptanceEstimate(0.0)), gamma_max=9)
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
    shared = RoundCosts(costs, AcceptanceEstimate(0.0))

    def probe_rounds(calls: int, rounds: int, accepted: bool) -> list[int]:
        """The rounds (counted over all calls) that probed."""
        found, counted = [], 0
        for _ in range(calls):
            policy = AutoPolicy(shared, gamma_max=9)
            for _ in range(rounds):
                gamma = policy.choose()
                counted += 1
                if gamma:
                    found.append(counted)
                moved = gamma + 1 if accepted else 1  # every draft accepted, or the first rejected
                policy.record([], gamma=gamma, **_phases(costs, gamma), advance=moved if gamma else 1)
        return found

    failing = probe_rounds(calls=40, rounds=16, accepted=False)  # calls as short as the first interval
    gaps = [b - a for a, b in zip(failing, failing[1:], strict=False)]
    # round 1 measures dense; the first rejected probe leaves room at the optimistic end of the
    # acceptance (a draft costs 8% of a dense step here), each later one doubles the interval
    assert failing[0] == 17 and gaps == [16, 32, 64, 128, 256], failing
    assert shared.probe_every == 16 * 16  # at most 16x
    shared.probe_every, shared.since_probe, shared.acceptance = 16, 0, AcceptanceEstimate(0.0)
    assert len(probe_rounds(calls=4, rounds=16, accepted=True)) >= 1


def test_a_probe_with_a_lucky_acceptance_still_backs_off() -> None:
    """Eight rows, one of which accepts one draft by chance: dense stays better, so probes get rarer."""
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    shared = RoundCosts(costs, AcceptanceEstimate(0.0))
    policy = AutoPolicy(shared, gamma_max=9)
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
        costs.observe(1, seconds=1.65, draft_seconds=0.35, verify_seconds=1.265, advance=2)
    assert costs.round_seconds(0) == pytest.approx(1.0)
    assert costs.round_seconds(1) == pytest.approx(1.65)  # its own measured round, as it ran
    assert best_gamma(costs, 1.0, 1) == 1  # 2 tokens in 1.65 s against 1 in 1 s


def test_the_batch_acceptance_is_how_far_its_rounds_moved_it() -> None:
    """A round of γ that moved the batch ``a`` tokens accepted ``a − 1`` drafts and was ended by a
    rejection when ``a ≤ γ``; in a round in which a row the batch waited for stopped, the drafts it
    moved count and its end is no rejection; a dense round says nothing of drafts."""
    costs = RoundCosts(CPU_LIKE, AcceptanceEstimate(0.5, weight=0.0))
    costs.observe(4, **_phases(CPU_LIKE, 4), advance=5)  # every draft accepted
    costs.observe(4, **_phases(CPU_LIKE, 4), advance=2)  # one, then a rejection
    costs.observe(4, **_phases(CPU_LIKE, 4), advance=2, cut=True)  # the slowest row ended there
    costs.observe(0, **_phases(CPU_LIKE, 0), advance=1)
    assert costs.acceptance.alpha == pytest.approx(6 / 7)
    assert costs.acceptance.upper() > costs.acceptance.alpha  # 6 drafts of evidence: room to explore


def test_acceptance_evidence_fades_past_its_memory() -> None:
    estimate = AcceptanceEstimate(0.9)
    for _ in range(1000):
        estimate.update(0, 1)  # a workload that stopped accepting anything
    assert estimate.alpha < 0.01 and estimate.trials <= 256 + 1e-9
    assert estimate.upper() < 0.05  # conclusive: no more optimism than the evidence allows


def test_a_round_is_worth_at_most_what_is_left_of_the_call() -> None:
    """The steps calls take are learned from those that ended before their budget; a round is worth
    ``E[min(tokens, steps left)]`` over them, so no γ past what is left wins."""
    costs = RoundCosts(CPU_LIKE)
    for steps, budget_reached in ((13, False), (40, True), (7, False)):
        costs.observe_call(steps, budget_reached)
    assert list(costs.lengths) == [13, 7]  # the budget's call says nothing of how long outputs run
    assert costs.horizons(0, 31) == [13, 7] and costs.horizons(9, 22) == [4]
    assert costs.horizons(13, 18) == [18]  # past every learned length: the budget
    assert round_worths(1.0, 6, [4]) == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0]
    assert round_worths(1.0, 4, [4, 2]) == [1.0, 2.0, 2.5, 3.0, 3.0]
    assert round_worths(0.5, 2) == [1.0, 1.5, 1.75]  # no horizon: the expected tokens
    assert best_gamma(CPU_LIKE, 1.0, 9, [3]) <= 2 < best_gamma(CPU_LIKE, 1.0, 9)


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
    policy = AutoPolicy(RoundCosts(CPU_LIKE, AcceptanceEstimate(0.925)), gamma_max=9)
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
    policy = AutoPolicy(RoundCosts(costs, AcceptanceEstimate(0.0)), gamma_max=9)
    gammas = []
    for _ in range(160):
        gammas.append(policy.choose())
        policy.record(
            [RowStats(1, 1, 2, 0, 1)] if gammas[-1] else [], gamma=gammas[-1], **_phases(costs, gammas[-1])
        )
    # one probe measures what a draft really costs (the calibration's is a guess); then dense only
    assert sum(1 for g in gammas if g) == 1 and gammas[-100:] == [0] * 100
    assert len(searches) <= 2 * (160 // 8 + 1) + 1  # a decision: at α and at α = 1; the probe's


def test_near_equal_choices_do_not_alternate() -> None:
    """Dense and drafting predicted within a few percent: measured jitter must not flip the choice
    every decision (each switch to drafting first copies what the sparse cache missed)."""
    costs = StepCosts(dense_step=1.0, draft_step=0.1, verify_base=1.05, verify_per_token=0.0)
    shared = RoundCosts(costs, AcceptanceEstimate(0.5))
    policy = AutoPolicy(shared, gamma_max=1)  # γ = 1: 1.5 tokens per 1.15 s vs 1 per 1 s
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
    accepted: one probe (9 drafts against a prior of 0.6) leaves the estimate under break-even, but not
    the optimistic end of it, so auto probes again, and two fully accepted probes make drafting the
    better choice, for good."""
    costs = StepCosts(dense_step=1.0, draft_step=0.8, verify_base=1.0, verify_per_token=0.0)
    assert break_even_alpha(costs, 9) > 0.95
    policy = AutoPolicy(RoundCosts(costs, AcceptanceEstimate(0.6)), gamma_max=9)
    gammas = []
    for _ in range(200):
        gamma = policy.choose()
        gammas.append(gamma)
        accepted = [RowStats(gamma + 1, 1, gamma, gamma, 0, committed=gamma + 1)] if gamma else []
        policy.record(accepted, gamma=gamma, **_phases(costs, gamma), advance=_advance(accepted))
    first = next(i for i, g in enumerate(gammas) if g)
    second = next(i for i, g in enumerate(gammas) if g and i > first)
    assert first == 16 and second == 16 + 16, gammas[:60]  # the first probe was inconclusive; the second
    assert all(gammas[second : second + 40]), gammas[:100]  # made drafting the better choice
    assert all(g >= 5 for g in gammas[-50:]), gammas[-50:]  # then it drafts every round


def test_the_rows_a_batch_waits_for_decide_what_a_round_is_worth() -> None:
    """The pooled acceptance says long rounds win; but the batch's slowest row moves 2 tokens a round
    of 6 drafts (the batch waits for it): auto must stop drafting long rounds it measured to be worth
    little, whatever α says."""
    policy = AutoPolicy(RoundCosts(CPU_LIKE, AcceptanceEstimate(0.95)), gamma_max=9)
    policy.record([], gamma=0, **_phases(CPU_LIKE, 0))
    first = policy.choose()
    assert first >= 3
    behind = [RowStats(2, 1, first, 1, 1, committed=2)]  # the lagging row: one draft, then a rejection
    for _ in range(3):
        policy.record(behind, gamma=first, **_phases(CPU_LIKE, first), advance=_advance(behind))
    assert policy.choose() != first


def test_costs_measured_under_a_burst_of_load_are_measured_again() -> None:
    """A probe that measured a draft step at three dense steps (a shared machine's burst of load) makes
    drafting look hopeless even at α = 1; auto still probes, at the longest interval, and drafts again
    once probes measure the real cost."""
    costs = StepCosts(dense_step=1.0, draft_step=0.08, verify_base=1.0, verify_per_token=0.04)
    burst = StepCosts(dense_step=1.0, draft_step=3.0, verify_base=1.0, verify_per_token=0.04)
    policy = AutoPolicy(RoundCosts(costs, AcceptanceEstimate(1.0)), gamma_max=9)
    gammas: list[int] = []
    for _ in range(1200):
        gamma = policy.choose()
        measured = burst if not any(gammas) else costs  # only the first drafted round is in the burst
        gammas.append(gamma)
        outcome = [RowStats(gamma + 1, 1, gamma, gamma, 0)] if gamma else []  # every draft accepted
        policy.record(outcome, gamma=gamma, **_phases(measured, gamma), advance=_advance(outcome))
    drafted = [i for i, g in enumerate(gammas) if g]
    assert gammas[1] == 9 and gammas[2:40] == [0] * 38, gammas[:40]  # the burst made drafting look hopeless
    assert drafted[1] - 1 == 16 * 16, drafted[:5]  # still probed, at the longest interval
    assert sum(1 for g in gammas[drafted[1] :] if g > 2) > 100  # and drafts again once measured anew


# The demo model at 4.6k visual tokens x batch 8 on the development CPU (2026-12-04, in dense steps): a
# draft step 0.42, a verify of 5 tokens 2.1 and of 10 tokens 2.9; its captions take 13 decode steps.
DEMO_LIKE = StepCosts.from_verifies(
    dense=1.0, draft=0.42, verifies=[(1, 1.0), (2, 1.27), (3, 1.6), (5, 2.1), (10, 2.9)]
)


def _simulate(
    beta: float,
    calls: int,
    steps: int = 13,
    budget: int = 31,
    reject_first: bool = False,
    fixed: int | None = None,
    seed: int = 0,
) -> tuple[list[list[int]], float]:
    """Calls of ``steps`` decode steps under DEMO_LIKE costs, by auto through one shared
    :class:`RoundCosts` (or by ``fixed`` γ), each draft accepted with probability ``beta`` (the first
    drafted round rejected at once, if asked): the γ of every call's rounds, and the time of the last
    half of the calls as a share of dense decoding's."""
    import random

    rng = random.Random(seed)
    shared = RoundCosts(DEMO_LIKE)
    per_call: list[list[int]] = []
    seconds = 0.0
    for call in range(calls):
        policy, done, gammas = AutoPolicy(shared, gamma_max=9), 0, []
        while done < steps:
            limit = budget - done - 1
            gamma = min(policy.choose(limit) if fixed is None else fixed, limit)
            accepted, first = 0, reject_first and not any(map(any, [*per_call, gammas]))
            while accepted < gamma and not first and rng.random() < beta:
                accepted += 1
            advance = min(accepted + 1, steps - done)
            phases = _phases(DEMO_LIKE, gamma)
            policy.record([], gamma=gamma, **phases, advance=advance, cut=done + advance == steps)
            done += advance
            gammas.append(gamma)
            seconds += phases["seconds"] if call >= calls // 2 else 0.0
        policy.finish(budget_reached=False)
        per_call.append(gammas)
    return per_call, seconds / ((calls - calls // 2) * steps * DEMO_LIKE.dense_step)


def _best_fixed(beta: float, calls: int) -> float:
    """The time share of the best fixed γ on the same draws."""
    return min(_simulate(beta, calls, fixed=gamma)[1] for gamma in range(1, 10))


def test_one_rejected_probe_does_not_keep_auto_dense() -> None:
    """The demo model at 4.6k x 8 (2026-12-04): fixed γ = 4 was 1.09-1.18x dense, and auto stayed dense
    because its first probe hit a rejection. With 95% of drafts accepted, a first probe rejected at
    once must not end the exploration: auto drafts and beats dense."""
    per_call, ratio = _simulate(beta=0.95, calls=30, reject_first=True)
    assert all(any(gammas) for gammas in per_call[15:]), per_call
    # rounds that end with the call beat any fixed γ here (0.86 against 0.91 of dense's time)
    assert ratio < min(0.9, 1.03 * _best_fixed(0.95, 30)), (ratio, per_call[-3:])


def test_rounds_end_with_the_call() -> None:
    """Once the calls' length is learned, a round drafts no more than what is left of the call."""
    per_call, _ = _simulate(beta=1.0, calls=10)
    for gammas in per_call[1:]:
        left = 13
        for gamma in gammas:
            assert gamma <= left - 1, gammas
            left -= min(gamma + 1, left)


def test_auto_stays_dense_where_drafts_are_mostly_rejected() -> None:
    """At 30% acceptance no γ beats dense on these costs: after its probes, auto runs dense, and its
    probes cost it under 3% over the calls."""
    per_call, ratio = _simulate(beta=0.3, calls=60)
    assert sum(g > 0 for gammas in per_call[30:] for g in gammas) <= 3, per_call[30:]
    assert ratio < 1.03, ratio
