"""Rows: the committed tokens of every row of a batch, where each row stops, and its counts.

A row's output grows by the tokens each round commits (accepted drafts + the bonus), cut where
``generate``'s stopping criteria end it (max length, EOS, ...). After its end a row is *finished*: it
keeps its tokens, its caches keep their length, and its output is padded like ``generate``'s.
"""

from __future__ import annotations

import torch

from std_core.processing import StopRule
from std_core.stats import RowStats


class Rows:
    """Committed ids ``tokens [B, prompt + max_new + spare]`` (prompt first, padding after each row's
    end), per-row ``generated`` counts, ``finished`` flags and :class:`RowStats`."""

    def __init__(self, input_ids: torch.Tensor, stop: StopRule, pad_id: int, spare: int) -> None:
        batch, self.prompt_len = input_ids.shape
        self.stop = stop
        width = self.prompt_len + stop.max_new_tokens + spare
        self.tokens = torch.full((batch, width), pad_id, dtype=torch.long, device=input_ids.device)
        self.tokens[:, : self.prompt_len] = input_ids
        self.generated = [0] * batch
        self.finished = [False] * batch
        self.stats = [RowStats() for _ in range(batch)]
        self.cached = torch.zeros(batch, dtype=torch.long, device=input_ids.device)

    def lengths(self) -> list[int]:
        """Committed ids per row, prompt included."""
        return [self.prompt_len + g for g in self.generated]

    def remaining(self) -> int:
        """The most tokens any live row may still generate."""
        return max(
            self.stop.max_new_tokens - g for g, f in zip(self.generated, self.finished, strict=True) if not f
        )

    @property
    def all_finished(self) -> bool:
        return all(self.finished)

    def sequences(self) -> torch.Tensor:
        """``[B, prompt + longest output]``, laid out as ``model.generate`` returns it."""
        return self.tokens[:, : self.prompt_len + max(self.generated)]

    def commit(
        self, new: torch.Tensor, accepted: list[int], gamma: int | None = None
    ) -> tuple[list[int], list[RowStats]]:
        """Write each live row's new tokens (``accepted[b] + 1`` of ``new [B, *]`` on the CPU, cut
        where the row stops) and count them as a round of ``gamma`` drafts (None: the prefill's
        token). Returns the tentative cache slots each row keeps (``accepted + 1``; 0 once it stops)
        and the live rows' round counts. Updates ``cached`` (tokens in the caches, ``[B]``)."""
        stops = self.stop.stop_index(new, self.tokens, self.generated)
        keep, outcomes = [0] * len(self.generated), []
        for b, (a, stop) in enumerate(zip(accepted, stops, strict=True)):
            if self.finished[b]:
                continue
            usable = 0 if gamma is None else min(gamma, self.stop.max_new_tokens - self.generated[b] - 1)
            count = a + 1
            if stop is not None and stop < count:
                count, self.finished[b] = stop + 1, True
            start = self.prompt_len + self.generated[b]
            self.tokens[b, start : start + count] = new[b, :count].to(self.tokens.device)
            self.generated[b] += count
            ended_in_drafts = stop is not None and stop < min(a, usable)
            outcomes.append(
                RowStats(count) if gamma is None else _round_counts(count, a, usable, ended_in_drafts)
            )
            self.stats[b] += outcomes[-1]
            keep[b] = 0 if self.finished[b] else a + 1
        self.cached = torch.tensor([g - 1 for g in self.generated], device=self.tokens.device)
        return keep, outcomes


def _round_counts(count: int, accepted: int, usable: int, ended_in_drafts: bool) -> RowStats:
    """One row's counts for a round that committed ``count`` tokens, ``accepted`` drafts agreeing, of
    which it could use ``usable`` (its remaining budget). A row that stopped at an accepted draft
    (end-of-sequence) drafted only up to there and was not rejected."""
    if ended_in_drafts:
        return RowStats(count, 1, count, count, 0, committed=count)
    return RowStats(count, 1, usable, min(accepted, usable), int(accepted < usable), committed=count)
