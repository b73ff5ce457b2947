"""Step and round costs: the I/O model ``mode="auto"`` plans with, and the costs it measures.

A round of γ drafts costs ``γ · draft + verify(γ + 1)`` (plus its bookkeeping) and commits, when each
draft is accepted independently with probability α, ``E[tokens] = (1 − α^(γ+1)) / (1 − α)`` tokens;
a dense step commits one. :class:`StepCosts` holds a calibration (or a benchmark's measurement) of the
step costs; :class:`RoundCosts` replaces it with what the rounds themselves measured; the functions
below turn either into tokens per second per γ, the best γ and the break-even acceptance.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

_WINDOW = 9  # rounds whose median is a measured step cost
PROBE_EVERY = 16  # dense rounds between two probe rounds that re-measure acceptance (see auto)
_PRIOR_ROUNDS = 2.0  # weight of the prior acceptance, in rounds
_DEFAULT_ALPHA = 0.9  # the prior of a model's first call: the paper's acceptance profile (62% at γ = 9)
_MEMORY = 256.0  # drafts of evidence an acceptance estimate keeps (older ones fade)
# rounds of a γ after which it costs what they measured (a first drafted round after dense ones also
# copies what the sparse cache missed: one such round is not what the next ones cost)
MEASURED_ROUNDS = 3


@dataclass(frozen=True)
class StepCosts:
    """Seconds per forward of the whole batch: a dense step (1 token), a draft step (1 token, sparse
    cache), and a verify of q tokens: piecewise linear through ``verify_points`` (measured ``(q,
    seconds)``, ascending q) where given, else ``verify_base + verify_per_token · q``."""

    dense_step: float
    draft_step: float
    verify_base: float
    verify_per_token: float
    verify_points: tuple[tuple[int, float], ...] = ()

    def verify(self, q: int) -> float:
        points = self.verify_points
        if len(points) < 2:
            return self.verify_base + self.verify_per_token * q
        for (q0, t0), (q1, t1) in zip(points, points[1:], strict=False):
            if q <= q1:
                return t0 + (t1 - t0) * (q - q0) / (q1 - q0)
        (q0, t0), (q1, t1) = points[-2], points[-1]  # past the last point: its segment's slope
        return t1 + (t1 - t0) * (q - q1) / (q1 - q0)

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

    @classmethod
    def from_verifies(cls, dense: float, draft: float, verifies: Sequence[tuple[int, float]]) -> StepCosts:
        """Costs with verifies measured at several sizes ``[(q, seconds), ...]`` (q = 1 included); the
        line through the smallest and largest gives ``verify_base`` / ``verify_per_token``."""
        points = tuple(sorted((int(q), float(t)) for q, t in verifies))
        line = cls.from_measurements(dense, draft, points[0][1], points[-1][1], points[-1][0])
        return cls(dense, draft, line.verify_base, line.verify_per_token, points)


def verify_sizes(gamma_max: int) -> list[int]:
    """The verify sizes (tokens) auto's calibration times besides one (a dense step): a few small ones,
    where the CPU's attention kernel cost bends, and the largest, γ_max + 1."""
    return sorted({q for q in (2, 3, 5, gamma_max + 1) if 2 <= q <= gamma_max + 1})


class RoundCostModel(Protocol):
    def round_seconds(self, gamma: int) -> float: ...


class Running:
    """A measured quantity: the median of its last ``_WINDOW`` observations (None before the first),
    so one slow round on a shared machine moves nothing."""

    def __init__(self) -> None:
        self.values: deque[float] = deque(maxlen=_WINDOW)
        self.value: float | None = None

    def add(self, value: float) -> None:
        self.values.append(value)
        self.value = statistics.median(self.values)


class AcceptanceEstimate:
    """The per-draft acceptance of a batch: how far its rounds moved it, as truncated-geometric
    outcomes (a round of γ that moved the batch ``a`` tokens accepted ``a − 1`` drafts, and was ended
    by a rejection when ``a ≤ γ``). α̂ = accepted / (accepted + rejections), starting from a prior
    worth ``_PRIOR_ROUNDS`` rounds; the counts are kept across calls and forget the oldest evidence
    past ``_MEMORY`` drafts, so the estimate follows a workload that changes.

    :meth:`upper` is the optimistic end of what the evidence allows (two standard errors up): auto
    explores with it (is a probe worth it? which γ?), and decides with :attr:`alpha`."""

    def __init__(self, prior: float, weight: float = _PRIOR_ROUNDS) -> None:
        self.accepted = prior * weight
        self.rejections = (1.0 - prior) * weight

    def update(self, accepted: float, rejections: float) -> None:
        """Record one round: drafts accepted and rounds ended by a rejection."""
        self.accepted += accepted
        self.rejections += rejections
        total = self.accepted + self.rejections
        if total > _MEMORY:
            self.accepted *= _MEMORY / total
            self.rejections *= _MEMORY / total

    @property
    def alpha(self) -> float:
        return self.accepted / max(self.accepted + self.rejections, 1e-12)

    @property
    def trials(self) -> float:
        return self.accepted + self.rejections

    def upper(self) -> float:
        """α̂ plus two standard errors (of a smoothed α̂, so that no evidence of a draft ever accepted
        still leaves room to look again), at most 1."""
        n = self.trials
        smoothed = (self.accepted + 0.5) / (n + 1.0)
        return min(1.0, self.alpha + 2.0 * math.sqrt(smoothed * (1.0 - smoothed) / (n + 1.0)))


@dataclass
class RoundCosts:
    """Seconds of a round of each γ, the acceptance of the batches, and how long calls run: from the
    calibration and what the rounds themselves measure (:meth:`observe`, :meth:`observe_call`).

    Seconds. A round of a γ that has run ``MEASURED_ROUNDS`` times (dense, γ = 0: once) costs what
    its rounds measured: the median wall time of its last rounds. One that has not costs
    ``γ · draft + verify(γ + 1) + bookkeeping``: a shared machine's speed drifts (on the development
    CPU by up to 2× between calls), so every round's verify (a dense round's is its dense step),
    against the calibrated verify of its size, gives the machine's speed at that round (``speed``);
    the draft step and the bookkeeping are kept in calibrated units (measured ÷ that round's speed), so
    a draft measured in a slow minute cannot tip the choice, and the verify of an unmeasured size is
    the calibration's, scaled by that speed. Before the first dense round, a dense round is the
    calibration's ``dense + bookkeeping``.

    Acceptance (:class:`AcceptanceEstimate`): what the batch's rounds moved it, so that the rows a
    batch waits for (of 8 rows accepting 97% of drafts each, the slowest of a round's 8 draws) decide
    it; in a round in which one of those rows stopped, the drafts it moved count as accepted and its
    end as no rejection (the stop ended it: a censored observation).

    Length. A call's rounds are worth what is left of it: a batch whose captions end after 13 decode
    steps takes 3 rounds of 4 drafts (15 slots) but also 3 of 6 (one rejection), so a γ is worth
    ``E[min(tokens of the round, steps left)]``. The steps a call takes are learned from the calls that
    ended before their budget (``lengths``, the last ``_WINDOW``); the steps left are those of each
    such call past the current one's progress, each equally likely (the budget, when no earlier call
    ran this far).

    Shared by the calls on one model and shape bucket, like the probe interval: a workload whose probes
    keep failing probes ever more rarely, across calls, not only within one."""

    calibrated: StepCosts
    acceptance: AcceptanceEstimate = field(default_factory=lambda: AcceptanceEstimate(_DEFAULT_ALPHA))
    probe_every: int = PROBE_EVERY  # dense rounds between probes (doubles after each failed probe)
    speed: Running = field(default_factory=Running)  # measured / calibrated verify
    draft: Running = field(default_factory=Running)  # a draft step, calibrated units
    bookkeeping: dict[bool, Running] = field(default_factory=lambda: {False: Running(), True: Running()})
    rounds: dict[int, Running] = field(default_factory=dict)  # γ -> a round's wall seconds
    lengths: deque[int] = field(default_factory=lambda: deque(maxlen=_WINDOW))  # decode steps per call
    since_probe: int = 0  # dense rounds (that could have drafted) since the last probe

    @property
    def measured_dense(self) -> bool:
        """A dense round has been measured (auto runs one first in a new bucket)."""
        return 0 in self.rounds

    def measured_rounds(self, gamma: int) -> int:
        """Rounds of γ in the current window of measurements."""
        return len(self.rounds[gamma].values) if gamma in self.rounds else 0

    def round_seconds(self, gamma: int) -> float:
        if self.measured_rounds(gamma) >= (MEASURED_ROUNDS if gamma else 1):
            return self.rounds[gamma].value
        cal = self.calibrated
        book = self.bookkeeping[gamma > 0].value  # a drafted round's, until measured: a dense round's
        book = book if book is not None else (self.bookkeeping[False].value or 0.0)
        if gamma == 0:
            steps = cal.dense_step
        else:
            draft = self.draft.value if self.draft.value is not None else cal.draft_step
            steps = gamma * draft + cal.verify(gamma + 1)
        return (self.speed.value or 1.0) * (steps + book)

    def horizons(self, steps: int, budget: int) -> list[int]:
        """The decode steps left to a call that has taken ``steps`` and may take ``budget`` more: one
        per learned call length past ``steps`` (each at most ``budget``), else ``[budget]``."""
        ahead = [min(n - steps, budget) for n in self.lengths if n > steps]
        return ahead or [budget]

    def observe(
        self,
        gamma: int,
        seconds: float,
        draft_seconds: float,
        verify_seconds: float,
        advance: int | None = None,
        cut: bool = False,
    ) -> None:
        """One round of γ drafts: its wall seconds, the seconds of its draft and verify phases, and
        how far it moved the batch (None: not known; ``cut``: a row the batch waited for stopped)."""
        if gamma and advance is not None:
            accepted = min(advance, gamma + 1) - 1
            self.acceptance.update(accepted, int(accepted < gamma and not cut))
        reference = self.calibrated.dense_step if gamma == 0 else self.calibrated.verify(gamma + 1)
        speed = max(verify_seconds, 1e-9) / reference
        self.speed.add(speed)
        self.rounds.setdefault(gamma, Running()).add(seconds)
        if gamma:
            self.draft.add(draft_seconds / gamma / speed)
        self.bookkeeping[gamma > 0].add(max(0.0, seconds - draft_seconds - verify_seconds) / speed)

    def observe_call(self, steps: int, budget_reached: bool) -> None:
        """A call is done after ``steps`` decode steps (the sum of its rounds' advances); one that its
        budget ended says nothing of how long its outputs would have run."""
        if not budget_reached and steps > 0:
            self.lengths.append(steps)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens committed by a round of γ drafts (bonus included) at per-draft acceptance α."""
    if gamma == 0:
        return 1.0
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def round_worths(alpha: float, gamma_max: int, horizons: Sequence[int] | None = None) -> list[float]:
    """Tokens a round of each γ in ``0..gamma_max`` is worth at per-draft acceptance α: its
    :func:`expected_tokens`, or, given the steps a call may have left (``horizons``, equally likely),
    the mean of ``E[min(tokens, h)]``, which is the expected tokens of ``min(γ, h − 1)`` drafts."""
    table = [expected_tokens(alpha, g) for g in range(gamma_max + 1)]
    if not horizons:
        return table
    return [statistics.fmean(table[max(0, min(g, h - 1))] for h in horizons) for g in range(gamma_max + 1)]


def round_rates(
    costs: RoundCostModel, alpha: float, gamma_max: int, horizons: Sequence[int] | None = None
) -> list[float]:
    """Tokens per second of rounds of each γ in ``0..gamma_max`` (:func:`round_worths` ÷ seconds)."""
    worths = round_worths(alpha, gamma_max, horizons)
    return [worths[g] / costs.round_seconds(g) for g in range(gamma_max + 1)]


def best_gamma(
    costs: RoundCostModel, alpha: float, gamma_max: int, horizons: Sequence[int] | None = None
) -> int:
    """The γ in ``0..gamma_max`` with the most tokens per second (0: dense is best)."""
    rates = round_rates(costs, alpha, gamma_max, horizons)
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


def time_forward(forward: Callable[[], object], roll_back: Callable[[], None], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` timed calls of ``forward`` after one warm-up, each followed
    by ``roll_back`` (outside the timing). Synchronises CUDA around each call."""
    return time_forwards([(forward, roll_back)], repeats)[0]


def time_forwards(
    steps: Sequence[tuple[Callable[[], object], Callable[[], None]]], repeats: int
) -> list[float]:
    """:func:`time_forward` of several ``(forward, roll_back)`` steps, interleaved: each pass times
    every step once, so a drift of the machine's speed during the calibration moves them all."""
    best = [float("inf")] * len(steps)
    for attempt in range(repeats + 1):
        for i, (forward, roll_back) in enumerate(steps):
            _synchronize()
            start = time.perf_counter()
            forward()
            _synchronize()
            elapsed = time.perf_counter() - start
            roll_back()
            if attempt:
                best[i] = min(best[i], elapsed)
    return best


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
