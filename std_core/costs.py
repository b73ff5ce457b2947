"""Step and round costs: the I/O model ``mode="auto"`` plans with, and the costs it measures.

A round of γ drafts costs ``γ · draft + verify(γ + 1)`` (plus its bookkeeping) and commits, when each
draft is accepted independently with probability α, ``E[tokens] = (1 − α^(γ+1)) / (1 − α)`` tokens;
a dense step commits one. :class:`StepCosts` holds a calibration (or a benchmark's measurement) of the
step costs; :class:`RoundCosts` replaces it with what the rounds themselves measured; the functions
below turn either into tokens per second per γ, the best γ and the break-even acceptance.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

_WINDOW = 9  # rounds whose median is a measured step cost
PROBE_EVERY = 16  # dense rounds between two probe rounds that re-measure acceptance (see auto)
PROBE_GAMMA = 2  # a probe's drafts


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

    def tokens(self, gamma: int, alpha: float) -> float:
        """Tokens a round of γ drafts commits: :func:`expected_tokens`."""
        return expected_tokens(alpha, gamma)

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

    def tokens(self, gamma: int, alpha: float) -> float: ...


class Running:
    """A measured quantity: the median (or mean) of its last ``_WINDOW`` observations (None before the
    first). Costs take the median (one slow round moves nothing); a round's worth the mean (a round
    cut short by a rejection, or by the end of the call, is what long rounds cost)."""

    def __init__(self, mean: bool = False) -> None:
        self.values: deque[float] = deque(maxlen=_WINDOW)
        self.value: float | None = None
        self._stat = statistics.fmean if mean else statistics.median

    def add(self, value: float) -> None:
        self.values.append(value)
        self.value = self._stat(self.values)


@dataclass
class RoundCosts:
    """Seconds of a round of each γ, and the tokens it is worth to the batch, from the calibration and
    what the rounds themselves measure (:meth:`observe`).

    Seconds. A dense round costs what the dense rounds measured (the median of the last ones, wall
    time); before the first, ``dense + bookkeeping`` of the calibration. A drafted round of γ costs
    ``γ · draft + verify(γ + 1) + bookkeeping``: a shared machine's speed drifts (on the development
    CPU by up to 2× between calls), so every round's verify (a dense round's is its dense step),
    against the calibrated verify of its size, gives the machine's speed at that round (``speed``);
    the draft step and the bookkeeping are kept in calibrated units (measured ÷ that round's speed),
    so a draft measured in a slow minute cannot tip the choice. The verify sizes stay the
    calibration's, scaled by the speed: for the γ that runs, that is its own measured verify. The dense
    step is *not* scaled by that speed: it is measured by dense rounds. Otherwise a calibrated
    verify/dense ratio that is off (on the development CPU a verify of 2 tokens measured 1.13 dense
    steps in the calibration and 1.27 in the rounds) would make the dense rounds look as much dearer
    as the drafted ones are, and never be corrected.

    Tokens. A batch decodes until its slowest row is done, and its last round commits only what is
    left: on the demo model's captions (7 or 14 tokens, batch 8) rounds of 4 drafts at an acceptance
    of 0.97 moved the batch 3.25 tokens each (13 steps in 4 rounds), not the 4.7 that
    :func:`expected_tokens` gives. So a round is worth its measured *advance*
    (:attr:`std_core.rows.Rows.advance`: how far it moved the slowest live row; over a call the
    advances sum to the decode steps), kept per γ as its ratio to :func:`expected_tokens` at the
    acceptance of the time (``efficiency``), which follows α as batches change. A γ that has not run takes the ratio interpolated from the γ that have (the nearest, past
    the measured ones), so one long round measured to be worth little makes its neighbours look as
    little worth.

    Shared by the calls on one model and shape bucket, like the probe interval: a workload whose probes
    keep failing probes ever more rarely, across calls, not only within one."""

    calibrated: StepCosts
    probe_every: int = PROBE_EVERY  # dense rounds between probes (doubles after each failed probe)
    speed: Running = field(default_factory=Running)  # measured / calibrated verify
    draft: Running = field(default_factory=Running)  # a draft step, calibrated units
    bookkeeping: dict[bool, Running] = field(default_factory=lambda: {False: Running(), True: Running()})
    dense: Running = field(default_factory=Running)  # a dense round's wall seconds
    efficiency: dict[int, Running] = field(default_factory=dict)  # γ -> advance / expected tokens
    since_probe: int = 0  # dense rounds (that could have drafted) since the last probe

    @property
    def measured_dense(self) -> bool:
        """A dense round has been measured (auto runs one first in a new bucket)."""
        return self.dense.value is not None

    def round_seconds(self, gamma: int) -> float:
        cal = self.calibrated
        if gamma == 0 and self.dense.value is not None:
            return self.dense.value
        book = self.bookkeeping[gamma > 0].value  # a drafted round's, until measured: a dense round's
        book = book if book is not None else (self.bookkeeping[False].value or 0.0)
        if gamma == 0:
            steps = cal.dense_step
        else:
            draft = self.draft.value if self.draft.value is not None else cal.draft_step
            steps = gamma * draft + cal.verify(gamma + 1)
        return (self.speed.value or 1.0) * (steps + book)

    def tokens(self, gamma: int, alpha: float) -> float:
        """Tokens a round of γ drafts is worth to the batch: :func:`expected_tokens` at α times the
        measured efficiency of γ (interpolated where γ has not run; 1 before any drafted round)."""
        return expected_tokens(alpha, gamma) * (self.efficiency_of(gamma) if gamma else 1.0)

    def efficiency_of(self, gamma: int) -> float:
        """Measured advance ÷ expected tokens of rounds of γ; where γ has not run, linear between the
        nearest measured γ below and above it, else the nearest; 1.0 when none has run."""
        if gamma in self.efficiency:
            return self.efficiency[gamma].value
        below = max((g for g in self.efficiency if g < gamma), default=None)
        above = min((g for g in self.efficiency if g > gamma), default=None)
        if below is None and above is None:
            return 1.0
        if below is None or above is None:
            return self.efficiency[above if below is None else below].value
        lo, hi = self.efficiency[below].value, self.efficiency[above].value
        return lo + (hi - lo) * (gamma - below) / (above - below)

    def reach(self, gamma_max: int) -> int:
        """The longest round worth choosing now: the calibration's whole range until a drafted round
        has run, then at most one more than twice the longest that has. A γ far past the measured ones
        takes their efficiency, which a short call's last round (cut to what is left) makes too
        optimistic: rounds grow by steps that each get measured, not in one jump from a probe to γ max."""
        if not self.efficiency:
            return gamma_max
        return min(gamma_max, 2 * max(self.efficiency) + 1)

    def observe(
        self,
        gamma: int,
        seconds: float,
        draft_seconds: float,
        verify_seconds: float,
        advance: float | None = None,
        alpha: float | None = None,
    ) -> None:
        """One round of γ drafts: its wall seconds, the seconds of its draft and verify phases, and
        how far it moved the batch (None: not known) at the acceptance α of the time."""
        if gamma and advance is not None and alpha is not None:
            ratio = advance / expected_tokens(alpha, gamma)
            self.efficiency.setdefault(gamma, Running(mean=True)).add(ratio)
        reference = self.calibrated.dense_step if gamma == 0 else self.calibrated.verify(gamma + 1)
        speed = max(verify_seconds, 1e-9) / reference
        self.speed.add(speed)
        if gamma == 0:
            self.dense.add(seconds)
        else:
            self.draft.add(draft_seconds / gamma / speed)
        self.bookkeeping[gamma > 0].add(max(0.0, seconds - draft_seconds - verify_seconds) / speed)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens committed by a round of γ drafts (bonus included) at per-draft acceptance α."""
    if gamma == 0:
        return 1.0
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def round_rates(costs: RoundCostModel, alpha: float, gamma_max: int) -> list[float]:
    """Tokens per second of rounds of each γ in ``0..gamma_max`` at per-draft acceptance α."""
    return [costs.tokens(g, alpha) / costs.round_seconds(g) for g in range(gamma_max + 1)]


def best_gamma(costs: RoundCostModel, alpha: float, gamma_max: int) -> int:
    """The γ in ``0..gamma_max`` with the most tokens per second (0: dense is best)."""
    rates = round_rates(costs, alpha, gamma_max)
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
