"""Greedy StD equals plain ``model.generate`` token for token (fp32, CPU), on every architecture.

Method: the oracle is ``model.generate(**inputs, do_sample=False)`` on the same processor inputs. The
tiny models are randomly initialised with a large ``initializer_range`` so that their outputs depend
on the input and vary (asserted below): a model that repeats one token would make equality trivial.
Batches mix prompt lengths and video lengths (left padding, a few hundred visual tokens in the
longest row) and rows that stop at EOS at different times.

Numerics: this exactness holds in fp32. In bf16/fp16 a parallel verify reduces in a different order
than one-token decoding, so near-ties can flip; ``verify="sequential"`` is the exact mode there, and
``std_core.first_divergence`` reports the logit margin at any divergence (see test_std_diagnostics).
"""

from __future__ import annotations

import math

import pytest
import torch

from std_core import SparseToDenseDecoder, StdConfig
from std_core import decoder as decoder_module
from tests import tiny_models as tm

MAX_NEW = 40
PROMPTS = [
    "describe the video",
    "what colour is the square ? answer with the option letter",
    "how many frames",
    "which shape moves left then right and appears first ? A B C D",
]
# (frames, height, width) per row: ragged video lengths; the first row has 360–420 visual tokens.
SIZES = {
    "qwen2_vl": [(20, 168, 196), (8, 112, 84), (12, 56, 140), (4, 56, 56)],
    "qwen2_5_vl": [(20, 168, 196), (8, 112, 84), (12, 56, 140), (4, 56, 56)],
    "qwen3_vl": [(24, 160, 192), (8, 64, 96), (12, 64, 128), (4, 64, 64)],
    "llava_onevision": [(16, 56, 56)] * 4,  # its processor stacks videos: equal frame counts
}


class Case:
    """A tiny model, a ragged batch of 4 and the oracle output, built once per architecture."""

    def __init__(self, arch: str) -> None:
        self.tiny = tm.build(arch)
        videos = [tm.random_video(t, h, w, seed=i) for i, (t, h, w) in enumerate(SIZES[arch])]
        self.inputs = tm.make_inputs(self.tiny, videos, PROMPTS)
        self.single = tm.make_inputs(self.tiny, videos[:1], PROMPTS[:1])
        self.reference = self.tiny.model.generate(**self.inputs, max_new_tokens=MAX_NEW, do_sample=False)
        self.reference_single = self.tiny.model.generate(
            **self.single, max_new_tokens=MAX_NEW, do_sample=False
        )
        self.prompt_len = self.inputs["input_ids"].shape[1]

    def decode(self, config: StdConfig, single: bool = False) -> decoder_module.GenerateResult:
        inputs = self.single if single else self.inputs
        return SparseToDenseDecoder(self.tiny.model, config).generate(**inputs, max_new_tokens=MAX_NEW)


_CASES: dict[str, Case] = {}


def case(arch: str) -> Case:
    if arch not in _CASES:
        _CASES[arch] = Case(arch)
    return _CASES[arch]


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_reference_output_is_varied(arch: str) -> None:
    c = case(arch)
    generated = c.reference[:, c.prompt_len :]
    assert len(set(generated.flatten().tolist())) >= 30, "the oracle must not be a degenerate repeat"
    assert len({tuple(row) for row in generated.tolist()}) == generated.shape[0], "rows must differ"
    visual = (c.inputs["input_ids"] == c.tiny.model.config.video_token_id).sum(dim=1)
    assert int(visual.max()) >= 250, "the longest row needs a few hundred visual tokens"
    lengths = c.inputs["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) > 1 or arch == "llava_onevision", "prompts must be ragged"


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
@pytest.mark.parametrize("gamma", [1, 4, 9])
@pytest.mark.parametrize("budget", ["no_visual", "some_visual", "all_visual"])
def test_greedy_std_equals_generate_batch(arch: str, gamma: int, budget: str) -> None:
    c = case(arch)
    visual = c.inputs["input_ids"] == c.tiny.model.config.video_token_id
    text_tokens = int((c.inputs["attention_mask"].bool() & ~visual).sum(dim=1).max())  # max m_t
    sparse_budget = {"no_visual": 1, "some_visual": text_tokens + 48, "all_visual": 10**6}[budget]
    result = c.decode(StdConfig(gamma=gamma, sparse_budget=sparse_budget))
    tm.assert_same(result.sequences, c.reference)


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
@pytest.mark.parametrize("gamma", [1, 9])
def test_greedy_std_equals_generate_single(arch: str, gamma: int) -> None:
    c = case(arch)
    result = c.decode(StdConfig(gamma=gamma, sparse_budget=64), single=True)
    tm.assert_same(result.sequences, c.reference_single)


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_dense_mode_equals_generate(arch: str) -> None:
    c = case(arch)
    result = c.decode(StdConfig(mode="dense"))
    tm.assert_same(result.sequences, c.reference)
    assert result.stats.total.drafted == 0
    assert result.stats.total.rounds == result.stats.total.generated - len(result.stats.rows)


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_sequential_verify_equals_generate(arch: str) -> None:
    c = case(arch)
    result = c.decode(StdConfig(gamma=4, sparse_budget=40, verify="sequential"))
    tm.assert_same(result.sequences, c.reference)


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_keeping_every_visual_token_accepts_every_draft(arch: str) -> None:
    """With K = all visual tokens the draft is the dense model: every draft is accepted, so each row
    needs exactly ceil((generated - 1) / (γ + 1)) rounds. A wrong position (M-RoPE!) breaks this."""
    c = case(arch)
    gamma = 4
    result = c.decode(StdConfig(gamma=gamma, sparse_budget=10**6))
    tm.assert_same(result.sequences, c.reference)
    for row in result.stats.rows:
        assert row.rounds == math.ceil((row.generated - 1) / (gamma + 1)), row
        assert row.accepted == row.drafted and row.rejections == 0, row  # unusable drafts not counted
    longest = max(row.generated for row in result.stats.rows)
    assert result.stats.batch_rounds == math.ceil((longest - 1) / (gamma + 1))


@pytest.mark.parametrize("arch", ["qwen2_vl"])
def test_rows_stop_at_eos_at_different_times(arch: str) -> None:
    c = case(arch)
    eos = c.tiny.model.generation_config.eos_token_id
    generated = c.reference[:, c.prompt_len :].tolist()
    lengths = [row.index(eos) + 1 if eos in row else len(row) for row in generated]
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW, (
        f"the batch must mix early EOS and full rows: {lengths}"
    )
    result = c.decode(StdConfig(gamma=4, sparse_budget=40))
    tm.assert_same(result.sequences, c.reference)
    assert [row.generated for row in result.stats.rows] == lengths


def test_a_deliberately_bad_draft_still_gives_the_dense_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace every draft with a random token: verification must reject them and keep the output."""
    c = case("qwen2_vl")
    real_draft = decoder_module._Decode.draft
    generator = torch.Generator().manual_seed(0)

    def bad_draft(self: decoder_module._Decode, gamma: int) -> tuple[torch.Tensor, None]:
        drafts, _ = real_draft(self, gamma)
        return torch.randint(0, tm.VOCAB_SIZE, drafts.shape, generator=generator), None

    monkeypatch.setattr(decoder_module._Decode, "draft", bad_draft)
    result = c.decode(StdConfig(gamma=4, sparse_budget=10**6))
    tm.assert_same(result.sequences, c.reference)
    assert result.stats.total.acceptance_rate < 0.2


def test_one_rows_rejection_keeps_other_rows_accepted_tokens() -> None:
    """Rows accept different amounts per round; each keeps its own (no minimum over the batch)."""
    c = case("qwen2_5_vl")
    result = c.decode(StdConfig(gamma=9, sparse_budget=40))
    tm.assert_same(result.sequences, c.reference)
    rounds = [row.rounds for row in result.stats.rows]
    assert len(set(rounds)) > 1, f"rows should progress at different speeds: {rounds}"
    assert min(rounds) < result.stats.batch_rounds


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_auto_mode_equals_generate(arch: str) -> None:
    c = case(arch)
    result = c.decode(StdConfig(mode="auto", gamma=6, sparse_budget=40))
    tm.assert_same(result.sequences, c.reference)
    assert set(result.stats.round_gammas) <= set(range(7))


def test_switching_between_dense_and_draft_rounds_keeps_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto alternates dense-only rounds (which leave the sparse cache behind) and draft rounds (which
    first bring it up to date); any sequence of choices gives the dense output."""
    from std_core.auto import AutoPolicy

    pattern = iter([0, 0, 3, 0, 0, 0, 5, 1, 0, 2] * 10)
    monkeypatch.setattr(AutoPolicy, "choose", lambda self: next(pattern))
    c = case("qwen2_vl")
    result = c.decode(StdConfig(mode="auto", gamma=6, sparse_budget=40))
    tm.assert_same(result.sequences, c.reference)
    assert result.stats.round_gammas[:8] == (0, 0, 3, 0, 0, 0, 5, 1)
