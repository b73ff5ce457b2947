"""``mode="auto"``: pick γ per round (0 = plain dense decoding) from measured step costs and acceptance.

The I/O model of a round with γ drafts (:mod:`std_core.costs`): it costs ``γ · draft + verify(γ + 1)``
and commits, when each draft is accepted independently with probability α,
``E[tokens] = (1 − α^(γ+1)) / (1 − α)`` tokens. Dense decoding costs ``dense`` per token. Auto picks
the γ with the most tokens per second, γ = 0 when no γ beats dense. Step costs start from a short
calibration on the call's own caches (a dense step, a draft step and verifies of a few sizes,
:func:`verify_sizes`: on a CPU a verify's cost is far from flat in its tokens, which is what makes
small γ win there) and are then replaced by what the rounds themselves measured (:class:`RoundCosts`:
the draft and verify phases of every round and its wall time between host syncs, so timing adds
none; a dense round's own time for γ = 0), each the median of its recent rounds, so one slow round on
a shared machine moves nothing; both are kept per model, device, dtype and shape bucket.

What a round is worth is measured too: a batch decodes until its slowest row is done, and a short
call's last round commits only what is left, so a γ that has run is worth the share of
``E[tokens]`` by which it actually moved the batch (``Rows.advance``; on the demo model's 7- or
14-token captions, rounds of 4 drafts at α ≈ 0.97 moved it 3.25 tokens each, not 4.7), and one
that has not, the share of its measured neighbours. So that an optimistic guess for a γ far past
the measured ones is not taken in one jump, a decision considers rounds up to one more than twice
the longest that has run. α is the running estimate of the current batch, starting from what
earlier batches of the same model saw, from the rows that are furthest behind. Whatever it picks,
the output is the dense model's (every token is verified).

The policy must cost nothing next to a dense step, so that auto never loses where dense wins: it
re-decides after every drafted round (α moved) but only every ``_REDECIDE_EVERY`` rounds while it
runs dense (a dense round's time barely moves the rates), and keeps its current γ unless another is
predicted ``_SWITCH_MARGIN`` faster (two near-equal choices must not alternate: every switch to
drafting first copies the tokens the sparse cache missed); it leaves dense only for a predicted gain
of ``_DRAFT_MARGIN``, the size of the model's own error on a CPU.

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
    PROBE_EVERY,
    PROBE_GAMMA,
    RoundCosts,
    StepCosts,
    best_gamma,
    break_even_alpha,
    expected_tokens,
    round_rates,
    time_forward,
    time_forwards,
    verify_sizes,
)
from std_core.stats import RowStats

__all__ = [  # the cost model lives in std_core.costs; its names are auto's vocabulary too
    "AcceptanceEstimate", "AutoPolicy", "AutoSchedule", "FixedSchedule", "RoundCosts", "RoundSchedule",
    "StepCosts", "best_gamma", "break_even_alpha", "expected_tokens", "round_rates", "shape_bucket",
    "time_forward", "time_forwards", "verify_sizes",
]  # fmt: skip

_PRIOR_ROUNDS = 2.0  # weight of the prior acceptance, in rounds
_DEFAULT_ALPHA = 0.9  # the prior of a model's first call: the paper's acceptance profile (62% at γ = 9)
_MAX_PROBE_EVERY = 16 * PROBE_EVERY  # the longest interval between probes (rounds, across calls)
_REDECIDE_EVERY = 8  # dense rounds between two decisions (drafted rounds re-decide at once)
_SWITCH_MARGIN = 0.015  # another γ must be predicted this much faster to replace the current one
# ... and drafting this much faster than dense to replace dense: the cost model's error on a CPU
# (one-shot calibration on a shared machine, short captions whose last round is cut) is about this
# large, and where drafting wins by less, dense is within that error of the best anyway
_DRAFT_MARGIN = 0.10


class AcceptanceEstimate:
    """Running estimate of the per-draft acceptance α from rounds of truncated-geometric outcomes:
    α̂ = accepted / (accepted + rejections), with a prior worth a couple of rounds."""

    def __init__(self, prior: float = _DEFAULT_ALPHA) -> None:
        self.accepted = prior * _PRIOR_ROUNDS
        self.rejections = (1.0 - prior) * _PRIOR_ROUNDS

    def update(self, accepted: int, rejections: int) -> None:
        """Record one round: drafts accepted and rounds ended by a rejection, over the live rows."""
        self.accepted += accepted
        self.rejections += rejections

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejections)


class AutoPolicy:
    """Chooses each round's γ for one ``generate`` call; ``costs`` is shared with later calls.

    Dense-only rounds are measured once early, so γ = 0 is compared on measured time too. Where
    dense wins but StD could (at α = 1) still win, or what a draft costs is still the calibration's
    guess, a short probe round re-measures acceptance, progress and the draft step every
    ``costs.probe_every`` dense rounds (counted across calls); the interval doubles after every probe
    that leaves dense the better choice (up to 16×) and resets after one that makes drafting the
    better choice. Where drafting cannot win even at α = 1 by the current costs, it still probes, at
    the longest interval (``_MAX_PROBE_EVERY`` rounds, under 1% of a dense decode): those costs are
    measurements, and one taken during a burst of load on a shared machine (a draft step measured at
    three dense steps) must not keep a bucket dense for the life of the process. Decisions are re-made
    lazily (see the module docstring), so a dense round costs a counter, not a search.
    """

    def __init__(self, costs: RoundCosts, gamma_max: int, prior_alpha: float) -> None:
        self.costs = costs
        self.gamma_max = gamma_max
        self.estimate = AcceptanceEstimate(prior_alpha)
        self.gamma = 0  # the current decision
        self.can_win = True  # some γ beats dense at α = 1 (worth probing while dense is chosen)
        self._stale = True  # decide again before the next round
        self._since = 0  # rounds since the last decision
        self._probing = False  # the round just chosen is a probe

    def choose(self) -> int:
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
                return min(PROBE_GAMMA, self.gamma_max)
        return self.gamma

    def _decide(self) -> None:
        rates = round_rates(self.costs, self.estimate.alpha, self.gamma_max)
        best = max(range(self.costs.reach(self.gamma_max) + 1), key=lambda g: (rates[g], -g))
        margin = _DRAFT_MARGIN if self.gamma == 0 else _SWITCH_MARGIN
        if rates[best] > rates[self.gamma] * (1 + margin):
            self.gamma = best
        # drafting could win at α = 1, or its cost is still the calibration's guess: worth probing
        unmeasured = self.costs.draft.value is None
        self.can_win = self.gamma > 0 or unmeasured or best_gamma(self.costs, 1.0, self.gamma_max) > 0
        self._stale, self._since = False, 0

    def record(
        self,
        outcomes: Sequence[RowStats],
        gamma: int,
        seconds: float,
        draft_seconds: float = 0.0,
        verify_seconds: float | None = None,
        advance: int | None = None,
    ) -> None:
        """One round: the counts of the rows furthest behind, its wall seconds and those of its draft
        and verify phases (by default the whole round is the verify, i.e. no bookkeeping), and how far
        it moved the batch (:attr:`std_core.rows.Rows.advance`; None: not known)."""
        if gamma > 0:
            self.estimate.update(sum(o.accepted for o in outcomes), sum(o.rejections for o in outcomes))
            self._stale = True
        verify = seconds - draft_seconds if verify_seconds is None else verify_seconds
        self.costs.observe(gamma, seconds, draft_seconds, verify, advance, self.estimate.alpha)
        if self._probing:
            self._probing = False
            # a probe that would not switch the policy to drafting has failed, even if a row of the
            # batch accepted a draft by chance, or every draft (where a draft costs what a dense step does)
            rates = round_rates(self.costs, self.estimate.alpha, self.gamma_max)
            switches = max(rates[1:]) > rates[0] * (1 + _DRAFT_MARGIN)
            backed_off = min(_MAX_PROBE_EVERY, 2 * self.costs.probe_every)
            self.costs.probe_every = PROBE_EVERY if switches else backed_off


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
    ) -> None:
        """The round just rolled back: its γ, the counts of the rows furthest behind, the seconds of
        its draft and verify phases, and how far it moved the batch (:attr:`std_core.rows.Rows.advance`)."""
        ...

    def finish(self) -> None:
        """The ``generate`` call is done."""
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
    ) -> None:
        pass

    def finish(self) -> None:
        pass


# Per model (dropped with it): the round costs per (device, dtype, γ max, shape bucket), and the
# acceptance the model's last call ended with (the next call's prior).
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
        short measurement on the call's own caches); the α prior from the model's last call."""
        param = next(model.parameters())
        per_model = _ROUND_COSTS.setdefault(model, {})
        key = (str(param.device), str(param.dtype), gamma_max, bucket)
        if key not in per_model:
            per_model[key] = RoundCosts(calibrate())
        return cls(model, AutoPolicy(per_model[key], gamma_max, _ACCEPTANCE.get(model, _DEFAULT_ALPHA)))

    def next_gamma(self, limit: int) -> int:
        gamma = min(self.policy.choose(), limit)
        self._start = time.perf_counter()
        return gamma

    def record(
        self,
        gamma: int,
        outcomes: Sequence[RowStats],
        draft_seconds: float,
        verify_seconds: float,
        advance: int | None = None,
    ) -> None:
        seconds = time.perf_counter() - self._start
        self.policy.record(outcomes, gamma, seconds, draft_seconds, verify_seconds, advance)

    def finish(self) -> None:
        _ACCEPTANCE[self.model] = self.policy.estimate.alpha


def shape_bucket(batch: int, dense_length: int, sparse_length: int) -> tuple[int, int, int]:
    """Cost-cache key part: batch, and both cache lengths rounded up to a power of two."""
    return (
        batch,
        1 << max(0, math.ceil(math.log2(max(1, dense_length)))),
        1 << max(0, math.ceil(math.log2(max(1, sparse_length)))),
    )
