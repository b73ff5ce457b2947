"""SharedPrefixCache: a prefix stored once per video, own slots per row, read as if concatenated.

Method: the same random keys/values laid out twice, once as a copying :class:`SlotCache` (row b =
its video's prefix, then its own slots) and once as a :class:`SharedPrefixCache` (prefix once per
video + own slots). Attention over the split layout must equal grouped SDPA over the copied rows
(to fp32 rounding), the draft's gathered cache must be bit-identical, and the split visual scores
must equal the whole-row scores.
"""

from __future__ import annotations

import pytest
import torch

from std_core.attention import grouped_attention
from std_core.kv_cache import SlotCache
from std_core.prefix_cache import SharedPrefixCache, split_visual_score_sums
from std_core.selection import visual_score_sums

KVH, GROUPS, DIM, LAYERS = 2, 3, 8, 2
PREFIXES = [7, 4]  # P_v of two videos
ROWS = [0, 0, 0, 1, 1]  # video of each row
OWN = [3, 5, 2, 4, 1]  # own tokens per row before the forward


def _prefix_cache(length: int, gen: torch.Generator) -> SlotCache:
    cache = SlotCache(LAYERS, length + 1)
    for layer in cache.layers:
        states = torch.randn(1, KVH, length, DIM, generator=gen)
        layer.lazy_initialization(states, states)
        layer.keys[:, :, :length] = states
        layer.values[:, :, :length] = torch.randn(1, KVH, length, DIM, generator=gen)
    cache.reset_rows(torch.zeros(1, dtype=torch.long), torch.tensor([length]))
    return cache


def _layouts(capacity: int = 12) -> tuple[SharedPrefixCache, SlotCache]:
    """The same rows, no-copy and copied (own slots after the prefix); own slots written."""
    gen = torch.Generator().manual_seed(0)
    prefixes = [_prefix_cache(p, gen) for p in PREFIXES]
    shared = SharedPrefixCache(prefixes, ROWS, capacity, max_query=3, groups=GROUPS)
    copied = SlotCache.from_prefixes(prefixes, ROWS, max(PREFIXES) + capacity, max_query=3, groups=GROUPS)
    width = max(OWN)
    for i in range(LAYERS):
        keys = torch.randn(len(ROWS), KVH, width, DIM, generator=gen)
        values = torch.randn(len(ROWS), KVH, width, DIM, generator=gen)
        shared.layers[i].update(keys, values)
        for b, v in enumerate(ROWS):  # the copy: own slot j at P_v + j
            p = PREFIXES[v]
            copied.layers[i].keys[b, :, p : p + width] = keys[b]
            copied.layers[i].values[b, :, p : p + width] = values[b]
    shared.end_forward(width)
    shared.commit(torch.tensor(OWN), OWN)
    copied_lengths = torch.tensor([PREFIXES[v] + n for v, n in zip(ROWS, OWN, strict=True)])
    copied.reset_rows(torch.zeros(len(ROWS), dtype=torch.long), copied_lengths)
    return shared, copied


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("kernel", ["fused_cpu", "fp32_scores"])
def test_split_attention_equals_attention_over_the_copied_rows(
    q: int, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both implementations of the merge: PyTorch's fused CPU kernel with its log-sum-exp (the CPU
    default) and the chunked fp32 scores (other devices)."""
    from std_core import prefix_cache

    if kernel == "fp32_scores":
        monkeypatch.setattr(prefix_cache, "_FLASH_CPU", None)
    else:
        assert prefix_cache._FLASH_CPU is not None, "this torch build has no fused CPU attention op"
    shared, copied = _layouts()
    gen = torch.Generator().manual_seed(1)
    for i in range(LAYERS):
        query = torch.randn(len(ROWS), KVH * GROUPS, q, DIM, generator=gen)
        new_k = torch.randn(len(ROWS), KVH, q, DIM, generator=gen)
        new_v = torch.randn(len(ROWS), KVH, q, DIM, generator=gen)
        mask_s, mask_c = shared.begin_forward(q), copied.begin_forward(q)
        ks, vs = shared.layers[i].update(new_k, new_v)
        kc, vc = copied.layers[i].update(new_k, new_v)
        out = shared.attend(i, query, ks, vs, mask_s, 0.3)
        expected = grouped_attention(query, kc, vc, mask_c, 0.3)
        assert out.shape == expected.shape == (len(ROWS), q, KVH * GROUPS, DIM)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        # a bool mask (the suffixes' prefill builds one) reads the same
        torch.testing.assert_close(shared.attend(i, query, ks, vs, mask_s == 0, 0.3), out)
        shared.end_forward(q)
        copied.end_forward(q)
        shared.commit(torch.zeros(len(ROWS), dtype=torch.long), [0] * len(ROWS))
        copied.commit(torch.zeros(len(ROWS), dtype=torch.long), [0] * len(ROWS))


def test_attention_chunks_give_the_same_output(monkeypatch: pytest.MonkeyPatch) -> None:
    from std_core import prefix_cache

    monkeypatch.setattr(prefix_cache, "_FLASH_CPU", None)  # the chunked fp32 path
    shared, _ = _layouts()
    query = torch.randn(len(ROWS), KVH * GROUPS, 2, DIM, generator=torch.Generator().manual_seed(2))
    mask = shared.begin_forward(2)
    keys, values = shared.layers[0].update(query[:, :KVH] * 0.5, query[:, KVH : 2 * KVH])
    whole = shared.attend(0, query, keys, values, mask, 0.3)
    monkeypatch.setattr(prefix_cache, "_ATTEND_CHUNK_BYTES", 1)  # one row at a time
    chunked = shared.attend(0, query, keys, values, mask, 0.3)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)  # matmul shapes differ: rounding


def test_the_draft_gathers_the_same_states_as_from_the_copied_rows() -> None:
    shared, copied = _layouts()
    gen = torch.Generator().manual_seed(3)
    kept = 5  # the shortest row (video 1, one own token) has 5 slots
    index, starts = [], torch.tensor([0, 1, 0, 2, 0])
    for _ in range(LAYERS):  # ascending virtual slots within each row's prompt (prefix + own)
        rows = []
        for b, v in enumerate(ROWS):
            length = PREFIXES[v] + OWN[b]
            picks = torch.stack(
                [torch.randperm(length, generator=gen)[:kept].sort().values for _ in range(KVH)]
            )
            rows.append(picks)
        index.append(torch.stack(rows))
    got = shared.gather_kept(index, starts, capacity=kept + 4, groups=GROUPS)
    want = SlotCache.gathered(copied, index, starts, capacity=kept + 4, groups=GROUPS)
    for a, b in zip(got.layers, want.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert got.starts.tolist() == want.starts.tolist() and got.lengths.tolist() == want.lengths.tolist()
    assert any(int(i.min()) < min(PREFIXES) for i in index) and any(
        int(i.max()) >= max(PREFIXES) for i in index
    ), "the picks must reach both the prefix and the own slots"


def test_split_visual_scores_equal_the_whole_row_scores() -> None:
    gen = torch.Generator().manual_seed(4)
    prefix, own = 9, 5
    keys = torch.randn(KVH, prefix + own, DIM, generator=gen)
    query = torch.randn(KVH * GROUPS, own, DIM, generator=gen)
    valid = torch.tensor([True] * (prefix + own - 1) + [False])  # the last own slot is padding
    pos = torch.tensor([1, 2, 3])  # own slots that score
    whole = visual_score_sums(query, keys, pos + prefix, valid, 0.4, query_offset=prefix)
    split = split_visual_score_sums(query, keys[:, :prefix], keys[:, prefix:], pos, valid[prefix:], 0.4)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)


def test_memory_is_one_prefix_per_video_plus_own_slots() -> None:
    shared, copied = _layouts(capacity=12)
    per_slot = KVH * DIM * 4 * 2 * LAYERS  # keys + values, fp32, every layer
    prefixes = sum(p + 1 for p in PREFIXES)  # each prefill's buffer (one spare slot)
    assert shared.nbytes() == per_slot * (prefixes + len(ROWS) * 12)
    assert copied.nbytes() == per_slot * len(ROWS) * (max(PREFIXES) + 12)


def test_the_rows_of_a_video_must_be_contiguous() -> None:
    gen = torch.Generator().manual_seed(0)
    prefixes = [_prefix_cache(p, gen) for p in PREFIXES]
    with pytest.raises(ValueError, match="contiguous"):
        SharedPrefixCache(prefixes, [0, 1, 0], 8)
