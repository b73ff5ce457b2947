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


@pytest.mark.parametrize("mode", ["std", "auto"])
def test_round_advances_sum_to_the_decode_steps(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What auto values a round by: how far it moved the batch's slowest live row. In a batch whose
    rows stop at different times the advances of a call sum to its longest output minus the first
    token (the prefill's), whatever each round drafted; a round is ``cut`` when the rows furthest behind
    stopped in it."""
    from std_core import auto

    advances: list[int] = []
    cuts: list[bool] = []
    for schedule in (auto.FixedSchedule, auto.AutoSchedule):
        real = schedule.record

        def record(self, gamma, outcomes, draft, verify, advance=None, cut=False, _real=real) -> None:  # noqa: ANN001
            advances.append(advance)
            cuts.append(cut)
            _real(self, gamma, outcomes, draft, verify, advance, cut)

        monkeypatch.setattr(schedule, "record", record)
    c = case("qwen2_vl")
    result = c.decode(StdConfig(mode=mode, gamma=4, sparse_budget=40))
    tm.assert_same(result.sequences, c.reference)
    generated = [row.generated for row in result.stats.rows]
    assert len(set(generated)) > 1 and len(advances) == result.stats.batch_rounds
    assert all(a >= 1 for a in advances) and sum(advances) == max(generated) - 1
    # the last round stopped the rows the batch waited for; most rounds stopped none of them
    assert cuts[-1] and sum(cuts) < len(cuts) / 2, cuts


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
    monkeypatch.setattr(AutoPolicy, "choose", lambda self, limit=None: next(pattern))
    c = case("qwen2_vl")
    result = c.decode(StdConfig(mode="auto", gamma=6, sparse_budget=40))
    tm.assert_same(result.sequences, c.reference)
    assert result.stats.round_gammas[:8] == (0, 0, 3, 0, 0, 0, 5, 1)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_auto_drafts_the_gamma_its_measured_costs_favour(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto's γ comes from its calibration (here a CPU-like one, where γ = 4-5 beats 9) and the running
    acceptance; whichever γ it picks, the output is ``generate``'s."""
    from std_core import auto
    from std_core.auto import StepCosts, best_gamma

    cpu_like = StepCosts.from_verifies(1.0, 0.4, [(1, 1.0), (2, 1.25), (3, 1.45), (5, 1.8), (10, 2.7)])
    c = case(arch)
    monkeypatch.setattr(decoder_module._Decode, "measure_costs", lambda self: cpu_like)
    monkeypatch.setitem(auto._ROUND_COSTS, c.tiny.model, {})  # calibrate afresh
    monkeypatch.setitem(auto._ACCEPTANCE, c.tiny.model, 0.95)  # an earlier batch's acceptance
    result = c.decode(StdConfig(mode="auto", gamma=9, sparse_budget=10**6))
    tm.assert_same(result.sequences, c.reference)
    assert 3 <= best_gamma(cpu_like, 0.95, 9) <= 5  # not 9: the verify's cost grows with its tokens
    first, decided = result.stats.round_gammas[:2]
    assert first == 0 and 3 <= decided <= 6, result.stats.round_gammas  # dense measured first; bookkeeping


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every tensor-to-host read (``.tolist()``, ``.item()``, ``.cpu()``, ``bool``/``int``/``float`` of
    a tensor, ...) made inside the round loop, by name."""
    reads: list[str] = []
    inside = [False]
    for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if inside[0]:
                reads.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_round = decoder_module._Decode.round

    def round_(self: decoder_module._Decode) -> None:
        inside[0] = True
        try:
            real_round(self)
        finally:
            inside[0] = False

    monkeypatch.setattr(decoder_module._Decode, "round", round_)
    return reads


@pytest.mark.parametrize("mode", ["std", "dense", "auto"])
def test_one_host_synchronisation_per_round(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drafting, verifying, accepting and rolling back stay on the device; each round reads its counts
    back once (a GPU then waits once per round, not per token or per row)."""
    c = case("qwen2_5_vl")
    reads = _count_host_reads(monkeypatch)
    result = c.decode(StdConfig(mode=mode, gamma=4, sparse_budget=40))
    tm.assert_same(result.sequences, c.reference)
    assert reads == ["tolist"] * result.stats.batch_rounds, reads[:20]


def test_rounds_reuse_the_preallocated_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decode forward's mask is a view of its cache's one preallocated bias: no round allocates a
    mask (or anything else) that grows with the cache."""
    from std_core.kv_cache import SlotCache

    storages: dict[int, set[int]] = {}
    real = SlotCache.begin_forward

    def begin_forward(self: SlotCache, q: int) -> torch.Tensor:
        mask = real(self, q)
        storages.setdefault(id(self), set()).add(mask.untyped_storage().data_ptr())
        assert mask.untyped_storage().data_ptr() == self.bias.untyped_storage().data_ptr()
        return mask

    monkeypatch.setattr(SlotCache, "begin_forward", begin_forward)
    monkeypatch.setattr(SlotCache, "allowed", lambda *a, **k: pytest.fail("a mask built afresh"))
    c = case("qwen2_vl")
    result = c.decode(StdConfig(gamma=4, sparse_budget=40))
    tm.assert_same(result.sequences, c.reference)
    assert len(storages) == 2 and all(len(ptrs) == 1 for ptrs in storages.values())  # dense, sparse


def test_a_users_stopping_criterion_ends_rows_where_generate_ends_them() -> None:
    """Criteria other than max length and EOS run on the host after each round, per new token, and cut
    a row exactly where ``generate`` does (here: at a token that occurs mid-caption in some rows)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAt(StoppingCriteria):
        def __init__(self, token: int) -> None:
            self.token = token

        def __call__(self, input_ids: torch.Tensor, scores: object, **kwargs: object) -> torch.Tensor:
            return input_ids[:, -1] == self.token

    c = case("qwen2_vl")
    generated = c.reference[:, c.prompt_len :]
    token = int(generated[0, 12])  # row 0's 13th token: some rows stop early, others run on
    criteria = StoppingCriteriaList([StopAt(token)])
    reference = c.tiny.model.generate(
        **c.inputs, max_new_tokens=MAX_NEW, do_sample=False, stopping_criteria=criteria
    )
    lengths = [
        (row != c.tiny.model.generation_config.pad_token_id).sum() for row in reference[:, c.prompt_len :]
    ]
    assert min(lengths) < MAX_NEW - 10, lengths
    for config in (StdConfig(gamma=4, sparse_budget=40), StdConfig(gamma=9, sparse_budget=10**6)):
        decoder = SparseToDenseDecoder(c.tiny.model, config)
        result = decoder.generate(**c.inputs, max_new_tokens=MAX_NEW, stopping_criteria=criteria)
        tm.assert_same(result.sequences, reference)
