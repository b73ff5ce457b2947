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

    @staticmethod
    def _aligned_batches(
        history: torch.Tensor, lengths: list[int], extra: torch.Tensor, extra_len: int
    ) -> list[tuple[list[int], torch.Tensor]]:
        """Full-batch id tensors, one per distinct row length: rows of that length carry their own ids,
        the others a copy of one of them (their scores are discarded). Processors that hold per-row
        state (e.g. the repetition penalty's per-row prompt padding) thus always see the whole batch,
        as in ``generate``."""
        groups: dict[int, list[int]] = {}
        for b, length in enumerate(lengths):
            groups.setdefault(length, []).append(b)
        batches = []
        for length, rows in groups.items():
            source = torch.full((len(lengths),), rows[0], dtype=torch.long)
            source[rows] = torch.tensor(rows)
            source = source.to(history.device)
            ids = torch.cat([history[source, :length], extra[source, :extra_len]], dim=1)
            batches.append((rows, ids))
        return batches


class StopRule:
    """Where each row's generation ends, as ``generate``'s stopping criteria decide.

    Max length and EOS are evaluated natively on whole windows of new tokens; any other criterion
    (stop strings, max time, user criteria) is called once per new token with the row's ids.
    """

    def __init__(self, criteria: StoppingCriteriaList, prompt_len: int, default_max_length: int) -> None:
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
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long)

    def stop_index(self, new: torch.Tensor, history: torch.Tensor, generated: list[int]) -> list[int | None]:
        """For each row, the index in ``new [B, n]`` (on the CPU) of the token that ends it, or None.

        ``generated[b]`` tokens of row b were committed before ``new``; ``history`` holds the
        committed ids (prompt first, ``new`` not yet written), on the model's device.
        """
        batch, n = new.shape
        cut = torch.full((batch,), n, dtype=torch.long)
        if self.eos.numel():
            hits = torch.isin(new, self.eos)
            first = torch.where(hits.any(dim=1), hits.long().argmax(dim=1), n)
            cut = torch.minimum(cut, first)
        result: list[int | None] = []
        for b in range(batch):
            stop = min(int(cut[b]), self.max_new_tokens - generated[b] - 1)
            stop = self._other_stop(b, new, history, generated, stop)
            result.append(stop if stop < n else None)
        return result

    def _other_stop(
        self, b: int, new: torch.Tensor, history: torch.Tensor, generated: list[int], stop: int
    ) -> int:
        if not self.others:
            return stop
        base = history[b, : self.prompt_len + generated[b]]
        for i in range(min(stop, new.shape[1] - 1) + 1):
            ids = torch.cat([base, new[b, : i + 1].to(base.device)])[None]
            if any(bool(c(ids, None).any()) for c in self.others):
                return i
        return stop
