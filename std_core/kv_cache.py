"""SlotCache: a preallocated KV cache whose rows advance independently; rollback is arithmetic.

Both caches of the decoder are SlotCaches:

- the *dense* cache holds every prompt token (left padding included) and every committed token;
- the *sparse* cache holds, per (layer, KV head), the kept prompt tokens gathered once after prefill
  (:meth:`SlotCache.gathered`), then every committed token, with the dense model's keys and values
  (:meth:`SlotCache.adopt_tentative`).

Layout, per layer: ``keys``/``values`` are ``[B, KVH, capacity, D]`` buffers. Row ``b`` holds valid
entries in slots ``[starts[b], lengths[b])``. A forward of ``q`` new tokens writes row ``b`` at slots
``[lengths[b] + pending, lengths[b] + pending + q)``, where ``pending`` counts the tentative tokens
already written this round (the same for every row). :meth:`commit` then keeps ``n[b]`` of the
``pending`` tentative tokens of each row and drops the rest, which is the whole rollback: slots past
``lengths[b]`` are never read (the mask hides them) and are overwritten by the next round.

Invariants: ``0 <= starts[b] <= lengths[b]``, ``lengths[b] + pending < capacity`` (the last slot is a
spare that is never valid, see :meth:`append_from`); the slot index is
not a RoPE position (positions are passed to the model explicitly). The cache is the only owner of
this state; the decoder changes it only through :meth:`begin_forward`, :meth:`commit` and
:meth:`adopt_tentative`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer of a :class:`SlotCache`: writes new keys/values at the owner's per-row cursors."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        shape = (batch, heads, self.owner.capacity, head_dim)
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, KVH, q, D]`` new states at the row cursors; return the readable prefix of the cache."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        q = key_states.shape[2]
        start = owner.uniform_cursor()
        if start is not None:
            self.keys[:, :, start : start + q] = key_states
            self.values[:, :, start : start + q] = value_states
        else:
            index = owner.write_index(q).expand(-1, key_states.shape[1], -1, key_states.shape[3])
            self.keys.scatter_(2, index, key_states)
            self.values.scatter_(2, index, value_states)
        end = owner.max_cursor() + q
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.max_cursor() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.max_cursor()

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """A Hugging Face ``Cache`` of :class:`SlotLayer` s with per-row valid ranges (see module docstring)."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.capacity = capacity
        self.pending = 0
        self.starts: torch.Tensor | None = None  # [B] first valid slot
        self.lengths: torch.Tensor | None = None  # [B] end of the committed slots
        self._lengths_host: list[int] = []

    # ----------------------------------------------------------------------------------------- state
    def reset_rows(self, starts: torch.Tensor, lengths: torch.Tensor) -> None:
        """Declare the valid range of every row (after prefill or after gathering)."""
        self.starts = starts.to(torch.long)
        self.lengths = lengths.to(torch.long)
        self._lengths_host = [int(x) for x in lengths.tolist()]
        self.pending = 0
        if max(self._lengths_host) > self.capacity:
            raise ValueError(f"SlotCache: {max(self._lengths_host)} tokens exceed capacity {self.capacity}")

    def uniform_cursor(self) -> int | None:
        """The common write slot when every row has the same length (a slice write), else None."""
        if not self._lengths_host:  # before reset_rows: the prefill writes from slot 0
            return self.pending
        first = self._lengths_host[0]
        if all(x == first for x in self._lengths_host):
            return first + self.pending
        return None

    def max_cursor(self) -> int:
        return (max(self._lengths_host) if self._lengths_host else 0) + self.pending

    def write_index(self, q: int) -> torch.Tensor:
        """``[B, 1, q, 1]`` slot indices of the next ``q`` tokens of every row."""
        assert self.lengths is not None
        offsets = torch.arange(q, device=self.lengths.device)
        return (self.lengths[:, None] + self.pending + offsets[None, :])[:, None, :, None]

    # ---------------------------------------------------------------------------------- the protocol
    def begin_forward(self, q: int, groups: int) -> torch.Tensor:
        """The attention mask of a forward of ``q`` new tokens, ``[B, 1, groups * q, kv_len]`` bool.

        Query ``i`` of row ``b`` sees slots ``starts[b] <= j <= lengths[b] + pending + i``: the row's
        valid entries, this round's tentative tokens and itself. The query rows are tiled ``groups``
        times (row ``g * q + i``) to match grouped-query attention, see :mod:`std_core.attention`.
        """
        assert self.starts is not None and self.lengths is not None
        end = self.max_cursor() + q
        if end > self.capacity:
            raise RuntimeError(f"SlotCache overflow: {end} slots needed, capacity {self.capacity}")
        slots = torch.arange(end, device=self.lengths.device)
        limit = self.lengths[:, None] + self.pending + torch.arange(q, device=self.lengths.device)[None, :]
        mask = (slots[None, None, :] >= self.starts[:, None, None]) & (
            slots[None, None, :] <= limit[:, :, None]
        )
        return mask.repeat(1, groups, 1)[:, None]

    def end_forward(self, q: int) -> None:
        """Count the ``q`` tokens just written as tentative."""
        self.pending += q

    def commit(self, keep: torch.Tensor, keep_host: list[int]) -> None:
        """Keep the first ``keep[b]`` tentative tokens of row ``b``; drop the rest (the rollback)."""
        assert self.lengths is not None
        if any(k < 0 or k > self.pending for k in keep_host):
            raise ValueError(f"SlotCache.commit: keep {keep_host} outside [0, {self.pending}]")
        self.lengths = self.lengths + keep
        self._lengths_host = [a + b for a, b in zip(self._lengths_host, keep_host, strict=True)]
        self.pending = 0

    def adopt_tentative(self, other: SlotCache) -> None:
        """Replace this round's tentative tokens with ``other``'s (``other.pending`` of them per row).

        Used after a verify: the dense keys/values of ``[pending] + drafts`` overwrite the sparse ones,
        so after :meth:`commit` the sparse cache holds the dense states of every committed token.
        """
        assert self.lengths is not None and other.lengths is not None
        q = other.pending
        src = (other.lengths[:, None] + torch.arange(q, device=other.lengths.device)[None, :])[
            :, None, :, None
        ]
        if max(self._lengths_host) + q > self.capacity:
            raise RuntimeError(f"SlotCache overflow adopting {q} tokens (capacity {self.capacity})")
        self.pending = 0
        self._copy(other, src, self.write_index(q))
        self.pending = q

    def append_from(self, other: SlotCache, counts: list[int]) -> None:
        """Append to row ``b`` the last ``counts[b]`` committed tokens of ``other`` (committed here at once).

        Brings the sparse cache up to date after dense-only rounds (``mode="auto"`` with γ = 0), which
        skip the per-round copy. Slots past a row's count go to the last slot, which is never valid
        (capacity keeps one spare), so rows with different counts share one gather/scatter.
        """
        assert self.lengths is not None and other.lengths is not None and self.pending == 0
        q = max(counts)
        if q == 0:
            return
        device = self.lengths.device
        count = torch.tensor(counts, device=device)
        i = torch.arange(q, device=device)[None]
        used = i < count[:, None]
        src = torch.where(used, other.lengths[:, None] - count[:, None] + i, 0)[:, None, :, None]
        dst = torch.where(used, self.lengths[:, None] + i, self.capacity - 1)[:, None, :, None]
        if max(self._lengths_host) + q >= self.capacity:
            raise RuntimeError(f"SlotCache overflow appending {q} tokens (capacity {self.capacity})")
        self._copy(other, src, dst)
        self.lengths = self.lengths + count
        self._lengths_host = [a + b for a, b in zip(self._lengths_host, counts, strict=True)]

    def _copy(self, other: SlotCache, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Per layer: this cache's slots ``dst [B, 1, q, 1]`` = ``other``'s slots ``src``."""
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            heads, dim = theirs.keys.shape[1], theirs.keys.shape[3]
            src_i, dst_i = src.expand(-1, heads, -1, dim), dst.expand(-1, heads, -1, dim)
            mine.keys.scatter_(2, dst_i, theirs.keys.gather(2, src_i))
            mine.values.scatter_(2, dst_i, theirs.values.gather(2, src_i))

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def gathered(
        cls, source: SlotCache, index: list[torch.Tensor], starts: torch.Tensor, capacity: int
    ) -> SlotCache:
        """A compact cache of ``source``'s slots ``index[layer]`` (``[B, KVH, S]``, ascending, valid from
        ``starts[b]``), with room for ``capacity - S`` more tokens per row."""
        cache = cls(len(source.layers), capacity)
        for layer, src, idx in zip(cache.layers, source.layers, index, strict=True):
            kept = idx.shape[-1]
            gather_idx = idx[..., None].expand(-1, -1, -1, src.keys.shape[-1])
            layer.lazy_initialization(src.keys[:, :, :0], src.values[:, :, :0])
            layer.keys[:, :, :kept] = src.keys.gather(2, gather_idx)
            layer.values[:, :, :kept] = src.values.gather(2, gather_idx)
        kept = index[0].shape[-1]
        cache.reset_rows(starts, torch.full_like(starts, kept))
        return cache

    @classmethod
    def from_prefixes(cls, prefixes: list[SlotCache], rows: list[int], capacity: int) -> SlotCache:
        """A cache whose row ``b`` starts with a copy of the one row of ``prefixes[rows[b]]`` (a
        video's prompt prefix, shared by several questions), with room for ``capacity`` slots per row."""
        cache = cls(len(prefixes[0].layers), capacity)
        lengths = [prefixes[v]._lengths_host[0] for v in rows]
        for i, layer in enumerate(cache.layers):
            first = prefixes[0].layers[i]
            empty = first.keys[:, :, :0].expand(len(rows), -1, -1, -1)
            layer.lazy_initialization(empty, first.values[:, :, :0].expand(len(rows), -1, -1, -1))
            for v, source in enumerate(prefixes):
                members = [b for b, r in enumerate(rows) if r == v]
                n = source._lengths_host[0]
                layer.keys[members, :, :n] = source.layers[i].keys[:, :, :n]
                layer.values[members, :, :n] = source.layers[i].values[:, :, :n]
        starts = torch.zeros(len(rows), dtype=torch.long, device=prefixes[0].lengths.device)
        cache.reset_rows(starts, torch.tensor(lengths, device=starts.device))
        return cache

    def nbytes(self) -> int:
        """Bytes held by the key/value buffers (both tensors, all layers)."""
        return sum(
            layer.keys.numel() * layer.keys.element_size() * 2
            for layer in self.layers
            if layer.is_initialized
        )
