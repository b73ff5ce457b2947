"""``generate``'s logits processors and stopping criteria, applied to speculative positions.

``model.generate`` prepares a ``LogitsProcessorList`` (repetition penalty, temperature, top-k, top-p,
…) and a ``StoppingCriteriaList`` (max length, EOS, stop strings, …) from the generation config;
StD receives both and applies them exactly as plain decoding would. Each drafted or verified
position ``i`` of row ``b`` is processed with the ids that plain decoding would have seen there:
the row's committed tokens followed by the drafts before ``i``. Rows are ragged (each has its own
number of committed tokens), so history-dependent processors run once per position and distinct row
length; processors that ignore the ids (temperature, top-k, top-p, …) run once, batched.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
)

# Processors whose output depends on the scores alone, never on the input ids.
_ID_FREE = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
)


class Scorer:
    """Turns raw logits of speculative positions into ``generate``'s processed scores."""

    def __init__(self, processors: LogitsProcessorList) -> None:
        self.processors = processors
        self.id_free = all(isinstance(p, _ID_FREE) for p in processors)
        self._groups: tuple[tuple[int, ...], list[tuple[int, list[int], torch.Tensor]]] | None = None

    def __call__(
        self,
        logits: torch.Tensor,
        history: torch.Tensor,
        lengths: list[int],
        extra: torch.Tensor,
        offset: int = 0,
    ) -> torch.Tensor:
        """Processed scores ``[B, n, V]`` (fp32).

        logits ``[B, n, V]``; history ``[B, *]`` the committed ids (prompt first); ``lengths[b]``
        committed ids of row b; extra ``[B, *]`` the drafts: position ``i`` of row ``b`` sees
        ``history[b, :lengths[b]] + extra[b, :offset + i]``.
        """
        logits = logits.float()
        if not self.processors:
            return logits
        batch, n, vocab = logits.shape
        if self.id_free:
            ids = history[:, :0].repeat_interleave(n, dim=0)
            return self.processors(ids, logits.reshape(batch * n, vocab)).reshape(batch, n, vocab)
        out = torch.empty_like(logits)
        for i in range(n):
            for rows, ids in self._aligned_batches(history, lengths, extra, offset + i):
                out[rows, i] = self.processors(ids, logits[:, i])[rows]
        return out

    def _aligned_batches(
        self, history: torch.Tensor, lengths: list[int], extra: torch.Tensor, extra_len: int
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Full-batch id tensors, one per distinct row length: rows of that length carry their own ids,
        the others a copy of one of them (their scores are discarded). Processors that hold per-row
        state (e.g. the repetition penalty's per-row prompt padding) thus always see the whole batch,
        as in ``generate``. The row groups are built once per set of lengths (once per round)."""
        return [
            (rows, torch.cat([history[source, :length], extra[source, :extra_len]], dim=1))
            for length, rows, source in self._row_groups(lengths, history.device)
        ]

    def _row_groups(
        self, lengths: list[int], device: torch.device
    ) -> list[tuple[int, list[int], torch.Tensor]]:
        """Per distinct length: the rows of that length and the ``[B]`` source row of every id row."""
        key = tuple(lengths)
        if self._groups is None or self._groups[0] != key:
            groups: dict[int, list[int]] = {}
            for b, length in enumerate(lengths):
                groups.setdefault(length, []).append(b)
            built = []
            for length, rows in groups.items():
                source = torch.full((len(lengths),), rows[0], dtype=torch.long)
                source[rows] = torch.tensor(rows)
                built.append((length, rows, source.to(device)))
            self._groups = key, built
        return self._groups[1]


class StopRule:
    """Where each row's generation ends, as ``generate``'s stopping criteria decide.

    Max length and EOS are evaluated on the device on whole windows of new tokens
    (:meth:`first_stop`); any other criterion (stop strings, max time, user criteria) is called on the
    host once per new token with the row's ids (:meth:`other_stop`).
    """

    def __init__(
        self,
        criteria: StoppingCriteriaList,
        prompt_len: int,
        default_max_length: int,
        device: torch.device | None = None,
    ) -> None:
        max_length = default_max_length
        eos: list[int] = []
        self.others = []
        for criterion in criteria:
            if isinstance(criterion, MaxLengthCriteria):
                max_length = min(max_length, criterion.max_length)
            elif isinstance(criterion, EosTokenCriteria):
                eos += [int(t) for t in torch.as_tensor(criterion.eos_token_id).flatten().tolist()]
            else:
                self.others.append(criterion)
        self.prompt_len = prompt_len
        self.max_new_tokens = max_length - prompt_len
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long, device=device)

    def first_stop(self, new: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """``[B]`` long: for each row, the index in ``new [B, n]`` of the token that ends it by EOS or
        max length (``>= n``: none does). ``generated [B]`` tokens of the row came before ``new``;
        everything stays on the device."""
        stop = self.max_new_tokens - 1 - generated  # the row's last token within max length
        if self.eos.numel():
            hits = torch.isin(new, self.eos)
            first = torch.where(hits.any(dim=1), hits.long().argmax(dim=1), new.shape[1])
            stop = torch.minimum(stop, first)
        return stop

    def other_stop(self, ids: torch.Tensor, n: int) -> int | None:
        """The index among the last ``n`` of ``ids [1, L]`` (a row's committed ids, its new tokens
        last) of the first token after which another criterion stops the row, or None."""
        if not self.others:
            return None
        base = ids.shape[1] - n
        for i in range(n):
            prefix = ids[:, : base + i + 1]
            if any(bool(c(prefix, None).any()) for c in self.others):
                return i
        return None
