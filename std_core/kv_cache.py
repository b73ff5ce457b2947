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

The mask is preallocated too: ``bias [B, 1, groups · max_query, capacity]``, additive (0 where a
query may attend, −inf elsewhere, in the keys' dtype), so a decode forward's mask is a view of it and
nothing a round allocates grows with the cache. Between forwards every one of its query rows reads
the row's valid slots plus this round's tentative ones (and at most the one slot ``lengths[b]`` more,
a dropped token that the next forward overwrites); :meth:`begin_forward` repaints only the tentative
window ``[lengths[b], lengths[b] + pending + q)`` (causal among the new tokens) and :meth:`commit`
repaints the same window with what was kept, at most γ + 1 slots per row, never the whole cache, and
not at all after one-token forwards whose tokens every row kept (dense steps). The bias is built
from ``starts``/``lengths`` at the first decode forward after :meth:`reset_rows` (a prefill uses
the model's own mask).

Invariants: ``0 <= starts[b] <= lengths[b]``, ``lengths[b] + pending < capacity`` (the last slot is a
spare that is never valid, see :meth:`append_from`); the slot index is not a RoPE position (positions
are passed to the model explicitly); ``lengths`` (on the device) and its host mirror agree after every
call. The cache is the only owner of this state; the decoder changes it only through
:meth:`begin_forward`, :meth:`commit`, :meth:`adopt_tentative` and :meth:`append_from`.
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
        q = key_states.shape[2]
        start, index = self.owner.write_target(q)
        if index is None:
            self.keys[:, :, start : start + q] = key_states
            self.values[:, :, start : start + q] = value_states
        else:
            index = index.expand(-1, key_states.shape[1], -1, key_states.shape[3])
            self.keys.scatter_(2, index, key_states)
            self.values.scatter_(2, index, value_states)
        end = self.owner.max_cursor() + q
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.max_cursor() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.max_cursor()

    def get_max_length(self) -> int:
        return self.owner.capacity


class SlotCache(Cache):
    """A Hugging Face ``Cache`` of :class:`SlotLayer` s with per-row valid ranges (see module docstring).

    ``max_query`` is the most tokens one decode forward writes (γ + 1) and ``groups`` the query heads
    per KV head: together they size the preallocated mask (:meth:`begin_forward`)."""

    def __init__(self, num_layers: int, capacity: int, max_query: int = 1, groups: int = 1) -> None:
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.capacity = capacity
        self.max_query = max_query
        self.groups = groups
        self.pending = 0
        self.starts: torch.Tensor | None = None  # [B] first valid slot
        self.lengths: torch.Tensor | None = None  # [B] end of the committed slots
        self._lengths_host: list[int] = []
        self._uniform = True  # every row has the same length (a slice write, not a scatter)
        self._max_length = 0
        self.bias: torch.Tensor | None = None  # [B, 1, groups * max_query, capacity]; None: build it
        self._window: torch.Tensor | None = None  # [B, >= max_query + 1] slots lengths[b] + j
        self._target: tuple[tuple[int, int], tuple[int, torch.Tensor | None]] | None = None
        self._patterns: dict[tuple[int, int], torch.Tensor] = {}  # (pending, q) -> [1, R, pending + q]
        self._levels: tuple[torch.Tensor, torch.Tensor] | None = None  # 0 and -inf in the bias's dtype
        self._painted = True  # every bias row sees every tentative slot (only one-token forwards so far)

    # ----------------------------------------------------------------------------------------- state
    def reset_rows(self, starts: torch.Tensor, lengths: torch.Tensor) -> None:
        """Declare the valid range of every row (after prefill or after gathering)."""
        self.starts = starts.to(torch.long)
        self._set_lengths(lengths.to(torch.long), [int(x) for x in lengths.tolist()])
        self.pending, self._painted = 0, True
        self.bias = None
        if self._max_length > self.capacity:
            raise ValueError(f"SlotCache: {self._max_length} tokens exceed capacity {self.capacity}")

    def _set_lengths(self, lengths: torch.Tensor, host: list[int]) -> None:
        self.lengths, self._lengths_host = lengths, host
        self._uniform = all(x == host[0] for x in host)
        self._max_length = max(host)
        self._window = self._target = None

    def max_cursor(self) -> int:
        return (self._max_length if self._lengths_host else 0) + self.pending

    def write_target(self, q: int) -> tuple[int, torch.Tensor | None]:
        """Where the next ``q`` tokens go: ``(slot, None)`` when every row writes at the same slot (a
        slice write; also the prefill, before :meth:`reset_rows`), else ``(0, index [B, 1, q, 1])``."""
        if not self._lengths_host:
            return self.pending, None
        if self._uniform:
            return self._lengths_host[0] + self.pending, None
        key = (self.pending, q)
        if self._target is None or self._target[0] != key:  # once per forward, not per layer
            self._target = key, (0, self.window(self.pending + q)[:, self.pending :][:, None, :, None])
        return self._target[1]

    def window(self, width: int) -> torch.Tensor:
        """``[B, width]`` slots ``lengths[b] + j``: this round's tentative window (cached per commit)."""
        if self._window is None or self._window.shape[1] < width:
            span = max(width, self.max_query + 1)
            self._window = self.lengths[:, None] + torch.arange(span, device=self.lengths.device)[None]
        return self._window[:, :width]

    # ---------------------------------------------------------------------------------- the protocol
    def begin_forward(self, q: int, full: bool = False) -> torch.Tensor:
        """The additive mask of a decode forward of ``q <= max_query`` new tokens,
        ``[B, 1, groups * q, kv_len]``: a view of :attr:`bias`. ``kv_len`` is the used prefix
        (``max_cursor() + q``), or with ``full`` the whole capacity (static steps, whose shapes do
        not change during a decode; slots past the prefix are −inf for every row).

        Query ``i`` of row ``b`` sees slots ``starts[b] <= j <= lengths[b] + pending + i``: the row's
        valid entries, this round's tentative tokens and itself. The query rows are tiled ``groups``
        times (row ``g * q + i``) to match grouped-query attention, see :mod:`std_core.attention`.
        """
        assert self.starts is not None and self.lengths is not None
        if q > self.max_query:
            raise ValueError(f"SlotCache: a forward of {q} tokens, at most {self.max_query} allowed")
        end = self.max_cursor() + q
        if end > self.capacity:
            raise RuntimeError(f"SlotCache overflow: {end} slots needed, capacity {self.capacity}")
        self.prepare_mask()
        self._paint(self.pending + q, self._pattern(self.pending, q))
        self._painted = self._painted and q == 1  # rows g * q + i of a longer forward see less
        return self.bias[:, :, : self.groups * q, : self.capacity if full else end]

    def prepare_mask(self) -> None:
        """Build the mask now (else the first decode forward does), so no round pays for it."""
        if self.bias is None:
            self._build_bias()

    def end_forward(self, q: int) -> None:
        """Count the ``q`` tokens just written as tentative."""
        self.pending += q

    def commit(self, keep: torch.Tensor, keep_host: list[int]) -> None:
        """Keep the first ``keep[b]`` tentative tokens of row ``b``; drop the rest (the rollback).
        ``keep`` is ``[B]`` on the device, ``keep_host`` the same counts on the host."""
        assert self.lengths is not None
        if any(k < 0 or k > self.pending for k in keep_host):
            raise ValueError(f"SlotCache.commit: keep {keep_host} outside [0, {self.pending}]")
        kept_all = self.pending == 1 or all(k == self.pending for k in keep_host)
        if self.pending and self.bias is not None and not (self._painted and kept_all):
            # the window: kept slots visible to every row, dropped ones to none (a dropped lone token,
            # at lengths[b] after the commit, is where the next forward writes and paints)
            visible = self.window(self.pending) < (self.lengths + keep)[:, None]
            self._paint(self.pending, self._visibility(visible)[:, None])
        self._set_lengths(
            self.lengths + keep, [a + b for a, b in zip(self._lengths_host, keep_host, strict=True)]
        )
        self.pending, self._painted = 0, True

    def allowed(self, q: int, groups: int) -> torch.Tensor:
        """The boolean mask of a forward of any ``q`` tokens, ``[B, 1, groups * q, kv_len]``, built
        afresh (for one-off forwards such as a shared prefill's suffixes; decode uses
        :meth:`begin_forward`)."""
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

    def adopt_tentative(self, other: SlotCache) -> None:
        """Replace this round's tentative tokens with ``other``'s (``other.pending`` of them per row).

        Used after a verify: the dense keys/values of ``[pending] + drafts`` overwrite the sparse ones,
        so after :meth:`commit` the sparse cache holds the dense states of every committed token.
        """
        assert self.lengths is not None and other.lengths is not None
        q = other.pending
        if self._max_length + q > self.capacity:
            raise RuntimeError(f"SlotCache overflow adopting {q} tokens (capacity {self.capacity})")
        self._copy(other, other.window(q)[:, None, :, None], self.window(q)[:, None, :, None])
        self.pending, self._painted = q, False  # the last adopted slot was never drafted, nor painted

    def append_from(self, other: SlotCache, counts: torch.Tensor, counts_host: list[int]) -> None:
        """Append to row ``b`` the last ``counts[b]`` committed tokens of ``other`` (committed here at once).

        Brings the sparse cache up to date after dense-only rounds (``mode="auto"`` with γ = 0), which
        skip the per-round copy. Slots past a row's count go to the last slot, which is never valid
        (capacity keeps one spare), so rows with different counts share one gather/scatter.
        ``counts`` is ``[B]`` on the device, ``counts_host`` the same on the host.
        """
        assert self.lengths is not None and other.lengths is not None and self.pending == 0
        q = max(counts_host)
        if q == 0:
            return
        if self._max_length + q >= self.capacity:
            raise RuntimeError(f"SlotCache overflow appending {q} tokens (capacity {self.capacity})")
        i = torch.arange(q, device=counts.device)[None]
        used = i < counts[:, None]
        src = torch.where(used, other.lengths[:, None] - counts[:, None] + i, 0)[:, None, :, None]
        dst = torch.where(used, self.lengths[:, None] + i, self.capacity - 1)[:, None, :, None]
        self._copy(other, src, dst)
        # the appended slots were never painted: commit must paint them (kept ones visible), even
        # when every row keeps all of them (otherwise they stay masked, and drafts miss them)
        self.pending, self._painted = q, False
        self.commit(counts, counts_host)

    def _copy(self, other: SlotCache, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Per layer: this cache's slots ``dst [B, 1, q, 1]`` = ``other``'s slots ``src``."""
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            heads, dim = theirs.keys.shape[1], theirs.keys.shape[3]
            src_i, dst_i = src.expand(-1, heads, -1, dim), dst.expand(-1, heads, -1, dim)
            mine.keys.scatter_(2, dst_i, theirs.keys.gather(2, src_i))
            mine.values.scatter_(2, dst_i, theirs.values.gather(2, src_i))

    # -------------------------------------------------------------------------------------- the mask
    def _build_bias(self) -> None:
        """The bias from ``starts`` and ``lengths`` (+ pending): every query row sees the same slots."""
        keys = self.layers[0].keys
        zero = torch.zeros((), dtype=keys.dtype, device=keys.device)
        self._levels = zero, torch.full_like(zero, float("-inf"))
        # slots padded to a multiple of 16: a GPU attention kernel takes the view without a padded copy
        slots = torch.arange(-(-self.capacity // 16) * 16, device=self.lengths.device)[None]
        visible = (slots >= self.starts[:, None]) & (slots < self.lengths[:, None] + self.pending)
        rows = self.groups * self.max_query
        self.bias = self._visibility(visible)[:, None, None].repeat(1, 1, rows, 1)
        self._patterns = {}

    def _pattern(self, pending: int, q: int) -> torch.Tensor:
        """``[R, pending + q]``: which window slots query row ``r`` of a forward of ``q`` tokens sees
        (row ``g * q + i`` is query ``i``: the tentative tokens and itself; rows past ``groups * q``,
        unused by this forward, see the whole window)."""
        key = (pending, q)
        if key not in self._patterns:
            rows = torch.arange(self.groups * self.max_query, device=self.bias.device)
            query = torch.where(rows < self.groups * q, rows % q, q - 1)
            slots = torch.arange(pending + q, device=self.bias.device)
            self._patterns[key] = self._visibility(slots[None, :] <= pending + query[:, None])[None]
        return self._patterns[key]

    def _paint(self, width: int, values: torch.Tensor) -> None:
        """``bias[b, 0, r, lengths[b] + j] = values[b | 0, r | 0, j]`` for ``j < width``."""
        batch, _, rows, slots = self.bias.shape
        index = self.window(width)[:, None, :].expand(batch, rows, width)
        self.bias.view(batch, rows, slots).scatter_(2, index, values.expand(batch, rows, width))

    def _visibility(self, visible: torch.Tensor) -> torch.Tensor:
        """0 where ``visible``, −inf elsewhere, in the bias's dtype."""
        return torch.where(visible, *self._levels)

    # ------------------------------------------------------------------------------------ construction
    @classmethod
    def gathered(
        cls,
        source: SlotCache,
        index: list[torch.Tensor],
        starts: torch.Tensor,
        capacity: int,
        max_query: int = 1,
        groups: int = 1,
    ) -> SlotCache:
        """A compact cache of ``source``'s slots ``index[layer]`` (``[B, KVH, S]``, ascending, valid from
        ``starts[b]``), with room for ``capacity - S`` more tokens per row."""
        cache = cls(len(source.layers), capacity, max_query, groups)
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
    def from_prefixes(
        cls, prefixes: list[SlotCache], rows: list[int], capacity: int, max_query: int = 1, groups: int = 1
    ) -> SlotCache:
        """A cache whose row ``b`` starts with a copy of the one row of ``prefixes[rows[b]]`` (a
        video's prompt prefix, shared by several questions), with room for ``capacity`` slots per row."""
        cache = cls(len(prefixes[0].layers), capacity, max_query, groups)
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
