"""Rows: the committed tokens of every row of a batch, where each row stops, and its counts.

A row's output grows by the tokens each round commits (accepted drafts + the bonus), cut where
``generate``'s stopping criteria end it (max length, EOS, ...). After its end a row is *finished*: it
keeps its tokens, its caches keep their length, and its output is padded like ``generate``'s.

The state lives on the model's device (``tokens``, ``generated_t``, ``finished_t``, ``cached``) and
is mirrored on the host (``generated``, ``finished``, ``stats``). :meth:`Rows.commit` updates the
device state with tensor ops and then reads the round's counts back in one transfer, the round's one
host synchronisation. Stopping criteria other than max length and EOS (stop strings, max time, a
user's) are called on the host afterwards, per new token, and end a row there when they fire.
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
        self.pad_id = pad_id
        width = self.prompt_len + stop.max_new_tokens + max(spare, 2)
        device = input_ids.device
        self.tokens = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
        self.tokens[:, : self.prompt_len] = input_ids
        self.generated = [0] * batch
        self.finished = [False] * batch
        self.stats = [RowStats() for _ in range(batch)]
        self.generated_t = torch.zeros(batch, dtype=torch.long, device=device)  # = generated
        self.finished_t = torch.zeros(batch, dtype=torch.bool, device=device)  # = finished
        self.cached = torch.zeros(batch, dtype=torch.long, device=device)  # tokens in the caches
        self.none_accepted = torch.zeros(batch, dtype=torch.long, device=device)  # a dense round's
        self._offsets = torch.arange(width, device=device)
        self.advance = 0  # how far the last commit moved the batch (see :meth:`commit`)
        self.cut = False  # a row the batch waited for stopped in the last commit (see :meth:`commit`)

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
        self, new: torch.Tensor, accepted: torch.Tensor, gamma: int | None = None
    ) -> tuple[torch.Tensor, list[int], list[RowStats], list[RowStats]]:
        """Write each live row's new tokens (``accepted[b] + 1`` of ``new [B, m]``, on the device, cut
        where the row stops) and count them as a round of ``gamma`` drafts (None: the prefill's
        token). Returns the tentative cache slots each row keeps (``accepted + 1``; 0 once it stops)
        as ``[B]`` on the device and as a host list, the live rows' round counts, and those of the
        rows that were furthest behind (fewest tokens before this round: the rows a batch waits for).

        Sets ``advance``: how far the round moved the batch, i.e. the fewest tokens of a row still
        live after it (the largest of the rows it ended, when it ended every row) minus the fewest of
        a row live before it. Over a call the advances sum to the longest output minus its first
        token: the decode steps a batch takes, which is what a round of some γ is worth. Sets ``cut``
        when one of the rows furthest behind stopped in this round (end of sequence, a stop string or
        its budget): the advance then ended with that row, not with a rejected draft."""
        count, ends, keep = self._commit_on_device(new, accepted)
        host = torch.stack([accepted, count, ends.long()], dim=1).tolist()  # the round's one host sync
        keep_host, outcomes, behind, reached, cut = [0] * len(host), [], [], 0, False
        last = min((g for g, f in zip(self.generated, self.finished, strict=True) if not f), default=0)
        for b, (a, n, end) in enumerate(host):
            if self.finished[b]:
                continue
            lagging = self.generated[b] == last
            keep_host[b] = 0 if end else a + 1  # what the device kept
            if self.stop.others:
                n, end = self._other_stop(b, n, bool(end))
            usable = 0 if gamma is None else min(gamma, self.stop.max_new_tokens - self.generated[b] - 1)
            self.generated[b] += n
            self.finished[b] = bool(end)
            ended_in_drafts = bool(end) and n - 1 < min(a, usable)
            outcomes.append(RowStats(n) if gamma is None else _round_counts(n, a, usable, ended_in_drafts))
            self.stats[b] += outcomes[-1]
            if lagging:
                behind.append(outcomes[-1])
                cut = cut or bool(end)
            reached = max(reached, self.generated[b])
        live = [g for g, f in zip(self.generated, self.finished, strict=True) if not f]
        self.advance = (min(live) if live else reached) - last
        self.cut = cut
        return keep, keep_host, outcomes, behind

    def _commit_on_device(
        self, new: torch.Tensor, accepted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The device half of :meth:`commit`: ``count`` (tokens committed), ``ends`` (the row stops
        here) and ``keep`` (cache slots kept), each ``[B]``; writes the tokens."""
        live = ~self.finished_t
        stop = self.stop.first_stop(new, self.generated_t)  # [B] index of the token that ends the row
        ends = live & (stop <= accepted)  # it ends within this round's accepted + 1 tokens
        count = torch.minimum(accepted, stop).add_(1).mul_(live)  # 0 for rows that had finished
        i = self._offsets[: new.shape[1]][None]
        spare = self.tokens.shape[1] - 1  # never part of the output: tokens past a row's count go there
        slots = torch.where(i < count[:, None], (self.generated_t + self.prompt_len)[:, None] + i, spare)
        self.tokens.scatter_(1, slots, new)
        self.generated_t += count
        self.finished_t |= ends
        self.cached = self.generated_t - 1
        return count, ends, count.masked_fill(ends, 0)

    def _other_stop(self, b: int, n: int, end: bool) -> tuple[int, bool]:
        """Row ``b``'s committed count and end after the criteria that run on the host, called on its
        ids after each of its ``n`` new tokens; a criterion that fires ends the row there."""
        start = self.prompt_len + self.generated[b]
        stop = self.stop.other_stop(self.tokens[b : b + 1, : start + n], n)
        if stop is None:
            return n, end
        if stop + 1 < n:  # the tokens after the stop are not the row's: pad them
            self.tokens[b, start + stop + 1 : start + n] = self.pad_id
            self.generated_t[b] -= n - stop - 1
            self.cached[b] = self.generated_t[b] - 1
        self.finished_t[b] = True
        return stop + 1, True


def _round_counts(count: int, accepted: int, usable: int, ended_in_drafts: bool) -> RowStats:
    """One row's counts for a round that committed ``count`` tokens, ``accepted`` drafts agreeing, of
    which it could use ``usable`` (its remaining budget). A row that stopped at an accepted draft
    (end-of-sequence) drafted only up to there and was not rejected."""
    if ended_in_drafts:
        return RowStats(count, 1, count, count, 0, committed=count)
    return RowStats(count, 1, usable, min(accepted, usable), int(accepted < usable), committed=count)
