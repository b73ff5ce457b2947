"""``mode="auto"``: pick γ per round (0 = plain dense decoding) from measured step costs and acceptance.

The I/O model of a round with γ drafts: it costs ``γ · draft + verify(γ + 1)`` and commits, when each
draft is accepted independently with probability α, ``E[tokens] = (1 − α^(γ+1)) / (1 − α)`` tokens.
Dense decoding costs ``dense`` per token. Auto picks the γ with the most tokens per second, γ = 0
when no γ beats dense. Round costs start from a short calibration on the call's own caches (a few
forwards that are rolled back) and are then replaced by what rounds of each γ actually took (timed
between the round's host syncs, so timing adds none); both are kept per model, device, dtype and shape
bucket. α is the running estimate of the current batch, starting from what earlier batches of the
same model saw. Whatever it picks, the output is the dense model's (every token is verified).

The decoder sees only a :class:`RoundSchedule`: it asks it for each round's γ and tells it the round's
outcomes. :class:`FixedSchedule` is ``mode="std"`` (γ every round) and ``mode="dense"`` (γ = 0);
:class:`AutoSchedule` is ``mode="auto"`` and owns the per-model caches, the calibration call and the
round timing.
"""

from __future__ import annotations

import math
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from std_core.stats import RowStats

_PROBE_EVERY = 16  # dense rounds between two short StD rounds that re-measure acceptance
_PROBE_GAMMA = 2
_PRIOR_ROUNDS = 2.0  # weight of the prior acceptance, in rounds
_DEFAULT_ALPHA = 0.6
_EMA = 0.5  # weight of the newest measured round in a γ's average


@dataclass(frozen=True)
class StepCosts:
    """Seconds per forward of the whole batch: a dense step (1 token), a draft step (1 token, sparse
    cache), and a verify of q tokens modelled as ``verify_base + verify_per_token · q``."""

    dense_step: float
    draft_step: float
    verify_base: float
    verify_per_token: float

    def verify(self, q: int) -> float:
        return self.verify_base + self.verify_per_token * q

    def round_seconds(self, gamma: int) -> float:
        return self.dense_step if gamma == 0 else gamma * self.draft_step + self.verify(gamma + 1)

    def speedup(self, alpha: float, gamma: int) -> float:
        """Decode speedup over dense of fixed-γ rounds at per-draft acceptance α (the projection)."""
        return expected_tokens(alpha, gamma) / self.round_seconds(gamma) * self.dense_step

    @classmethod
    def from_measurements(
        cls, dense: float, draft: float, verify_1: float, verify_q: float, q: int
    ) -> StepCosts:
        per_token = max(0.0, (verify_q - verify_1) / (q - 1)) if q > 1 else 0.0
        return cls(dense, draft, max(0.0, verify_1 - per_token), per_token)


class RoundCostModel(Protocol):
    def round_seconds(self, gamma: int) -> float: ...


@dataclass
class RoundCosts:
    """Seconds of a round per γ: the calibration's model, replaced by an average of measured rounds
    where rounds of that γ ran (unmeasured γ are scaled by how far measurements strayed from the model).

    Shared by the calls on one model and shape bucket, like the probe interval: a workload whose probes
    keep failing probes ever more rarely, across calls, not only within one."""

    calibrated: StepCosts
    observed: dict[int, float] = field(default_factory=dict)
    probe_every: int = _PROBE_EVERY  # dense rounds between probes (doubles after each failed probe)
    _scale: float | None = field(default=None, init=False, repr=False)  # cached; reset by observe

    def round_seconds(self, gamma: int) -> float:
        if gamma in self.observed:
            return self.observed[gamma]
        model = self.calibrated.round_seconds(gamma)
        if not self.observed:
            return model
        if self._scale is None:  # computed once per round, not once per γ the policy compares
            self._scale = statistics.median(
                t / self.calibrated.round_seconds(g) for g, t in self.observed.items()
            )
        return model * self._scale

    def observe(self, gamma: int, seconds: float) -> None:
        old = self.observed.get(gamma)
        self.observed[gamma] = seconds if old is None else (1 - _EMA) * old + _EMA * seconds
        self._scale = None


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens committed by a round of γ drafts (bonus included) at per-draft acceptance α."""
    if gamma == 0:
        return 1.0
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def best_gamma(costs: RoundCostModel, alpha: float, gamma_max: int) -> int:
    """The γ in ``0..gamma_max`` with the most tokens per second (0: dense is best)."""
    rates = [expected_tokens(alpha, g) / costs.round_seconds(g) for g in range(gamma_max + 1)]
    return max(range(gamma_max + 1), key=lambda g: (rates[g], -g))


def break_even_alpha(costs: StepCosts, gamma: int) -> float:
    """The acceptance at which γ-draft rounds match dense decoding (1.0 if they never do)."""
    lo, hi = 0.0, 1.0
    if costs.speedup(1.0, gamma) <= 1.0:
        return 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if costs.speedup(mid, gamma) < 1.0 else (lo, mid)
    return hi


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
    dense wins but StD could (at α = 1) still win, a short probe round re-measures acceptance every
    ``costs.probe_every`` dense rounds; the interval doubles after every probe that leaves dense the
    better choice (up to 16×) and resets after one that makes drafting the better choice.
    """

    def __init__(self, costs: RoundCosts, gamma_max: int, prior_alpha: float) -> None:
        self.costs = costs
        self.gamma_max = gamma_max
        self.estimate = AcceptanceEstimate(prior_alpha)
        self.dense_rounds = 0

    def choose(self) -> int:
        if 0 not in self.costs.observed:
            return 0
        gamma = best_gamma(self.costs, self.estimate.alpha, self.gamma_max)
        if gamma == 0 and best_gamma(self.costs, 1.0, self.gamma_max) > 0:
            self.dense_rounds += 1
            if self.dense_rounds % self.costs.probe_every == 0:
                return min(_PROBE_GAMMA, self.gamma_max)
        return gamma

    def record(self, outcomes: list, gamma: int, seconds: float) -> None:
        """One round: the live rows' counts (``RowStats``) and its wall seconds."""
        if gamma > 0:
            accepted = sum(o.accepted for o in outcomes)
            self.estimate.update(accepted, sum(o.rejections for o in outcomes))
        self.costs.observe(gamma, seconds)
        if gamma > 0 and self.dense_rounds and gamma == min(_PROBE_GAMMA, self.gamma_max):
            # a probe that would not switch the policy to drafting counts as failed, even if a row
            # of the batch accepted a draft by chance
            switches = best_gamma(self.costs, self.estimate.alpha, self.gamma_max) > 0
            backed_off = min(16 * _PROBE_EVERY, 2 * self.costs.probe_every)
            self.costs.probe_every = _PROBE_EVERY if switches else backed_off


class RoundSchedule(Protocol):
    """What the decoder asks for each round's γ and tells each round's outcomes."""

    def next_gamma(self, limit: int) -> int:
        """γ of the next round, at most ``limit`` (the drafts the live rows can still use)."""
        ...

    def record(self, gamma: int, outcomes: Sequence[RowStats]) -> None:
        """The round just rolled back: its γ and the live rows' counts."""
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

    def record(self, gamma: int, outcomes: Sequence[RowStats]) -> None:
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

    def record(self, gamma: int, outcomes: Sequence[RowStats]) -> None:
        self.policy.record(list(outcomes), gamma, time.perf_counter() - self._start)

    def finish(self) -> None:
        _ACCEPTANCE[self.model] = self.policy.estimate.alpha


def shape_bucket(batch: int, dense_length: int, sparse_length: int) -> tuple[int, int, int]:
    """Cost-cache key part: batch, and both cache lengths rounded up to a power of two."""
    return (
        batch,
        1 << max(0, math.ceil(math.log2(max(1, dense_length)))),
        1 << max(0, math.ceil(math.log2(max(1, sparse_length)))),
    )


def time_forward(forward: Callable[[], object], roll_back: Callable[[], None], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` timed calls of ``forward`` after one warm-up, each followed
    by ``roll_back`` (outside the timing). Synchronises CUDA around each call."""
    best = float("inf")
    for attempt in range(repeats + 1):
        _synchronize()
        start = time.perf_counter()
        forward()
        _synchronize()
        elapsed = time.perf_counter() - start
        roll_back()
        if attempt:
            best = min(best, elapsed)
    return best


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
