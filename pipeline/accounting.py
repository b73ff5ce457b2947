"""Run accounting: live progress while rows arrive, and the ``_summary.json`` written at the end.

Metrics are computed once, from the rows the run wrote (never from a side channel), so the summary
always agrees with the Parquet files:

- ``acceptance_rate``, ``mean_accepted_per_round`` and ``generated_tokens_per_s``: the definitions of
  ``std_core.stats``, over the sum of the ok rows' counts (``RowStats.from_columns``);
- ``speedup`` = dense / StD decode seconds, summed over the rows that had a dense re-run (the dense
  sample), so both sides decoded exactly the same inputs on the same actor; ``speedup_batches`` says
  how many batches it rests on and ``speedup_median_batch`` is the median of the per-batch ratios (one
  slow batch cannot dominate it);
- ``videos``: counted per result batch (a video's rows come back in one batch: the read stage keeps
  its items in one block), so the driver keeps no set of the run's video ids;
- ``videos_per_s`` is over the whole wall time (planning, Ray start-up and model load included);
  ``steady_videos_per_s`` over the time between the first and the last result batch (``startup_seconds``
  is the time to the first one);
- ``rows_budget_covers_prompt``: rows whose whole prompt fits the sparse budget, where the sparse draft
  is the dense model and StD cannot win (a warning is logged when there are any);
- ``gpu_seconds_per_video`` = GPUs held (actors × GPUs per actor) × wall seconds / videos: what the run
  cost. It counts the pool at its largest (``--num-actors``) for the whole wall time, so it is an upper
  bound where the elastic pool shrank (an idle actor is released when decoding cannot keep up).
  ``held_gpu_seconds_per_video`` counts what the actors really held: each actor from its start (model
  load included) to its last result batch (``actor_seconds``, summed over every actor the run started,
  restarted ones included), times GPUs per actor, over videos; it leaves out an actor's idle tail after
  its last batch and an actor that died before returning one. ``decode_seconds_per_video`` is the
  part spent generating (the lower bound).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.schema import STATUS_OK
from std_core.stats import RowStats, acceptance_rate, mean_accepted_per_round, tokens_per_second

log = logging.getLogger(__name__)

_SUMS = ("visual_tokens", "prompt_tokens", "generated_tokens", "drafted_tokens", "accepted_tokens", "rounds")


@dataclass
class RunAccounting:
    """Accumulates counts from result tables; cheap enough to update per batch."""

    expected_rows: int
    started: float = field(default_factory=time.perf_counter)
    rows_ok: int = 0
    rows_error: int = 0
    frames: int = 0
    sums: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUMS, 0))
    counts: RowStats = field(default_factory=RowStats)  # decode counts of the ok rows, summed
    decode_seconds: float = 0.0
    sampled_std_seconds: float = 0.0
    sampled_dense_seconds: float = 0.0
    sampled_rows: int = 0
    sampled_matches: int = 0
    mcq_scored: int = 0
    mcq_correct: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    sparse_budget: int | None = None  # the StD budget (None: dense decoding, nothing to compare)
    rows_budget_covers_prompt: int = 0
    batch_speedups: list[float] = field(default_factory=list)  # dense / StD seconds per sampled batch
    first_batch_at: float | None = None
    last_batch_at: float | None = None
    first_batch_videos: int = 0
    videos: int = 0
    actor_ages: dict[str, float] = field(default_factory=dict)  # actor id -> its age at its latest batch

    def add_actor_age(self, actors: pa.Array | pa.ChunkedArray, ages: pa.Array | pa.ChunkedArray) -> None:
        """Note each actor's age (seconds since it started) at the result batch these rows came in."""
        for actor, age in zip(actors.to_pylist(), ages.to_pylist(), strict=True):
            if age > self.actor_ages.get(actor, -1.0):
                self.actor_ages[actor] = age

    def add(self, table: pa.Table) -> None:
        """Count one result batch (the rows one actor call returned)."""
        std_seconds = dense_seconds = 0.0
        batch_videos: set[str] = set()
        for row in table.to_pylist():
            self._add_row(row, batch_videos)
            if row["status"] == STATUS_OK and row["dense_decode_seconds"] is not None:
                std_seconds += row["decode_seconds"] or 0.0
                dense_seconds += row["dense_decode_seconds"]
        if std_seconds > 0:
            self.batch_speedups.append(dense_seconds / std_seconds)
        self.last_batch_at = time.perf_counter()
        if self.first_batch_at is None:
            self.first_batch_at, self.first_batch_videos = self.last_batch_at, self.videos

    def _add_row(self, row: dict, batch_videos: set[str]) -> None:
        if row["video_id"] not in batch_videos:
            batch_videos.add(row["video_id"])
            self.videos += 1
            self.frames += row["num_frames"] or 0
        if row["status"] != STATUS_OK:
            self.rows_error += 1
            self.errors[row["error"] or "?"] = self.errors.get(row["error"] or "?", 0) + 1
            return
        self.rows_ok += 1
        for name in _SUMS:
            self.sums[name] += row[name] or 0
        self.counts += RowStats.from_columns(row)
        if self.sparse_budget is not None and (row["prompt_tokens"] or 0) <= self.sparse_budget:
            self.rows_budget_covers_prompt += 1
        self.decode_seconds += row["decode_seconds"] or 0.0
        if row["dense_decode_seconds"] is not None:
            self.sampled_rows += 1
            self.sampled_std_seconds += row["decode_seconds"] or 0.0
            self.sampled_dense_seconds += row["dense_decode_seconds"]
            self.sampled_matches += bool(row["dense_match"])
        if row["correct"] is not None:
            self.mcq_scored += 1
            self.mcq_correct += bool(row["correct"])

    @property
    def rows(self) -> int:
        return self.rows_ok + self.rows_error

    def progress_line(self, recent_rate: float | None = None) -> str:
        """Rows done of expected (percentage), videos, the current rate (``recent_rate`` rows/s, else the
        average since the first result), tokens/s and the ETA at the current rate."""
        elapsed = time.perf_counter() - self.started
        rate = recent_rate if recent_rate is not None else self._steady_rate(self.rows, 1)
        left = max(0, self.expected_rows - self.rows)
        eta = f"ETA {_duration(left / rate)}" if rate and left else ("done" if not left else "ETA ?")
        percent = 100.0 * self.rows / self.expected_rows if self.expected_rows else 100.0
        tokens_rate = tokens_per_second(self.counts.generated, elapsed) or 0.0
        return (
            f"[progress] rows {self.rows}/{self.expected_rows} ({percent:.0f}%; ok {self.rows_ok}, error "
            f"{self.rows_error}) videos {self.videos} | {rate or 0.0:.2f} rows/s | {tokens_rate:.1f} tokens/s | "
            f"{eta} | {elapsed:.0f}s"
        )

    def _steady_rate(self, count: int, first_count: int) -> float | None:
        """``count`` per second between the first and the last result batch (the first batch's own
        ``first_count`` excluded), or None before two batches came."""
        if self.first_batch_at is None or self.last_batch_at is None:
            return None
        span = self.last_batch_at - self.first_batch_at
        return (count - first_count) / span if span > 0 and count > first_count else None

    def summary(self, gpus_per_actor: float, num_actors: int = 1) -> dict:
        """The run's numbers (add run metadata before writing it); ``num_actors`` is the pool at its
        largest."""
        gpus_held = num_actors * gpus_per_actor
        wall = time.perf_counter() - self.started
        counts = self.counts
        actor_seconds = sum(self.actor_ages.values())
        return {
            "videos": self.videos,
            "rows": self.rows,
            "rows_ok": self.rows_ok,
            "rows_error": self.rows_error,
            "frames": self.frames,
            **self.sums,
            "wall_seconds": round(wall, 3),
            "startup_seconds": None
            if self.first_batch_at is None
            else round(self.first_batch_at - self.started, 3),
            "videos_per_s": _ratio(self.videos, wall),
            "items_per_s": _ratio(self.rows, wall),  # rows (one per task item) per second, wall clock
            "steady_videos_per_s": _rounded(self._steady_rate(self.videos, self.first_batch_videos)),
            "generated_tokens_per_s": _rounded(tokens_per_second(counts.generated, wall)),
            "decode_seconds": round(self.decode_seconds, 4),
            "decode_seconds_per_video": _ratio(self.decode_seconds, self.videos),
            "gpu_seconds_per_video": _ratio(gpus_held * wall, self.videos) if gpus_held else None,
            "actors_seen": len(self.actor_ages),  # the actors that returned a batch
            "actor_seconds": round(actor_seconds, 3),
            "held_gpu_seconds_per_video": _ratio(gpus_per_actor * actor_seconds, self.videos)
            if gpus_per_actor
            else None,
            "acceptance_rate": _rounded(acceptance_rate(counts.accepted, counts.drafted)),
            "mean_accepted_per_round": _rounded(mean_accepted_per_round(counts.committed, counts.rounds)),
            "dense_sample_rows": self.sampled_rows,
            "dense_match_rate": _ratio(self.sampled_matches, self.sampled_rows),
            "speedup": _ratio(self.sampled_dense_seconds, self.sampled_std_seconds),
            "speedup_batches": len(self.batch_speedups),
            "speedup_median_batch": _rounded(statistics.median(self.batch_speedups))
            if self.batch_speedups
            else None,
            "rows_budget_covers_prompt": self.rows_budget_covers_prompt,
            "mcq_accuracy": _ratio(self.mcq_correct, self.mcq_scored),
            "top_errors": dict(sorted(self.errors.items(), key=lambda kv: -kv[1])[:5]),
        }


class Progress:
    """Logs :meth:`RunAccounting.progress_line` (level INFO) at most every ``interval`` seconds, with the
    rate over the rows since the previous line."""

    def __init__(self, accounting: RunAccounting, interval: float = 5.0) -> None:
        self.accounting, self.interval = accounting, interval
        self._last = -math.inf  # the first rows are reported at once
        self._last_rows = -1
        self._mark: tuple[float, int] | None = None  # (time, rows) of the previous line

    def update(self, force: bool = False) -> None:
        """Log now if ``interval`` has passed (or ``force``), unless nothing changed since the last line."""
        now = time.perf_counter()
        rows = self.accounting.rows
        if (force or now - self._last >= self.interval) and rows != self._last_rows:
            recent = None
            if self._mark is not None and now > self._mark[0]:
                recent = (rows - self._mark[1]) / (now - self._mark[0])
            self._last, self._last_rows, self._mark = now, rows, (now, rows)
            log.info(self.accounting.progress_line(recent))


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _duration(seconds: float) -> str:
    """``"1h02m"``, ``"3m05s"``, ``"42s"``."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
