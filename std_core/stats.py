"""Decode statistics, counted once per round on the host, and a phase timer that does not sync.

Vocabulary (that of :mod:`std_core.config`): per round a row *drafts* γ tokens, *accepts* the
longest agreeing prefix of them, and gains one *bonus* token from the verify, so a round commits
``accepted + 1`` tokens. Our bonus is what vLLM's spec-decode metrics call a *recovered* token (after a
rejected draft) or a *bonus* token (after a fully accepted draft run); like vLLM's mean acceptance
length, ``mean_accepted_per_round`` includes it; ``acceptance_rate`` does not (accepted / drafted).
Drafts a row could not use are not counted as drafted: those past its token budget, and those after
an end-of-sequence token it accepted. A *rejection* is a round that ended at a disagreeing draft.

The metrics are defined once, here, as functions of summable counts, so a row, a batch, a run and a
benchmark all compute them the same way (:class:`RowStats` sums; ``RowStats.from_columns`` reads a
result row's columns back):

- :func:`acceptance_rate` = accepted / drafted;
- :func:`mean_accepted_per_round` = tokens the rounds committed / rounds (the first token of a row
  comes from the prefill and belongs to no round);
- :func:`tokens_per_second` = tokens / seconds.

Each returns ``None`` where its denominator is 0 (nothing to measure).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a CUDA timer needs it: the metrics above import nothing heavy
    import torch


def acceptance_rate(accepted: int, drafted: int) -> float | None:
    """Accepted drafts / drafted tokens (the bonus token is not a draft)."""
    return accepted / drafted if drafted else None


def mean_accepted_per_round(committed: int, rounds: int) -> float | None:
    """Tokens committed per round, bonus included (1.0 for dense decoding)."""
    return committed / rounds if rounds else None


def tokens_per_second(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


@dataclass(frozen=True)
class RowStats:
    """One row's counts. ``generated`` counts committed new tokens (EOS included, padding excluded);
    the first token comes from the prefill, every other one from a round."""

    generated: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    committed: int = 0  # tokens the rounds committed (generated minus the prefill's token, when any)

    @classmethod
    def from_columns(cls, row: Mapping[str, Any]) -> RowStats:
        """The counts of one result row (``generated_tokens``, ``rounds``, ``drafted_tokens``,
        ``accepted_tokens``; ``rejections`` where present); missing or null counts are 0."""
        generated, rounds = row.get("generated_tokens") or 0, row.get("rounds") or 0
        return cls(
            generated=generated,
            rounds=rounds,
            drafted=row.get("drafted_tokens") or 0,
            accepted=row.get("accepted_tokens") or 0,
            rejections=row.get("rejections") or 0,
            committed=max(generated - 1, 0) if rounds else 0,
        )

    @property
    def acceptance_rate(self) -> float:
        """:func:`acceptance_rate`, 0.0 when nothing was drafted."""
        return acceptance_rate(self.accepted, self.drafted) or 0.0

    @property
    def alpha(self) -> float:
        """Per-draft acceptance probability under the i.i.d. model: the maximum-likelihood estimate
        from truncated-geometric rounds, accepted / (accepted + rejections)."""
        trials = self.accepted + self.rejections
        return self.accepted / trials if trials else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        """:func:`mean_accepted_per_round`, 0.0 when no round ran."""
        return mean_accepted_per_round(self.committed, self.rounds) or 0.0

    def __add__(self, other: RowStats) -> RowStats:
        return RowStats(
            self.generated + other.generated,
            self.rounds + other.rounds,
            self.drafted + other.drafted,
            self.accepted + other.accepted,
            self.rejections + other.rejections,
            self.committed + other.committed,
        )


@dataclass(frozen=True)
class DecodeStats:
    """Per-row counts and batch-level phase times of one ``generate`` call."""

    mode: str
    gamma: int
    rows: tuple[RowStats, ...]
    prefill_seconds: float = 0.0
    select_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    rounds_seconds: float = 0.0  # the rounds, from the first token to the end (decode time)
    batch_rounds: int = 0
    round_gammas: tuple[int, ...] = ()  # γ of every batch round (constant unless mode="auto")
    visual_tokens: tuple[int, ...] = ()
    kept_prompt_tokens: tuple[int, ...] = ()
    sparse_cache_bytes: int = 0
    dense_cache_bytes: int = 0
    static_steps: str = "off"  # how decode forwards ran: "compile", "eager" (static) or "off"
    compile_seconds: float = 0.0  # first calls of new step buckets (trace + compile + that step)
    compiles: int = 0  # step buckets first called (compiled) in this call

    @property
    def total(self) -> RowStats:
        out = RowStats()
        for row in self.rows:
            out = out + row
        return out

    @property
    def decode_seconds(self) -> float:
        """Draft + verify time (the prefill and selection excluded)."""
        return self.draft_seconds + self.verify_seconds

    @property
    def bookkeeping_seconds(self) -> float:
        """The rounds' time outside draft and verify forwards: choosing γ, accepting, rolling back,
        stop checks (``rounds_seconds`` − draft − verify)."""
        return max(0.0, self.rounds_seconds - self.draft_seconds - self.verify_seconds)

    def row_columns(self, i: int) -> dict[str, float | int | str]:
        """Flat per-row columns for tables (Parquet rows, benchmark records)."""
        row = self.rows[i]
        return {
            "decoder": self.mode,
            "generated_tokens": row.generated,
            "rounds": row.rounds,
            "drafted_tokens": row.drafted,
            "accepted_tokens": row.accepted,
            "rejections": row.rejections,
            "acceptance_rate": row.acceptance_rate,
            "mean_accepted_per_round": row.mean_accepted_per_round,
        }

    def summary(self) -> dict[str, float | int | str]:
        """Batch totals and phase seconds as one flat dict."""
        total = self.total
        return {
            "mode": self.mode,
            "gamma": self.gamma,
            "batch": len(self.rows),
            "generated_tokens": total.generated,
            "rounds": self.batch_rounds,
            "drafted_tokens": total.drafted,
            "accepted_tokens": total.accepted,
            "rejections": total.rejections,
            "acceptance_rate": total.acceptance_rate,
            "alpha": total.alpha,
            "mean_accepted_per_round": total.mean_accepted_per_round,
            "prefill_seconds": self.prefill_seconds,
            "select_seconds": self.select_seconds,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
            "rounds_seconds": self.rounds_seconds,
            "static_steps": self.static_steps,
            "compile_seconds": self.compile_seconds,
            "compiles": self.compiles,
        }


@dataclass
class PhaseTimer:
    """Sums the time spent in named phases. On CUDA it records events and reads them once at the end,
    so timing adds no host-device synchronisation to the decode loop."""

    device: torch.device
    _cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    _events: dict[str, list] = field(default_factory=lambda: defaultdict(list))
    _last: dict[str, float] = field(default_factory=dict)  # CPU: seconds of each phase's latest run

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            import torch

            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._last[name] = time.perf_counter() - t0
                self._cpu[name] += self._last[name]

    def latest(self, name: str) -> float:
        """Seconds of the latest run of phase ``name`` (0 before the first). On CUDA its events must
        have completed (after a host synchronisation, e.g. the round's), so reading adds none."""
        if self.device.type == "cuda":
            pairs = self._events.get(name)
            return pairs[-1][0].elapsed_time(pairs[-1][1]) / 1000.0 if pairs else 0.0
        return self._last.get(name, 0.0)

    def seconds(self) -> dict[str, float]:
        """Total seconds per phase (synchronises once on CUDA)."""
        out = dict(self._cpu)
        if self._events:
            import torch

            torch.cuda.synchronize(self.device)
            for name, pairs in self._events.items():
                out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000.0
        return out
