"""``mode="auto"``: pick γ per round (0 = plain dense decoding) from measured step costs and acceptance.

The I/O model of a round with γ drafts (:mod:`std_core.costs`): it costs ``γ · draft + verify(γ + 1)``
and commits, when each draft is accepted independently with probability α,
``E[tokens] = (1 − α^(γ+1)) / (1 − α)`` tokens, but never more than the call has left. Dense decoding
costs ``dense`` per token. Auto picks the γ with the most tokens per second, γ = 0 when no γ beats
dense. Step costs start from a short calibration on the call's own caches (a dense step, a draft step
and verifies of a few sizes, :func:`verify_sizes`: on a CPU a verify's cost is far from flat in its
tokens, which is what makes small γ win there); a γ that has run then costs what its rounds measured
(:class:`RoundCosts`: the draft and verify phases of every round and its wall time between host
syncs, so timing adds none), each the median of its recent rounds, so one slow round on a shared
machine moves nothing.

What a round is worth is measured too. α is the acceptance of the *batch*: how far each drafted round
moved it (``Rows.advance``: the batch decodes until its slowest row is done, so of 8 rows that each
accept 97% of drafts, a round of 4 moves it ~3.2 tokens, not 4.7). And a round is worth at most what
is left of the call: the steps a call takes are learned from earlier calls that ended before their
budget (on the demo model's captions, 13), so near the end of a call a long round buys nothing.
Both are kept per model, device, dtype and shape bucket, across calls: a short call (a caption's 3
rounds) decides from what the calls before it measured, not from its own few rounds.

Two kinds of error are guarded against. The acceptance is uncertain while the evidence is thin (a
single probe round that hit a rejection says little): auto *decides* with the estimate but *explores*
with its optimistic end (:meth:`AcceptanceEstimate.upper`): which γ a probe tries, and whether a
probe is worth making at all. The costs of a γ that has not run are the calibration's, whose error on
a CPU is about ``_DRAFT_MARGIN``: auto leaves dense for such a γ only for a predicted gain that large,
and for a γ whose rounds it has measured (``MEASURED_ROUNDS`` of them) for ``_MEASURED_MARGIN``.

The policy must cost nothing next to a dense step, so that auto never loses where dense wins: it
re-decides after every drafted round (α moved) but only every ``_REDECIDE_EVERY`` rounds while it
runs dense (a dense round's time barely moves the rates), and keeps its current γ unless another is
predicted ``_SWITCH_MARGIN`` faster (two near-equal choices must not alternate: every switch to
drafting first copies the tokens the sparse cache missed). Whatever it picks, the output is the dense
model's (every token is verified).

The decoder sees only a :class:`RoundSchedule`: it asks it for each round's γ and tells it the round's
outcomes. :class:`FixedSchedule` is ``mode="std"`` (γ every round) and ``mode="dense"`` (γ = 0);
:class:`AutoSchedule` is ``mode="auto"`` and owns the per-model caches, the calibration call and the
round timing.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from std_core.costs import (
    _DEFAULT_ALPHA,
    MEASURED_ROUNDS,
    PROBE_EVERY,
    AcceptanceEstimate,
    RoundCosts,
    StepCosts,
    best_gamma,
    break_even_alpha,
    expected_tokens,
    round_rates,
    round_worths,
    time_forward,
    time_forwards,
    verify_sizes,
)
from std_core.stats import RowStats

__all__ = [  # the cost model lives in std_core.costs; its names are auto's vocabulary too
    "AcceptanceEstimate", "AutoPolicy", "AutoSchedule", "FixedSchedule", "RoundCosts", "RoundSchedule",
    "StepCosts", "best_gamma", "break_even_alpha", "expected_tokens", "round_rates", "round_worths",
    "shape_bucket", "time_forward", "time_forwards", "verify_sizes",
]  # fmt: skip

_MAX_PROBE_EVERY = 16 * PROBE_EVERY  # the longest interval between probes (rounds, across calls)
_REDECIDE_EVERY = 8  # dense rounds between two decisions (drafted rounds re-decide at once)
_SWITCH_MARGIN = 0.015  # another γ must be predicted this much faster to replace the current one
# ... and drafting this much faster than dense to replace dense, for a γ whose rounds are the
# calibration's guess (one-shot, on a shared machine: about this far off on a CPU) ...
_DRAFT_MARGIN = 0.10
_MEASURED_MARGIN = 0.03  # ... or this much, for a γ that costs what its own rounds measured


class AutoPolicy:
    """Chooses each round's γ for one ``generate`` call over ``costs``, which later calls share.

    Dense-only rounds are measured once early, so γ = 0 is compared on measured time too. Where
    dense wins but StD could still win (at the optimistic end of the acceptance), or what a draft
    costs is still the calibration's guess, a probe round of the γ that would win there re-measures
    acceptance and costs every ``costs.probe_every`` dense rounds (counted across calls); the interval
    doubles after every probe that leaves dense the better choice even at the optimistic end (a
    conclusive failure; up to 16×) and resets after any other. Where drafting cannot win even then, it still probes, at
    the longest interval (``_MAX_PROBE_EVERY`` rounds, under 1% of a dense decode): those costs are
    measurements, and one taken during a burst of load on a shared machine (a draft step measured at
    three dense steps) must not keep a bucket dense for the life of the process. Decisions are re-made
    lazily (see the module docstring), so a dense round costs a counter, not a search.
    """

    def __init__(self, costs: RoundCosts, gamma_max: int) -> None:
        self.costs = costs
        self.gamma_max = gamma_max
        self.gamma = 0  # the current decision
        self.can_win = True  # some γ beats dense at the optimistic acceptance (worth probing)
        self.steps = 0  # decode steps this call has taken (the sum of its rounds' advances)
        self._probe = min(1, gamma_max)  # the γ a probe would try
        self._budget = gamma_max + 1  # the most tokens the call may still commit in a round
        self._stale = True  # decide again before the next round
        self._since = 0  # rounds since the last decision
        self._probing = False  # the round just chosen is a probe

    @property
    def estimate(self) -> AcceptanceEstimate:
        """The batch acceptance of this model and shape bucket (shared across calls)."""
        return self.costs.acceptance

    def choose(self, limit: int | None = None) -> int:
        """γ of the next round; ``limit``: the most drafts the live rows can still use."""
        if limit is not None:
            self._budget = limit + 1
        if not self.costs.measured_dense:
            return 0
        if self._stale or self._since >= _REDECIDE_EVERY:
            self._decide()
        self._since += 1
        if self.gamma == 0:
            self.costs.since_probe += 1  # counted across calls: short calls probe as often as long ones
            interval = self.costs.probe_every if self.can_win else _MAX_PROBE_EVERY
            if self.costs.since_probe >= interval:
                self.costs.since_probe, self._probing = 0, True
                return self._probe
        return self.gamma

    def _margin(self, gamma: int) -> float:
        """How much faster than dense γ must be predicted to leave dense for it."""
        return _MEASURED_MARGIN if self.costs.measured_rounds(gamma) >= MEASURED_ROUNDS else _DRAFT_MARGIN

    def _decide(self) -> None:
        horizons = self.costs.horizons(self.steps, self._budget)
        rates = round_rates(self.costs, self.estimate.alpha, self.gamma_max, horizons)
        best = max(range(self.gamma_max + 1), key=lambda g: (rates[g], -g))
        margin = self._margin(best) if self.gamma == 0 else _SWITCH_MARGIN
        if rates[best] > rates[self.gamma] * (1 + margin):
            self.gamma = best
        # exploration, at the optimistic end of the acceptance: the γ a probe tries, and whether one is
        # worth it (or what a draft costs is still the calibration's guess)
        if self.gamma_max:
            upper = round_rates(self.costs, self.estimate.upper(), self.gamma_max, horizons)
            self._probe = max(range(1, self.gamma_max + 1), key=lambda g: (upper[g], -g))
            unmeasured = self.costs.draft.value is None
            self.can_win = self.gamma > 0 or unmeasured or upper[self._probe] > upper[0]
        else:
            self.can_win = False
        self._stale, self._since = False, 0

    def record(
        self,
        outcomes: Sequence[RowStats],
        gamma: int,
        seconds: float,
        draft_seconds: float = 0.0,
        verify_seconds: float | None = None,
        advance: int | None = None,
        cut: bool = False,
    ) -> None:
        """One round: the counts of the rows furthest behind, its wall seconds and those of its draft
        and verify phases (by default the whole round is the verify, i.e. no bookkeeping), how far it
        moved the batch (:attr:`std_core.rows.Rows.advance`; None: not known, and the rows' counts
        give the acceptance) and whether a row the batch waited for stopped in it (``Rows.cut``)."""
        if advance is not None:
            self.steps += advance
        if gamma > 0:
            if advance is None:
                self.estimate.update(sum(o.accepted for o in outcomes), sum(o.rejections for o in outcomes))
            self._stale = True
        verify = seconds - draft_seconds if verify_seconds is None else verify_seconds
        self.costs.observe(gamma, seconds, draft_seconds, verify, advance, cut)
        if self._probing:
            self._probing = False
            # a probe that leaves drafting better only at the optimistic end of the acceptance is
            # inconclusive: probe again as soon; one that leaves it worse even there (a row of the
            # batch may have accepted a draft by chance, or every draft where a draft costs what a
            # dense step does) has failed: probe half as often
            horizons = self.costs.horizons(0, self._budget)  # the whole call: where a probe would pay
            upper = round_rates(self.costs, self.estimate.upper(), self.gamma_max, horizons)
            could = any(upper[g] > upper[0] * (1 + self._margin(g)) for g in range(1, self.gamma_max + 1))
            backed_off = min(_MAX_PROBE_EVERY, 2 * self.costs.probe_every)
            self.costs.probe_every = PROBE_EVERY if could else backed_off

    def finish(self, budget_reached: bool = False) -> None:
        """The call is done; ``budget_reached``: its token budget, not its outputs, ended it."""
        self.costs.observe_call(self.steps, budget_reached)


class RoundSchedule(Protocol):
    """What the decoder asks for each round's γ and tells each round's outcomes."""

    def next_gamma(self, limit: int) -> int:
        """γ of the next round, at most ``limit`` (the drafts the live rows can still use)."""
        ...

    def record(
        self,
        gamma: int,
        outcomes: Sequence[RowStats],
        draft_seconds: float,
        verify_seconds: float,
        advance: int | None = None,
        cut: bool = False,
    ) -> None:
        """The round just rolled back: its γ, the counts of the rows furthest behind, the seconds of
        its draft and verify phases, how far it moved the batch (:attr:`std_core.rows.Rows.advance`)
        and whether a row the batch waited for stopped in it (:attr:`std_core.rows.Rows.cut`)."""
        ...

    def finish(self, budget_reached: bool = False) -> None:
        """The ``generate`` call is done; ``budget_reached``: a row used its whole token budget."""
        ...


class FixedSchedule:
    """The same γ every round: ``mode="std"`` (``StdConfig.gamma``) and ``mode="dense"`` (0)."""

    def __init__(self, gamma: int) -> None:
        self.gamma = gamma

    def next_gamma(self, limit: int) -> int:
        return min(self.gamma, limit)

    def record(
        self,
        gamma: int,
        outcomes: Sequence[RowStats],
        draft_seconds: float,
        verify_seconds: float,
        advance: int | None = None,
        cut: bool = False,
    ) -> None:
        pass

    def finish(self, budget_reached: bool = False) -> None:
        pass


# Per model (dropped with it): the round costs per (device, dtype, γ max, shape bucket), and the
# acceptance the model's last call ended with (the prior of a bucket the model has not run yet).
_ROUND_COSTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, RoundCosts]] = (
    weakref.WeakKeyDictionary()
)
_ACCEPTANCE: weakref.WeakKeyDictionary[torch.nn.Module, float] = weakref.WeakKeyDictionary()


class AutoSchedule:
    """``mode="auto"``: an :class:`AutoPolicy` over the model's shared :class:`RoundCosts`, timing each
    round from the choice of γ to the record (the roll-back's host sync ends a round, so the wall time
    is the round's and timing adds no sync)."""

    def __init__(self, model: torch.nn.Module, policy: AutoPolicy) -> None:
        self.model = model
        self.policy = policy
        self._start = 0.0  # perf_counter() when the current round's γ was chosen

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        gamma_max: int,
        bucket: tuple[int, int, int],
        calibrate: Callable[[], StepCosts],
    ) -> AutoSchedule:
        """The schedule of one call: round costs from the model's cache, else from ``calibrate()`` (a
        short measurement on the call's own caches) with the α prior from the model's last call."""
        param = next(model.parameters())
        per_model = _ROUND_COSTS.setdefault(model, {})
        key = (str(param.device), str(param.dtype), gamma_max, bucket)
        if key not in per_model:
            prior = AcceptanceEstimate(_ACCEPTANCE.get(model, _DEFAULT_ALPHA))
            per_model[key] = RoundCosts(calibrate(), prior)
        return cls(model, AutoPolicy(per_model[key], gamma_max))

    def next_gamma(self, limit: int) -> int:
        gamma = min(self.policy.choose(limit), limit)
        self._start = time.perf_counter()
        return gamma

    def record(
        self,
        gamma: int,
        outcomes: Sequence[RowStats],
        draft_seconds: float,
        verify_seconds: float,
        advance: int | None = None,
        cut: bool = False,
    ) -> None:
        seconds = time.perf_counter() - self._start
        self.policy.record(outcomes, gamma, seconds, draft_seconds, verify_seconds, advance, cut)

    def finish(self, budget_reached: bool = False) -> None:
        self.policy.finish(budget_reached)
        _ACCEPTANCE[self.model] = self.policy.estimate.alpha


def shape_bucket(batch: int, dense_length: int, sparse_length: int) -> tuple[int, int, int]:
    """Cost-cache key part: batch, and both cache lengths rounded up to a power of two."""
    return (
        batch,
        1 << max(0, math.ceil(math.log2(max(1, dense_length)))),
        1 << max(0, math.ceil(math.log2(max(1, sparse_length)))),
    )
