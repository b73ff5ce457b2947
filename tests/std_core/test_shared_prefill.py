"""Shared prefill: many questions about one video decode from one prefill of the video, losslessly.

Method: the oracle is ``model.generate(do_sample=False)`` on each question's own full prompt (batch
1, same video, same max_new_tokens). :func:`std_core.generate_shared` gets the processor outputs of
those same full prompts (the pixel values only in the first question of each video) and must return,
token for token, each oracle row, laid out as ``generate`` lays out a left-padded batch of the full
prompts. The questions have different lengths and the tiny models' outputs differ across them
(asserted), so a question decoded against the wrong suffix, positions or prefix fails.

Memory layout: by default the dense cache holds each video's prefix once and per question only its
own slots (:class:`~std_core.prefix_cache.SharedPrefixCache`, attention merged across the two parts);
``copy_prefix=True`` is the copying layout, kept as a fallback. Both are held to the same oracle, and
the default's dense cache bytes are checked against the no-copy layout's size.

Numerics: exact in fp32. In bf16/fp16 the split prefill (prefix, then suffix) reduces in a different
order than one forward over the prompt, so a near-tie may flip; ``first_divergence`` on the
question's full prompt reports the dense margin there (used below on an exact row).
"""

from __future__ import annotations

import pytest
import torch

from std_core import SparseToDenseDecoder, StdConfig, first_divergence, generate_shared
from std_core import decoder as decoder_module
from std_core.shared_prefill import _SharedDecode, split_prompts
from tests import tiny_models as tm

MAX_NEW = 24
QUESTIONS = [
    "how many frames ?",
    "describe the video",
    "what colour is the square ? answer with the option letter",
    "which shape moves left then right and appears first ? A B C D",
]
# (frames, height, width) of the two videos: a few hundred visual tokens in the first.
VIDEOS = {
    "qwen2_vl": [(16, 112, 140), (8, 56, 84)],
    "qwen2_5_vl": [(16, 112, 140), (8, 56, 84)],
    "qwen3_vl": [(16, 128, 128), (8, 64, 96)],
    "llava_onevision": [(16, 56, 56), (8, 56, 56)],
}
SMALL_BUDGET = 48  # m_t + a few dozen visual tokens: some drafts are rejected


class Case:
    """A tiny model, two videos, per-question full-prompt inputs and the per-question oracle."""

    def __init__(self, arch: str) -> None:
        self.tiny = tm.build(arch)
        self.pad = int(self.tiny.model.generation_config.pad_token_id)
        videos = [tm.random_video(t, h, w, seed=i) for i, (t, h, w) in enumerate(VIDEOS[arch])]
        self.questions = [
            [tm.make_inputs(self.tiny, [video], [q]) for q in QUESTIONS[: 4 - v]]
            for v, video in enumerate(videos)
        ]
        self.references = [
            [self.tiny.model.generate(**q, max_new_tokens=MAX_NEW, do_sample=False) for q in questions]
            for questions in self.questions
        ]

    def shared(
        self, config: StdConfig, videos: list[int], copy_prefix: bool = False
    ) -> tuple[decoder_module.GenerateResult, torch.Tensor]:
        """generate_shared over ``videos`` (pixels only in each video's first question) and the
        expected ``sequences``: the oracle rows, laid out as a left-padded ``generate`` batch."""
        groups = self.groups(videos)
        decoder = SparseToDenseDecoder(self.tiny.model, config)
        result = generate_shared(decoder, groups, max_new_tokens=MAX_NEW, copy_prefix=copy_prefix)
        rows = [(q, r) for v in videos for q, r in zip(self.questions[v], self.references[v], strict=True)]
        return result, _expected(rows, self.pad)

    def groups(self, videos: list[int]) -> list[list[dict]]:
        return [[self.questions[v][0]] + [_tokens_only(q) for q in self.questions[v][1:]] for v in videos]


def _tokens_only(question: dict) -> dict:
    return {k: v for k, v in question.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids")}


def _expected(rows: list[tuple[dict, torch.Tensor]], pad: int) -> torch.Tensor:
    """Each oracle row ``[1, L_q + new_q]`` left padded to the longest prompt, right padded with pad."""
    prompt = max(q["input_ids"].shape[1] for q, _ in rows)
    width = prompt + max(r.shape[1] - q["input_ids"].shape[1] for q, r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for b, (q, r) in enumerate(rows):
        start = prompt - q["input_ids"].shape[1]
        out[b, start : start + r.shape[1]] = r[0]
    return out


_CASES: dict[str, Case] = {}


def case(arch: str) -> Case:
    if arch not in _CASES:
        _CASES[arch] = Case(arch)
    return _CASES[arch]


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_reference_outputs_differ_across_questions(arch: str) -> None:
    c = case(arch)
    for questions, references in zip(c.questions, c.references, strict=True):
        generated = [
            tuple(r[0, q["input_ids"].shape[1] :].tolist())
            for q, r in zip(questions, references, strict=True)
        ]
        assert len(set(generated)) == len(generated), "each question must get its own answer"
        assert len({q["input_ids"].shape[1] for q in questions}) == len(questions), "lengths must differ"
    visual = (c.questions[0][0]["input_ids"] == c.tiny.model.config.video_token_id).sum()
    assert int(visual) >= 100, "the first video needs a few hundred visual tokens"


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
@pytest.mark.parametrize("mode", ["std", "dense", "auto"])
def test_shared_prefill_equals_generate_per_question(arch: str, mode: str) -> None:
    c = case(arch)
    result, expected = c.shared(StdConfig(mode=mode, gamma=4, sparse_budget=SMALL_BUDGET), videos=[0])
    tm.assert_same(result.sequences, expected)
    assert len(result.stats.rows) == len(QUESTIONS)
    if mode == "std":
        total = result.stats.total
        assert 0 < total.accepted < total.drafted, "the small budget must reject some drafts, accept some"


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
@pytest.mark.parametrize("mode", ["std", "dense", "auto"])
@pytest.mark.parametrize("copy_prefix", [False, True], ids=["shared-prefix", "copied-prefix"])
def test_several_videos_with_several_questions_in_one_batch(arch: str, mode: str, copy_prefix: bool) -> None:
    c = case(arch)
    config = StdConfig(mode=mode, gamma=4, sparse_budget=SMALL_BUDGET)
    result, expected = c.shared(config, videos=[0, 1], copy_prefix=copy_prefix)
    tm.assert_same(result.sequences, expected)
    assert result.stats.visual_tokens[0] != result.stats.visual_tokens[-1]  # rows of both videos
    layout = _no_copy_bytes(c, [0, 1], config)
    assert (result.stats.dense_cache_bytes == layout) != copy_prefix, "the layout asked for"


def _no_copy_bytes(c: Case, videos: list[int], config: StdConfig) -> int:
    """Dense cache bytes of the no-copy layout: every video's prefix once (its prefill buffer, one
    spare slot) plus, per question, its own slots (the longest suffix + new tokens + one verify)."""
    spec = decoder_module.inspect_model(c.tiny.model)
    prompt = split_prompts(c.tiny.model, spec, c.groups(videos), c.pad)
    gamma = 0 if config.mode == "dense" else config.gamma
    own = prompt.suffix_ids.shape[1] + MAX_NEW + gamma + 1
    slots = sum(p.shape[1] + 1 for p in prompt.prefix_ids) + len(prompt.suffix_lengths) * own
    return slots * _slot_bytes(c.tiny.model)


def _slot_bytes(model: torch.nn.Module) -> int:
    """Dense KV bytes of one slot: keys and values of every layer, fp32."""
    spec = decoder_module.inspect_model(model)
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // spec.num_heads
    return spec.num_layers * 2 * spec.num_kv_heads * head_dim * 4


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_the_dense_cache_holds_one_prefix_per_video(arch: str) -> None:
    """Memory: the no-copy dense cache is smaller than the copying one and than one batch of the full
    prompts (``--share-prefill off``), and one more question adds only its own slots, never a prefix."""
    c = case(arch)
    config = StdConfig(gamma=4, sparse_budget=SMALL_BUDGET)
    decoder = SparseToDenseDecoder(c.tiny.model, config)
    shared = generate_shared(decoder, c.groups([0]), max_new_tokens=MAX_NEW).stats.dense_cache_bytes
    copied = generate_shared(decoder, c.groups([0]), max_new_tokens=MAX_NEW, copy_prefix=True)
    video = tm.random_video(*VIDEOS[arch][0], seed=0)
    unshared = decoder.generate(**tm.make_inputs(c.tiny, [video] * len(QUESTIONS), QUESTIONS),
                                max_new_tokens=MAX_NEW).stats.dense_cache_bytes  # fmt: skip
    assert shared == _no_copy_bytes(c, [0], config)
    assert 2 * shared < copied.stats.dense_cache_bytes <= unshared
    fewer = generate_shared(decoder, [c.groups([0])[0][:-1]], max_new_tokens=MAX_NEW).stats.dense_cache_bytes
    prefix = split_prompts(c.tiny.model, decoder.spec, c.groups([0]), c.pad).prefix_ids[0].shape[1]
    assert 0 < shared - fewer < prefix * _slot_bytes(c.tiny.model), "a question must cost less than a prefix"


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_the_fp32_score_attention_equals_generate(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge's implementation for devices without PyTorch's fused CPU attention op (materialised
    fp32 scores, here in chunks of one row), end to end: the same oracle."""
    from std_core import prefix_cache

    monkeypatch.setattr(prefix_cache, "_FLASH_CPU", None)
    monkeypatch.setattr(prefix_cache, "_ATTEND_CHUNK_BYTES", 1)
    c = case(arch)
    result, expected = c.shared(StdConfig(gamma=4, sparse_budget=SMALL_BUDGET), videos=[0, 1])
    tm.assert_same(result.sequences, expected)


def test_switching_between_dense_and_draft_rounds_keeps_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto over the no-copy cache: dense-only rounds leave the sparse cache behind, draft rounds
    first copy the missed tokens from the dense cache's own slots; any sequence of choices gives the
    oracle's tokens."""
    from std_core.auto import AutoPolicy

    pattern = iter([0, 0, 3, 0, 0, 0, 4, 1, 0, 2] * 10)
    monkeypatch.setattr(AutoPolicy, "choose", lambda self, limit=None: next(pattern))
    c = case("qwen2_5_vl")
    result, expected = c.shared(StdConfig(mode="auto", gamma=4, sparse_budget=SMALL_BUDGET), videos=[0, 1])
    tm.assert_same(result.sequences, expected)
    assert result.stats.round_gammas[:8] == (0, 0, 3, 0, 0, 0, 4, 1)


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_keeping_every_visual_token_accepts_every_draft(arch: str) -> None:
    """Draft ≡ dense when K = all visual tokens: any wrong suffix position would reject drafts."""
    c = case(arch)
    result, expected = c.shared(StdConfig(gamma=4, sparse_budget=10**6), videos=[0])
    tm.assert_same(result.sequences, expected)
    assert all(row.accepted == row.drafted and row.rejections == 0 for row in result.stats.rows)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl"])
def test_sink_window_draft_equals_generate(arch: str) -> None:
    c = case(arch)
    config = StdConfig(gamma=4, sparse_budget=SMALL_BUDGET, selection="sink_window")
    result, expected = c.shared(config, videos=[0, 1])
    tm.assert_same(result.sequences, expected)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_the_vision_tower_runs_once_per_video(arch: str) -> None:
    c = case(arch)
    base = c.tiny.model.model
    tower = base.visual if hasattr(base, "visual") else base.vision_tower
    calls = []
    handle = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        c.shared(StdConfig(gamma=4, sparse_budget=SMALL_BUDGET), videos=[0])
        assert len(calls) == 1, f"{len(QUESTIONS)} questions, one video: {len(calls)} vision forwards"
        c.shared(StdConfig(mode="dense"), videos=[0, 1])
        assert len(calls) == 3
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
@pytest.mark.parametrize("queries", ["all_text", "after_visual"])
def test_each_question_selects_its_own_visual_tokens(
    arch: str, queries: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row's top-K comes from its own text queries: the questions' kept sets differ, and each
    equals the kept set of that question decoded alone on its full prompt."""
    c = case(arch)
    seen: list[tuple[bool, list[torch.Tensor], torch.Tensor]] = []
    real_select = decoder_module._Decode.select

    def recording_select(self: decoder_module._Decode) -> object:
        index = [self.observer.index[i] for i in range(self.spec.num_layers)]
        seen.append((isinstance(self, _SharedDecode), index, self.observer.starts))
        return real_select(self)

    monkeypatch.setattr(decoder_module._Decode, "select", recording_select)
    config = StdConfig(gamma=4, sparse_budget=SMALL_BUDGET, selection_queries=queries)
    c.shared(config, videos=[0])
    for q in c.questions[0]:
        SparseToDenseDecoder(c.tiny.model, config).generate(**q, max_new_tokens=2)
    (_, shared_index, shared_starts), alone = seen[0], seen[1:]
    kept = [_kept(shared_index, shared_starts, b) for b in range(len(QUESTIONS))]
    assert len({tuple(map(tuple, k)) for k in kept}) == len(QUESTIONS), "selections must differ per question"
    for b, (is_shared, index, starts) in enumerate(alone):
        assert not is_shared
        assert kept[b] == _kept(index, starts, 0), f"question {b}: shared selection != full-prompt selection"


def _kept(index: list[torch.Tensor], starts: torch.Tensor, row: int) -> list[list[int]]:
    """Row ``row``'s kept slots per (layer, KV head), as lists."""
    return [head.tolist() for layer in index for head in layer[row, :, int(starts[row]) :]]


def test_divergence_diagnostic_reads_a_shared_row() -> None:
    c = case("qwen2_vl")
    result, expected = c.shared(StdConfig(gamma=4, sparse_budget=SMALL_BUDGET), videos=[0])
    question, reference = c.questions[0][2], c.references[0][2]
    offset = result.sequences.shape[1] - MAX_NEW - question["input_ids"].shape[1]
    row = result.sequences[2:3, offset : offset + reference.shape[1]]
    assert first_divergence(c.tiny.model, question, row, reference) == [None]
    altered = row.clone()
    altered[0, -3] = (int(altered[0, -3]) + 1) % tm.VOCAB_SIZE
    found = first_divergence(c.tiny.model, question, reference, altered)[0]
    assert found is not None and found.margin >= 0 and found.gap > 0


def test_prompts_that_do_not_share_the_video_are_refused() -> None:
    c = case("qwen2_vl")
    other_video = _tokens_only(c.questions[1][0])
    decoder = SparseToDenseDecoder(c.tiny.model, StdConfig())
    with pytest.raises(ValueError, match="same tokens as question 0"):
        generate_shared(decoder, [[c.questions[0][0], other_video]], max_new_tokens=4)


def test_shared_prefill_samples_the_dense_joint_distribution() -> None:
    """Sampling: thousands of rows of one question on one video (one shared prefill), drafts that are
    often rejected; the joint distribution of three sampled tokens matches the warped dense model's,
    enumerated exactly on the full prompt (the method of ``test_sampling.py``)."""
    from tests.std_core.test_sampling import (
        JOINT_STEPS,
        JOINT_TRIALS,
        JOINT_WARP,
        joint_case,
        total_variation,
    )

    inputs, exact, decoder = joint_case()
    steps, trials = JOINT_STEPS, JOINT_TRIALS
    questions = [inputs] + [_tokens_only(inputs)] * (trials - 1)
    result = generate_shared(decoder, [questions], max_new_tokens=steps, do_sample=True, **JOINT_WARP,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.stats.total.drafted > 0 and result.stats.total.acceptance_rate < 1.0
    split = split_prompts(decoder.model, decoder.spec, [questions], pad_token_id=0)
    own = split.suffix_ids.shape[1] + steps + decoder.config.gamma + 1  # the no-copy layout's rows
    slots = split.prefix_ids[0].shape[1] + 1 + trials * own
    assert result.stats.dense_cache_bytes == slots * _slot_bytes(decoder.model)
    tv = total_variation(result.sequences[:, -steps:], exact)
    assert tv < 0.06, (
        f"total variation {tv:.3f} between shared-prefill samples and the exact dense distribution"
    )
