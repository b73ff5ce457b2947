"""The no-copy dense cache of a shared prefill: each video's prefix KV once, per row only its own slots.

:func:`std_core.generate_shared` decodes Q questions about V videos as one batch. Their prompts share,
per video, a long prefix (the video's tokens) and differ only in a short suffix (the question). A plain
:class:`~std_core.kv_cache.SlotCache` would hold a copy of the video's prefix in every question's row
(``Q × (P + S + new)`` slots per layer). :class:`SharedPrefixCache` holds instead

- per video ``v`` and layer: the prefix keys/values ``[1, KVH, P_v, D]``, exactly the buffers of the
  video's batch-1 prefill (not copied);
- per row ``b``: its *own* slots, a SlotCache row ``[KVH, capacity, D]`` with the suffix in
  ``[0, S_b)`` and then the generated tokens. Every SlotCache mechanism (cursors, commit, rollback,
  the preallocated mask, :meth:`~SlotCache.adopt_tentative`, :meth:`~SlotCache.append_from`) works on
  these own slots unchanged.

So a call holds ``Σ_v P_v + Q × (S + new)`` slots per layer instead of ``Q × (P + S + new)``.

Attention (:meth:`SharedPrefixCache.attend`, installed by :func:`std_core.attention.shared_prefix`
for forwards over this cache: the suffixes' prefill, verifies and dense rounds): row ``b`` attends to
its video's prefix and to its own visible slots. The two parts are computed separately and merged
exactly (the split-softmax / flash-decoding merge): with ``m`` the larger of the two parts' maximum
logits, ``out = (Σ_pre e^(s−m) v + Σ_own e^(s−m) v) / (Σ_pre e^(s−m) + Σ_own e^(s−m))``, which is the
softmax over the concatenated keys up to rounding. The queries of all of a video's rows are stacked
against its one prefix (one attention call per video and layer, the prefix read once, not once per
question). On a CPU each part is PyTorch's fused CPU attention kernel, the one ``F.scaled_dot_product_attention``
runs there, called through its aten op so that it also returns the log-sum-exp the merge needs
(``aten._scaled_dot_product_flash_attention_for_cpu``; measured faster than one SDPA over the copied
rows). Elsewhere (no such op) the scores are computed in fp32 and materialised in chunks of rows of
at most ``_ATTEND_CHUNK_BYTES``.

Slots of a row in the *virtual* layout that selection uses (:class:`~std_core.selection.PromptLayout`,
``keep_index``): ``[0, P_b)`` is the prefix, ``[P_b, P_b + S_b)`` the suffix, as the copying path lays
row ``b`` out; virtual slot ``j >= P_b`` is own slot ``j - P_b``. :meth:`SharedPrefixCache.gather_kept`
builds the draft's sparse cache from the prefix storage and the own slots through that map, and
:class:`NoCopyPrefixObserver` scores the visual tokens from split logits (prefix keys, own keys),
softmaxed together, so neither ever assembles a row's full key sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from std_core.kv_cache import SlotCache
from std_core.selection import PromptLayout, SharedPrefixObserver, keep_index
from std_core.stats import PhaseTimer

# Bound on the fp32 attention scores materialised at once per video chunk (bytes).
_ATTEND_CHUNK_BYTES = 64 * 2**20
# PyTorch's fused CPU attention, returning (output, logsumexp); None where this build lacks it.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


class SharedPrefixCache(SlotCache):
    """A dense :class:`SlotCache` of own slots (suffix + generated tokens) per row, plus each video's
    prefix stored once (see the module docstring).

    ``prefixes[v]`` is video ``v``'s batch-1 prefill cache (valid slots ``[0, P_v)``), kept as it is;
    ``video_of_row[b]`` the video row ``b`` continues (rows of one video must be contiguous). The own
    slots start empty (``starts = lengths = 0``); the first forward (the suffixes) writes them.
    """

    def __init__(
        self,
        prefixes: list[SlotCache],
        video_of_row: list[int],
        capacity: int,
        max_query: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(len(prefixes[0].layers), capacity, max_query, groups)
        self.prefixes = prefixes
        self.video_of_row = list(video_of_row)
        self.prefix_length_of_video = [p._lengths_host[0] for p in prefixes]
        self.spans = _contiguous_spans(self.video_of_row)  # [(video, rows slice)]
        device = prefixes[0].lengths.device
        self.prefix_lengths = torch.tensor(
            [self.prefix_length_of_video[v] for v in self.video_of_row], dtype=torch.long, device=device
        )  # [Q] P_b
        empty = torch.zeros(len(self.video_of_row), dtype=torch.long, device=device)
        self.reset_rows(empty, empty)

    def prefix_kv(self, layer_idx: int, video: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Video ``video``'s prefix keys and values of one layer, ``[KVH, P_v, D]`` each (views)."""
        layer, n = self.prefixes[video].layers[layer_idx], self.prefix_length_of_video[video]
        return layer.keys[0, :, :n], layer.values[0, :, :n]

    def attended_length(self) -> int:
        """The most keys a row's query reads: its prefix plus its own slots (a cost-cache key)."""
        return max(self.prefix_length_of_video) + self.max_cursor()

    # ------------------------------------------------------------------------------------ attention
    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """Row b's attention over its video's prefix and its own slots, merged exactly.

        query ``[B, H, q, D]``; key/value ``[B, KVH, L, D]`` the own slots (what this layer's update
        returned); mask ``[B, 1, G*q, L]`` over them, additive or bool, rows ``g*q + i`` for query
        ``i`` (:meth:`SlotCache.begin_forward`, :meth:`SlotCache.allowed`). Returns ``[B, q, H, D]``.
        """
        batch, heads, q, dim = query.shape
        kv_heads = key.shape[1]
        rows = heads // kv_heads * q
        folded = query.reshape(batch, kv_heads, rows, dim)
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
                ~mask, float("-inf")
            )
        out = torch.empty_like(folded)
        fused = _FLASH_CPU is not None and query.device.type == "cpu"
        for video, span in self.spans:
            prefix_keys, prefix_values = self.prefix_kv(layer_idx, video)
            if fused:
                out[span] = _fused_cpu_attention(
                    folded[span], key[span], value[span], mask[span], prefix_keys, prefix_values, scaling
                )
                continue
            per_row = kv_heads * rows * (prefix_keys.shape[1] + key.shape[2]) * 4
            step = max(1, _ATTEND_CHUNK_BYTES // per_row)
            for start in range(span.start, span.stop, step):
                part = slice(start, min(start + step, span.stop))
                out[part] = _merged_attention(
                    folded[part], key[part], value[part], mask[part], prefix_keys, prefix_values, scaling
                )
        return out.reshape(batch, heads, q, dim).transpose(1, 2)

    # ---------------------------------------------------------------------------------- the draft
    def gather_kept(
        self, index: list[torch.Tensor], starts: torch.Tensor, capacity: int, groups: int = 1
    ) -> SlotCache:
        """The sparse cache: per layer, virtual slots ``index[layer]`` (``[B, KVH, S]``, valid from
        ``starts[b]``) gathered from the prefix storage (slots ``< P_b``) and the own slots (the
        rest), as :meth:`SlotCache.gathered` gathers them from a copying cache."""
        cache = SlotCache(len(self.layers), capacity, 1, groups)
        prefix = self.prefix_lengths[:, None, None]
        for i, (layer, own, idx) in enumerate(zip(cache.layers, self.layers, index, strict=True)):
            dim = own.keys.shape[-1]
            in_prefix = (idx < prefix)[..., None]
            own_idx = (idx - prefix).clamp(min=0)[..., None].expand(-1, -1, -1, dim)
            keys, values = own.keys.gather(2, own_idx), own.values.gather(2, own_idx)
            for video, span in self.spans:
                prefix_keys, prefix_values = self.prefix_kv(i, video)
                n, sel = span.stop - span.start, in_prefix[span]
                pre_idx = idx[span].clamp(max=prefix_keys.shape[1] - 1)[..., None].expand(-1, -1, -1, dim)
                pre_k = prefix_keys[None].expand(n, -1, -1, -1).gather(2, pre_idx)
                pre_v = prefix_values[None].expand(n, -1, -1, -1).gather(2, pre_idx)
                keys[span] = torch.where(sel, pre_k, keys[span])
                values[span] = torch.where(sel, pre_v, values[span])
            kept = idx.shape[-1]
            layer.lazy_initialization(keys[:, :, :0], values[:, :, :0])
            layer.keys[:, :, :kept] = keys
            layer.values[:, :, :kept] = values
        cache.reset_rows(starts, torch.full_like(starts, index[0].shape[-1]))
        return cache

    def nbytes(self) -> int:
        """Bytes held by the own slots' buffers plus every video's prefix buffers (once each)."""
        return super().nbytes() + sum(p.nbytes() for p in self.prefixes)


def _merged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of ``query [n, KVH, R, D]`` (n rows of one video) over that video's prefix
    ``[KVH, P, D]`` (every query sees all of it) and the rows' own slots ``[n, KVH, L, D]`` under
    ``mask [n, 1, R, L]`` (additive), as one softmax over the concatenated keys (log-sum-exp merge).
    fp32 inside; returns ``[n, KVH, R, D]`` in the query's dtype."""
    n, kv_heads, rows, dim = query.shape
    f32 = torch.float32
    q = query.to(f32)
    own = torch.matmul(q, key.to(f32).transpose(-1, -2)).mul_(scaling).add_(mask.to(f32))  # [n,KVH,R,L]
    stacked = q.transpose(0, 1).reshape(kv_heads, n * rows, dim)  # the video's queries, one matmul
    pre = torch.matmul(stacked, prefix_keys.to(f32).transpose(-1, -2)).mul_(scaling)  # [KVH, n*R, P]
    pre_max = pre.amax(dim=-1).reshape(kv_heads, n, rows).transpose(0, 1)  # [n, KVH, R]
    top = torch.maximum(own.amax(dim=-1), pre_max)  # finite: every query sees the whole prefix
    own = own.sub_(top[..., None]).exp_()
    pre = pre.sub_(top.transpose(0, 1).reshape(kv_heads, n * rows)[..., None]).exp_()
    pre_out = torch.matmul(pre, prefix_values.to(f32)).reshape(kv_heads, n, rows, dim).transpose(0, 1)
    numerator = torch.matmul(own, value.to(f32)).add_(pre_out)
    denominator = own.sum(dim=-1).add_(pre.sum(dim=-1).reshape(kv_heads, n, rows).transpose(0, 1))
    return numerator.div_(denominator[..., None]).to(query.dtype)


def _fused_cpu_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """:func:`_merged_attention` with PyTorch's fused CPU kernel for each part: the prefix part with
    the video's queries stacked ``[1, KVH, n*R, D]`` (no mask: every query sees the whole prefix), the
    own part under ``mask``; merged by their log-sum-exps, ``out = Σ_part o_part · e^(lse_part − m) /
    Σ_part e^(lse_part − m)``, in fp32."""
    n, kv_heads, rows, dim = query.shape
    stacked = query.transpose(0, 1).reshape(1, kv_heads, n * rows, dim)
    pre, pre_lse = _FLASH_CPU(stacked, prefix_keys[None], prefix_values[None], scale=scaling)
    own, own_lse = _FLASH_CPU(query, key, value, attn_mask=mask.to(query.dtype), scale=scaling)
    pre = pre.reshape(kv_heads, n, rows, dim).transpose(0, 1).float()
    pre_lse = pre_lse.reshape(kv_heads, n, rows).transpose(0, 1).float()
    own_lse = own_lse.float()
    top = torch.maximum(pre_lse, own_lse)  # the own part is never empty: a query sees itself
    pre_weight, own_weight = (pre_lse - top).exp_(), (own_lse - top).exp_()
    out = pre.mul_(pre_weight[..., None]).add_(own.float() * own_weight[..., None])
    return out.div_((pre_weight + own_weight)[..., None]).to(query.dtype)


def _contiguous_spans(video_of_row: list[int]) -> list[tuple[int, slice]]:
    """``[(video, rows)]``: the contiguous run of rows of every video (raises if a video's rows are split)."""
    spans: list[tuple[int, slice]] = []
    for b, v in enumerate(video_of_row):
        if spans and spans[-1][0] == v:
            spans[-1] = (v, slice(spans[-1][1].start, b + 1))
        else:
            if any(v == seen for seen, _ in spans):
                raise ValueError("SharedPrefixCache: the rows of a video must be contiguous")
            spans.append((v, slice(b, b + 1)))
    return spans


class NoCopyPrefixObserver(SharedPrefixObserver):
    """:class:`SharedPrefixObserver` for a :class:`SharedPrefixCache`: the suffixes' forward sees only
    the own slots' keys, so each row's text queries are scored against its video's prefix keys (kept
    from the prefix prefill, views of the prefix storage) and its own keys, with logits concatenated
    before the one softmax, the same softmax as over the row's whole prompt."""

    def __init__(
        self, layout: PromptLayout, prefix_lengths: list[int], video_of_row: list[int], timer: PhaseTimer
    ) -> None:
        super().__init__(layout, prefix_lengths, video_of_row, timer)
        self._prefix_keys: dict[tuple[int, int], torch.Tensor] = {}  # (video, layer) -> [KVH, P_v, D]

    def prefix(
        self, video: int, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None:
        super().prefix(video, layer_idx, query, key, scaling)
        self._prefix_keys[video, layer_idx] = key[0]

    def suffix(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Observe the suffixes' forward: query ``[Q, H, S, D]``, key ``[Q, KVH, S, D]`` (own slots);
        keep this layer's index ``[Q, KVH, K_max]`` over virtual slots (module docstring)."""
        with self.timer.phase("select"):
            width = self.layout.valid.shape[1]
            rows = []
            for b, pos in enumerate(self._suffix_pos):
                video, offset = self.video_of_row[b], self.prefix_lengths[b]
                total = F.pad(self._prefix_sums[video, layer_idx], (0, width - offset))
                if pos.numel():
                    own_valid = self.layout.valid[b, offset : offset + key.shape[2]]
                    sums = split_visual_score_sums(
                        query[b],
                        self._prefix_keys[video, layer_idx],
                        key[b],
                        pos - offset,
                        own_valid,
                        scaling,
                    )
                    total = total + F.pad(sums, (0, width - sums.shape[1]))
                rows.append(total / max(1, pos.numel() + self._prefix_pos[video].numel()))
            self.index[layer_idx], self.starts = keep_index(torch.stack(rows), self.layout)
            for video in self._prefix_pos:
                del self._prefix_sums[video, layer_idx]
                del self._prefix_keys[video, layer_idx]


def split_visual_score_sums(
    query: torch.Tensor,
    prefix_key: torch.Tensor,
    own_key: torch.Tensor,
    own_pos: torch.Tensor,
    own_valid: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """:func:`~std_core.selection.visual_score_sums` of one row whose keys are a prefix
    ``[KVH, P, D]`` (seen by every query) and own keys ``[KVH, L, D]``: ``[KVH, P + L]`` fp32 sums.

    ``query [H, L, D]`` are the own slots' queries; ``own_pos`` which of them score (own slots);
    ``own_valid [L]`` which own slots hold a prompt token. Query ``i`` sees the whole prefix and the
    valid own slots up to ``i``, in one softmax over both parts' logits.
    """
    heads, dim = query.shape[0], query.shape[2]
    kv_heads, length = own_key.shape[0], own_key.shape[1]
    groups = heads // kv_heads
    prefix_keys, own_keys = prefix_key.float(), own_key.float()
    total = torch.zeros(kv_heads, prefix_key.shape[1] + length, dtype=torch.float32, device=own_key.device)
    positions = torch.arange(length, device=own_key.device)
    chunk = max(1, _ATTEND_CHUNK_BYTES // max(1, heads * (prefix_key.shape[1] + length) * 4))
    for start in range(0, own_pos.numel(), chunk):
        pos = own_pos[start : start + chunk]
        q = query[:, pos].float().reshape(kv_heads, groups * pos.numel(), dim)
        own = torch.matmul(q, own_keys.transpose(1, 2))
        allowed = own_valid[None, :] & (positions[None, :] <= pos[:, None])  # [T, L]
        own = own.masked_fill(~allowed.repeat(groups, 1)[None], float("-inf"))
        logits = torch.cat([torch.matmul(q, prefix_keys.transpose(1, 2)), own], dim=-1) * scaling
        total += torch.softmax(logits, dim=-1).sum(dim=1)
    return total
