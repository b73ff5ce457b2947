"""Which prompt tokens the sparse cache keeps: pure tensor functions, plus the prefill observer.

Selection happens once, right after prefill, and is fixed for the whole decode:

- every non-visual, non-padding prompt token is kept (m_t of them in row b);
- K_b = clamp(sparse_budget - m_t, 0, visual tokens of row b) visual tokens are kept per
  (layer, KV head), ranked by :func:`visual_scores` (``"text_topk"``, the paper's draft) or by
  position (``"sink_window"``: the first ``sink_tokens`` and the most recent ones).

The kept slots of a row are returned in ascending (absolute-position) order and right-aligned: row b's
``c_b = m_t + K_b`` entries fill ``[S - c_b, S)`` of an ``[B, KVH, S]`` index, ``S = max_b c_b``; the
left part is padding (index 0, masked by ``starts``). Ascending order matters: the reproduction saw
acceptance fall from 7.1 to 3.1 tokens per round with unsorted entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from std_core.stats import PhaseTimer

# Bound on the fp32 score matrix materialised per row and chunk of text queries (bytes).
_SCORE_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PromptLayout:
    """Per-row facts about the prompt that selection needs (all ``[B, L]`` bool unless noted)."""

    valid: torch.Tensor  # not padding
    visual: torch.Tensor  # image or video placeholder tokens
    score_queries: torch.Tensor  # text tokens whose attention scores the visual tokens
    keep_counts: torch.Tensor  # [B] long: c_b = m_t + K_b

    @classmethod
    def build(
        cls, valid: torch.Tensor, visual: torch.Tensor, sparse_budget: int, queries: str
    ) -> PromptLayout:
        visual = visual & valid
        text = valid & ~visual
        positions = torch.arange(valid.shape[1], device=valid.device)
        has_visual = visual.any(dim=1, keepdim=True)
        first = torch.where(visual, positions, valid.shape[1]).min(dim=1, keepdim=True).values
        last = torch.where(visual, positions, -1).max(dim=1, keepdim=True).values
        after = positions[None, :] > (first if queries == "all_text" else last)
        score_queries = text & after & has_visual
        m_t = text.sum(dim=1)
        k = (sparse_budget - m_t).clamp(min=0)
        k = torch.minimum(k, visual.sum(dim=1))
        return cls(valid, visual, score_queries, m_t + k)


def visual_scores(
    query: torch.Tensor, key: torch.Tensor, query_pos: torch.Tensor, key_valid: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention that the text queries of one row give every key, summed over the query heads of each
    KV head and averaged over the text queries: ``[KVH, L]`` fp32.

    query ``[H, L, D]`` (post-RoPE, the prefill's own), key ``[KVH, L, D]`` (the cached keys),
    query_pos ``[T]`` long: which positions are text queries; key_valid ``[L]`` bool (not padding).
    Each query attends causally to the valid keys up to its own position, over all keys (text
    included), exactly the softmax the model computed, in fp32.
    """
    return visual_score_sums(query, key, query_pos, key_valid, scaling) / max(1, query_pos.numel())


def visual_score_sums(
    query: torch.Tensor,
    key: torch.Tensor,
    query_pos: torch.Tensor,
    key_valid: torch.Tensor,
    scaling: float,
    query_offset: int = 0,
) -> torch.Tensor:
    """:func:`visual_scores` before the average over the text queries: ``[KVH, L]`` fp32 sums.

    ``query [H, q, D]`` holds the queries of positions ``[query_offset, query_offset + q)`` (a
    suffix prefilled after a cached prefix: ``query_offset`` = the prefix length); ``query_pos`` are
    absolute positions, as the keys ``[KVH, L, D]`` are indexed.
    """
    heads, dim = query.shape[0], query.shape[2]
    kv_heads, length = key.shape[0], key.shape[1]
    groups = heads // kv_heads
    keys = key.float()
    total = torch.zeros(kv_heads, length, dtype=torch.float32, device=key.device)
    positions = torch.arange(length, device=key.device)
    chunk = max(1, _SCORE_CHUNK_BYTES // max(1, heads * length * 4))
    for start in range(0, query_pos.numel(), chunk):
        pos = query_pos[start : start + chunk]
        q = query[:, pos - query_offset].float().reshape(kv_heads, groups * pos.numel(), dim)
        logits = torch.matmul(q, keys.transpose(1, 2)) * scaling  # [KVH, G*T, L]
        allowed = key_valid[None, :] & (positions[None, :] <= pos[:, None])  # [T, L]
        logits = logits.masked_fill(~allowed.repeat(groups, 1)[None], float("-inf"))
        total += torch.softmax(logits, dim=-1).sum(dim=1)
    return total


def keep_index(
    scores: torch.Tensor, layout: PromptLayout, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept prompt slots per (row, KV head), ascending and right-aligned.

    scores ``[B, KVH, L]`` rank the visual tokens (higher is kept first). Returns ``index``
    ``[B, KVH, S]`` long and ``starts`` ``[B]``: row b's kept slots are ``index[b, :, starts[b]:]``.
    """
    text = layout.valid & ~layout.visual
    ranked = scores.float().masked_fill(text[:, None], float("inf"))
    ranked = ranked.masked_fill(~layout.valid[:, None], float("-inf"))
    width = int(layout.keep_counts.max()) if width is None else width
    top = ranked.topk(width, dim=-1, sorted=True).indices  # [B, KVH, S], best first
    rank = torch.arange(width, device=scores.device)
    kept = rank[None, None, :] < layout.keep_counts[:, None, None]
    index = torch.where(kept, top, -1).sort(dim=-1).values  # padding (-1) first, then ascending
    starts = width - layout.keep_counts
    return index.clamp(min=0), starts


def sink_window_scores(layout: PromptLayout, kv_heads: int, sink_tokens: int) -> torch.Tensor:
    """Scores for the sink + recent-window draft: the first ``sink_tokens`` visual tokens rank first,
    then the remaining visual tokens from the most recent backwards. ``[B, KVH, L]``."""
    order = layout.visual.long().cumsum(dim=1)  # 1-based rank of each visual token in the row
    length = layout.visual.shape[1]
    recent = order.float()  # later visual tokens score higher
    sink = (order <= sink_tokens) & layout.visual
    scores = torch.where(sink, float(2 * length), recent)
    return scores[:, None, :].expand(-1, kv_heads, -1)


class SelectionObserver:
    """Collects, layer by layer during the prefill, the text-guided top-K index of every layer.

    Called by the registered attention function with the post-RoPE query ``[B, H, L, D]`` and the
    layer's keys ``[B, KVH, L, D]`` (the dense cache after this layer's update). Only the small
    ``[B, KVH, S]`` index is kept per layer.
    """

    def __init__(self, layout: PromptLayout, timer: PhaseTimer) -> None:
        self.layout = layout
        self.timer = timer
        self.index: dict[int, torch.Tensor] = {}
        self.starts: torch.Tensor | None = None
        self._query_pos = [row.nonzero().flatten() for row in layout.score_queries]

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        if query.shape[2] != key.shape[2]:
            raise RuntimeError("selection must observe a single prefill forward over the whole prompt")
        with self.timer.phase("select"):
            rows = [
                visual_scores(query[b], key[b], pos, self.layout.valid[b], scaling)
                if pos.numel()
                else torch.zeros(key.shape[1], key.shape[2], device=key.device)
                for b, pos in enumerate(self._query_pos)
            ]
            self.index[layer_idx], self.starts = keep_index(torch.stack(rows), self.layout)


class SharedPrefixObserver:
    """The text-guided top-K index of prompts prefilled in two steps, ranked as
    :class:`SelectionObserver` ranks the whole prompt.

    Row b's prompt is its video's prefix (slots ``[0, P_b)``, prefilled once per video, batch 1:
    :meth:`prefix`) followed by its own suffix (slots ``[P_b, P_b + S_b)``, one forward for every
    row: :meth:`suffix`). ``layout`` is in those slots. A row's score is the attention of the score
    queries in its prefix (shared by the video's rows) plus those in its suffix, over their count:
    the average of :func:`visual_scores` over the whole prompt. Each row gets its own top-K.
    """

    def __init__(
        self, layout: PromptLayout, prefix_lengths: list[int], video_of_row: list[int], timer: PhaseTimer
    ) -> None:
        self.layout = layout
        self.timer = timer
        self.prefix_lengths = prefix_lengths  # [Q] P_b
        self.video_of_row = video_of_row  # [Q] which prefix row b continues
        self.index: dict[int, torch.Tensor] = {}
        self.starts: torch.Tensor | None = None
        queries = layout.score_queries
        first_row = {v: video_of_row.index(v) for v in sorted(set(video_of_row))}
        self._prefix_pos = {
            v: queries[b, : prefix_lengths[b]].nonzero().flatten() for v, b in first_row.items()
        }
        self._suffix_pos = [
            queries[b, p:].nonzero().flatten() + p for b, p in enumerate(prefix_lengths)
        ]  # absolute slots
        self._prefix_sums: dict[tuple[int, int], torch.Tensor] = {}  # (video, layer) -> [KVH, P_v]

    def prefix(
        self, video: int, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None:
        """Observe the prefill of ``video``'s prefix: query ``[1, H, P, D]``, key ``[1, KVH, P, D]``."""
        with self.timer.phase("select"):
            pos = self._prefix_pos[video]
            valid = torch.ones(key.shape[2], dtype=torch.bool, device=key.device)
            sums = torch.zeros(key.shape[1], key.shape[2], device=key.device)
            if pos.numel():
                sums = visual_score_sums(query[0], key[0], pos, valid, scaling)
            self._prefix_sums[video, layer_idx] = sums

    def suffix(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Observe the suffixes' prefill: query ``[Q, H, S, D]`` (row b's at slots ``P_b + i``), key
        ``[Q, KVH, max P + S, D]``; keep this layer's index ``[Q, KVH, K_max]``."""
        with self.timer.phase("select"):
            rows = []
            for b, pos in enumerate(self._suffix_pos):
                video, offset = self.video_of_row[b], self.prefix_lengths[b]
                total = F.pad(self._prefix_sums[video, layer_idx], (0, key.shape[2] - offset))
                if pos.numel():
                    total = total + visual_score_sums(
                        query[b], key[b], pos, self.layout.valid[b], scaling, query_offset=offset
                    )
                rows.append(total / max(1, pos.numel() + self._prefix_pos[video].numel()))
            self.index[layer_idx], self.starts = keep_index(torch.stack(rows), self.layout)
            for video in self._prefix_pos:
                del self._prefix_sums[video, layer_idx]
