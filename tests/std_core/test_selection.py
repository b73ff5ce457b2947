"""Selection: the kept prompt slots per (layer, KV head), checked against naive oracles.

The text-guided scores are compared with the attention probabilities the model itself computes in
eager mode with ``output_attentions=True`` (the naive oracle; the decoder never uses that path), so the
observer provably scores with the prefill's own post-RoPE queries and keys.
"""

from __future__ import annotations

import pytest
import torch

from std_core.attention import attention_phase, install
from std_core.kv_cache import SlotCache
from std_core.selection import PromptLayout, SelectionObserver, keep_index, sink_window_scores, visual_scores
from std_core.stats import PhaseTimer
from tests import tiny_models as tm


def _layout(
    valid: list[list[int]], visual: list[list[int]], budget: int, queries: str = "all_text"
) -> PromptLayout:
    return PromptLayout.build(torch.tensor(valid).bool(), torch.tensor(visual).bool(), budget, queries)


def test_layout_counts_text_and_clamps_k() -> None:
    #          pad pad  t   v   v   v   t   t
    valid = [[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]
    visual = [[0, 0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 0]]
    layout = _layout(valid, visual, budget=4)
    # row 0: m_t = 3, K = 1; row 1: m_t = 2, K = 2
    assert layout.keep_counts.tolist() == [4, 4]
    assert _layout(valid, visual, budget=1).keep_counts.tolist() == [3, 2]  # K clamps at 0
    assert _layout(valid, visual, budget=100).keep_counts.tolist() == [6, 8]  # K clamps at V
    # queries: text after the first visual token ("all_text") or after the last ("after_visual")
    assert layout.score_queries[0].nonzero().flatten().tolist() == [6, 7]
    assert layout.score_queries[1].nonzero().flatten().tolist() == [7]
    after = _layout(valid, visual, 4, "after_visual")
    assert after.score_queries[0].nonzero().flatten().tolist() == [6, 7]


def test_keep_index_is_right_aligned_ascending_and_keeps_all_text() -> None:
    valid = [[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]
    visual = [[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0]]
    layout = _layout(valid, visual, budget=4)  # row 0: m_t 2, K 2; row 1: m_t 2, K 2
    scores = torch.tensor(
        [
            [[0, 0, 0.1, 0.9, 0.2, 0.8, 0], [0, 0, 0.7, 0.1, 0.6, 0.2, 0]],
            [[0, 0.5, 0.4, 0.3, 0.2, 0.1, 0], [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0]],
        ]
    )
    index, starts = keep_index(scores, layout)
    assert starts.tolist() == [0, 0]
    assert index[0, 0].tolist() == [1, 3, 5, 6]  # text 1, 6 + best visual 3, 5, ascending
    assert index[0, 1].tolist() == [1, 2, 4, 6]  # each KV head keeps its own set
    assert index[1, 0].tolist() == [0, 1, 2, 6]
    assert index[1, 1].tolist() == [0, 4, 5, 6]


def test_keep_index_pads_shorter_rows_on_the_left() -> None:
    valid = [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    visual = [[0, 1, 1, 1, 0], [0, 0, 0, 1, 0]]
    layout = _layout(valid, visual, budget=10)
    index, starts = keep_index(torch.rand(2, 1, 5), layout)
    assert layout.keep_counts.tolist() == [5, 3]
    assert starts.tolist() == [0, 2]
    assert index[1, 0, 2:].tolist() == [2, 3, 4]


def test_sink_window_keeps_first_and_most_recent_visual_tokens() -> None:
    valid = [[1] * 10]
    visual = [[0, 1, 1, 1, 1, 1, 1, 1, 1, 0]]
    layout = _layout(valid, visual, budget=2 + 4)  # m_t = 2, K = 4
    scores = sink_window_scores(layout, kv_heads=2, sink_tokens=1)
    index, _ = keep_index(scores, layout)
    assert index[0, 0].tolist() == [0, 1, 6, 7, 8, 9]  # sink 1, recent 6-8, text 0 and 9
    assert torch.equal(index[0, 0], index[0, 1])


def test_visual_scores_match_a_naive_softmax() -> None:
    torch.manual_seed(0)
    heads, kv_heads, length, dim = 4, 2, 9, 8
    query, key = torch.randn(heads, length, dim), torch.randn(kv_heads, length, dim)
    valid = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 1]).bool()
    pos = torch.tensor([5, 7, 8])
    got = visual_scores(query, key, pos, valid, scaling=dim**-0.5)
    expected = torch.zeros(kv_heads, length)
    for h in range(heads):
        for t in pos.tolist():
            logits = (query[h, t] @ key[h // 2].T) * dim**-0.5
            allowed = valid & (torch.arange(length) <= t)
            expected[h // 2] += torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    assert torch.allclose(got, expected / len(pos), atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_observer_ranks_exactly_as_the_models_own_attention(arch: str) -> None:
    tiny = tm.build(arch)
    videos = [
        tm.random_video(8, 56 if arch != "qwen3_vl" else 64, 84 if arch == "qwen2_vl" else 64, seed=s)
        for s in (1, 2)
    ]
    inputs = tm.make_inputs(tiny, videos, ["describe the video", "what colour is the square ? answer"])
    model, config = tiny.model, tiny.model.config
    visual = inputs["input_ids"] == config.video_token_id
    text_tokens = (inputs["attention_mask"].bool() & ~visual).sum(dim=1)
    budget = int(text_tokens.max()) + int(visual.sum(dim=1).min()) // 3  # keeps about a third of the visual
    layout = PromptLayout.build(
        inputs["attention_mask"].bool(), visual, sparse_budget=budget, queries="all_text"
    )

    # Oracle: eager attention probabilities, averaged over the text queries, summed per KV head.
    model.set_attn_implementation({"text_config": "eager"})
    with torch.inference_mode():
        attentions = model(**inputs, output_attentions=True).attentions
    text = config.text_config
    groups = text.num_attention_heads // text.num_key_value_heads

    # StD: the observer inside a prefill through the registered attention.
    install(model)
    observer = SelectionObserver(layout, PhaseTimer(torch.device("cpu")))
    cache = SlotCache(text.num_hidden_layers, inputs["input_ids"].shape[1])
    with torch.inference_mode(), attention_phase("prefill", observer):
        model(**inputs, past_key_values=cache, use_cache=True)
    for layer, probs in enumerate(attentions):
        rows = []
        for b in range(probs.shape[0]):
            queries = layout.score_queries[b]
            per_head = probs[b][:, queries].mean(dim=1)  # [H, L]
            rows.append(per_head.reshape(-1, groups, per_head.shape[-1]).sum(dim=1))
        oracle_index, _ = keep_index(torch.stack(rows), layout)
        assert torch.equal(observer.index[layer], oracle_index), f"layer {layer} keeps different slots"
    # The draft of a real selection differs between heads (otherwise per-head selection is untested).
    assert not torch.equal(observer.index[0][:, 0], observer.index[0][:, 1])
