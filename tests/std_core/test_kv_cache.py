"""SlotCache: per-row writes, masks, commits (the rollback) and adopting another cache's window."""

from __future__ import annotations

import pytest
import torch

from std_core.kv_cache import SlotCache


def _cache(
    lengths: list[int], starts: list[int], capacity: int = 12, max_query: int = 3, groups: int = 1
) -> SlotCache:
    cache = SlotCache(num_layers=1, capacity=capacity, max_query=max_query, groups=groups)
    layer = cache.layers[0]
    layer.lazy_initialization(torch.zeros(len(lengths), 1, 0, 2), torch.zeros(len(lengths), 1, 0, 2))
    cache.reset_rows(torch.tensor(starts), torch.tensor(lengths))
    return cache


def _step(cache: SlotCache, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``values [B, q]`` (as keys [B, 1, q, 2]); return the mask (True: may attend) and keys."""
    bias = cache.begin_forward(values.shape[1])
    assert bias.dtype == torch.float32 and set(bias.unique().tolist()) <= {0.0, float("-inf")}
    states = values[:, None, :, None].expand(-1, -1, -1, 2).float()
    keys, _ = cache.update(states, states.clone(), 0)
    cache.end_forward(values.shape[1])
    return bias == 0, keys


def test_rows_write_at_their_own_lengths_and_masks_hide_the_rest() -> None:
    cache = _cache(lengths=[3, 5], starts=[1, 0])
    mask, keys = _step(cache, torch.tensor([[7, 8], [9, 10]]))
    assert keys.shape[2] == 7  # max length 5 + 2 new
    assert keys[0, 0, 3:5, 0].tolist() == [7, 8] and keys[1, 0, 5:7, 0].tolist() == [9, 10]
    # row 0, query 0 sees slots 1..3 (start 1, itself at 3); query 1 sees 1..4
    assert mask[0, 0, 0].tolist() == [False, True, True, True, False, False, False]
    assert mask[0, 0, 1].tolist() == [False, True, True, True, True, False, False]
    assert mask[1, 0, 1].tolist() == [True] * 7


def test_commit_keeps_a_prefix_per_row_and_rolls_back_the_rest() -> None:
    cache = _cache(lengths=[4, 4], starts=[0, 0])
    _step(cache, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    cache.commit(torch.tensor([1, 3]), [1, 3])
    assert cache.lengths.tolist() == [5, 7] and cache.pending == 0
    mask, keys = _step(cache, torch.tensor([[20], [30]]))
    assert keys[0, 0, 5, 0] == 20 and keys[1, 0, 7, 0] == 30  # row 0 overwrote its rejected slot
    assert mask[0, 0, 0, :6].all() and not mask[0, 0, 0, 6:].any()


def test_group_tiling_of_the_mask() -> None:
    cache = _cache(lengths=[2], starts=[0], groups=3)
    mask = cache.begin_forward(2)
    assert mask.shape == (1, 1, 6, 4)
    assert torch.equal(mask[0, 0, 0:2], mask[0, 0, 2:4]) and torch.equal(mask[0, 0, 0:2], mask[0, 0, 4:6])
    assert torch.equal(mask == 0, cache.allowed(2, groups=3))


def test_the_mask_is_a_view_of_one_preallocated_buffer() -> None:
    """A decode forward's mask is a slice of the cache's own bias: no round allocates one that grows
    with the cache."""
    cache = _cache(lengths=[4, 6], starts=[1, 0], capacity=40, groups=2)
    buffer = cache.begin_forward(1).untyped_storage().data_ptr()
    for q in (1, 3, 2, 1):
        mask, _ = _step(cache, torch.arange(2 * q).reshape(2, q))
        assert cache.bias.untyped_storage().data_ptr() == buffer
        cache.commit(torch.tensor([q, 1]), [q, 1])
    assert cache.begin_forward(3).untyped_storage().data_ptr() == buffer


def test_the_mask_after_rounds_of_ragged_commits_equals_one_built_afresh() -> None:
    """Rounds of forwards of different sizes, each rolled back by a different amount per row (the
    decoder's drafts, verifies and dense steps), leave exactly the mask of the rows' new ranges."""
    generator = torch.Generator().manual_seed(0)
    cache = _cache(lengths=[5, 9, 7], starts=[2, 0, 4], capacity=64, max_query=4, groups=3)
    for _ in range(12):
        count = int(torch.randint(1, 3, (1,), generator=generator))  # one verify, or drafts
        forwards = [int(q) for q in torch.randint(1, 3, (count,), generator=generator)]
        for q in forwards:
            expected = cache.allowed(q, groups=3)
            mask, _ = _step(cache, torch.zeros(3, q))
            assert torch.equal(mask, expected), (forwards, q)
        keep = [int(torch.randint(0, cache.pending + 1, (1,), generator=generator)) for _ in range(3)]
        cache.commit(torch.tensor(keep), keep)
        slots = torch.arange(cache.bias.shape[-1])[None]  # the capacity, padded to a multiple of 16
        valid = (slots >= cache.starts[:, None]) & (slots < cache.lengths[:, None])  # [B, slots]
        seen = cache.bias[:, 0] == 0  # [B, rows, slots]: every row sees the valid slots, ...
        assert torch.equal(seen & valid[:, None], valid[:, None].expand_as(seen)), keep
        beyond = slots > cache.lengths[:, None]  # ... and nothing past lengths[b] (the next write)
        assert not (seen & beyond[:, None]).any(), keep


def test_adopt_tentative_copies_the_other_caches_window() -> None:
    dense = _cache(lengths=[6, 8], starts=[0, 0])
    sparse = _cache(lengths=[3, 4], starts=[1, 0])
    _step(sparse, torch.tensor([[-1, -1], [-1, -1]]))  # the drafts' own (sparse) states
    _step(dense, torch.tensor([[11, 12, 13], [21, 22, 23]]))  # verify: pending + 2 drafts
    sparse.adopt_tentative(dense)
    assert sparse.pending == 3
    keep = [2, 3]
    sparse.commit(torch.tensor(keep), keep)
    keys = sparse.layers[0].keys[:, 0, :, 0]
    assert keys[0, 3:5].tolist() == [11, 12] and keys[1, 4:7].tolist() == [21, 22, 23]
    assert sparse.lengths.tolist() == [5, 7]


def test_gathered_cache_holds_the_selected_slots() -> None:
    dense = _cache(lengths=[5], starts=[0], capacity=8)
    dense.layers[0].keys[0, 0, :5, 0] = torch.arange(10, 15).float()
    index = [torch.tensor([[[0, 2, 4]]])]
    sparse = SlotCache.gathered(dense, index, starts=torch.tensor([1]), capacity=6)
    assert sparse.layers[0].keys[0, 0, :3, 0].tolist() == [10, 12, 14]
    assert sparse.starts.tolist() == [1] and sparse.lengths.tolist() == [3]
    assert sparse.layers[0].keys.shape[2] == 6  # O(budget + generated), not the dense length


def test_append_from_catches_rows_up_by_their_own_counts() -> None:
    dense = _cache(lengths=[7, 9], starts=[0, 0], capacity=12)
    dense.layers[0].keys[:, 0, :, 0] = torch.arange(12).float()[None] + torch.tensor([[100.0], [200.0]])
    sparse = _cache(lengths=[3, 4], starts=[0, 0], capacity=8)
    sparse.append_from(dense, torch.tensor([2, 0]), [2, 0])
    keys = sparse.layers[0].keys[:, 0, :, 0]
    assert keys[0, 3:5].tolist() == [105.0, 106.0]  # dense row 0's last two committed slots
    assert keys[1, 4].item() == 0.0  # row 1 appended nothing (its window went to the spare slot)
    assert sparse.lengths.tolist() == [5, 4]
    assert torch.equal(sparse.begin_forward(1) == 0, sparse.allowed(1, groups=1))


@pytest.mark.parametrize("counts", [[2, 2], [2, 0]])
def test_appended_slots_are_visible_to_the_next_forward(counts: list[int]) -> None:
    """The decoder builds the mask before the first round, so the tokens a catch-up appends after
    dense rounds must be painted visible, also when every row appends the same count (all kept).
    They were not: every draft after a catch-up attended without the tokens the dense rounds had
    committed (outputs stayed exact, the drafts were rejected more often)."""
    dense = _cache(lengths=[7, 9], starts=[0, 0], capacity=12)
    sparse = _cache(lengths=[3, 4], starts=[1, 0], capacity=8)
    sparse.prepare_mask()
    sparse.append_from(dense, torch.tensor(counts), counts)
    assert sparse.lengths.tolist() == [3 + counts[0], 4 + counts[1]]
    assert torch.equal(sparse.begin_forward(1) == 0, sparse.allowed(1, groups=1))
