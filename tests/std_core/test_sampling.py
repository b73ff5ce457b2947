"""Sampling with StD: every committed token is distributed exactly as the dense model's.

Method, as vLLM's rejection-sampler test: (1) the acceptance rule alone, on a small vocabulary, with
hundreds of thousands of vectorised trials, reproduces the target distribution p from drafts of any q;
(2) the whole decoder, sampling a batch of thousands of identical prompts, produces the exact joint
distribution of three tokens computed by enumeration from the dense model under ``generate``'s
warpers (temperature, top-k, top-p); (3) seeded sampling is reproducible.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from std_core import SparseToDenseDecoder, StdConfig
from std_core.acceptance import accepted_length, residual_distribution, sample, sampling_agreement
from std_core.diagnostics import _teacher_forced_logits
from tests import tiny_models as tm


def _one_position(p: torch.Tensor, q: torch.Tensor, trials: int, seed: int) -> torch.Tensor:
    """Committed first tokens of ``trials`` speculative steps with one draft from q against p."""
    gen = torch.Generator().manual_seed(seed)
    vocab = p.shape[0]
    drafts = torch.multinomial(q.expand(trials, vocab), 1, replacement=True, generator=gen)
    p_all = torch.stack([p, torch.full_like(p, 1 / vocab)])[None].expand(trials, -1, -1)
    q_all = q[None, None].expand(trials, 1, -1)
    uniforms = torch.rand(trials, 1, generator=gen)
    accepted = accepted_length(sampling_agreement(drafts, p_all, q_all, uniforms))
    bonus = sample(residual_distribution(p_all, q_all, accepted), gen)
    return torch.where(accepted == 1, drafts[:, 0], bonus)


@pytest.mark.parametrize(
    "case",
    ["random", "draft_misses_support", "identical", "target_is_one_hot"],
)
def test_acceptance_rule_reproduces_the_target_distribution(case: str) -> None:
    gen = torch.Generator().manual_seed(7)
    vocab, trials = 6, 400_000
    p = torch.rand(vocab, generator=gen) ** 3
    q = torch.rand(vocab, generator=gen) ** 3
    if case == "draft_misses_support":
        q[:3] = 0.0  # the draft can never propose tokens 0-2; the residual must supply them
    if case == "identical":
        q = p.clone()
    if case == "target_is_one_hot":
        p = torch.zeros(vocab)
        p[4] = 1.0
    p, q = p / p.sum(), q / q.sum()
    tokens = _one_position(p, q, trials, seed=1)
    empirical = torch.bincount(tokens, minlength=vocab).double() / trials
    assert torch.allclose(empirical, p.double(), atol=0.004), (empirical, p)
    # The draft distribution differs from p (except when identical): sampling q would fail this test.
    if case != "identical":
        assert (q - p).abs().max() > 0.05


def _expand(inputs: dict, n: int) -> dict:
    """``n`` copies of a one-row Qwen2-VL batch (flattened video patches are repeated too)."""
    out = {}
    for key, value in inputs.items():
        out[key] = value.repeat(n, *([1] * (value.ndim - 1)))
    return out


def _exact_joint(model: torch.nn.Module, inputs: dict, warp: LogitsProcessorList, steps: int) -> dict:
    """Exact probability of every 3-token continuation under the warped dense model (enumerated)."""
    first = warp(inputs["input_ids"], model(**inputs).logits[:, -1].float()).softmax(-1)[0]
    support = first.nonzero().flatten().tolist()
    joint: dict[tuple[int, ...], float] = {(t,): float(first[t]) for t in support}
    for _ in range(steps - 1):
        prefixes = list(joint)
        batch = _expand(inputs, len(prefixes))
        logits = _teacher_forced_logits(model, True, batch, torch.tensor([list(p) + [0] for p in prefixes]))
        probs = warp(batch["input_ids"], logits[:, -1].float()).softmax(-1)
        joint = {
            prefix + (t,): joint[prefix] * float(probs[i, t])
            for i, prefix in enumerate(prefixes)
            for t in probs[i].nonzero().flatten().tolist()
        }
    return joint


def total_variation(samples: torch.Tensor, exact: dict[tuple[int, ...], float]) -> float:
    """Total variation between the empirical distribution of the rows of ``samples [N, steps]`` and
    ``exact``; asserts first that no row is outside ``exact``'s support."""
    counts: dict[tuple[int, ...], int] = {}
    for row in samples.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) <= set(exact), "sampled a continuation the warped dense model cannot produce"
    return 0.5 * sum(abs(counts.get(k, 0) / samples.shape[0] - exact[k]) for k in exact)


JOINT_STEPS, JOINT_TRIALS = 3, 3000
JOINT_WARP = {"temperature": 4.0, "top_k": 3, "top_p": 0.9}


def joint_case() -> tuple[dict, dict[tuple[int, ...], float], SparseToDenseDecoder]:
    """The joint test's setup: one prompt to a tiny Qwen2-VL, the exact distribution of its next
    ``JOINT_STEPS`` tokens under ``JOINT_WARP`` (enumerated), and a decoder whose draft (sink + window,
    budget 1) is rejected often."""
    tiny = tm.build("qwen2_vl", seed=3)
    inputs = tm.make_inputs(tiny, [tm.random_video(4, 28, 28, seed=5)], ["describe the video"])
    w = JOINT_WARP
    warp = LogitsProcessorList(
        [
            TemperatureLogitsWarper(w["temperature"]),
            TopKLogitsWarper(w["top_k"]),
            TopPLogitsWarper(w["top_p"]),
        ]
    )
    with torch.inference_mode():
        exact = _exact_joint(tiny.model, inputs, warp, JOINT_STEPS)
    assert len(exact) >= 4, "the warped distribution must have several outcomes to test anything"
    decoder = SparseToDenseDecoder(tiny.model, StdConfig(gamma=2, sparse_budget=1, selection="sink_window"))
    return inputs, exact, decoder


def test_decoder_samples_the_dense_joint_distribution() -> None:
    inputs, exact, decoder = joint_case()
    steps, trials = JOINT_STEPS, JOINT_TRIALS
    result = decoder.generate(
        **_expand(inputs, trials),
        max_new_tokens=steps,
        do_sample=True,
        **JOINT_WARP,
        generator=torch.Generator().manual_seed(0),
    )
    assert result.stats.total.drafted > 0 and result.stats.total.acceptance_rate < 1.0
    tv = total_variation(result.sequences[:, -steps:], exact)
    assert tv < 0.06, f"total variation {tv:.3f} between StD samples and the exact dense distribution"


def test_sampling_with_an_exact_draft_accepts_every_draft() -> None:
    tiny = tm.build("qwen2_vl")
    inputs = tm.make_inputs(tiny, [tm.random_video(8, 56, 56, seed=1)], ["describe the video"])
    result = SparseToDenseDecoder(tiny.model, StdConfig(gamma=4, sparse_budget=10**6)).generate(
        **inputs, max_new_tokens=21, do_sample=True, generator=torch.Generator().manual_seed(0)
    )
    assert result.stats.total.acceptance_rate == 1.0


def test_seeded_sampling_is_reproducible() -> None:
    tiny = tm.build("qwen2_5_vl")
    videos = [tm.random_video(8, 56, 56, seed=1), tm.random_video(4, 56, 84, seed=2)]
    inputs = tm.make_inputs(tiny, videos, ["describe the video", "what colour is the square"])
    decoder = SparseToDenseDecoder(tiny.model, StdConfig(gamma=4, sparse_budget=30))

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return decoder.generate(
            **inputs, max_new_tokens=24, do_sample=True, temperature=0.7, top_p=0.9, generator=generator
        ).sequences

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_top_k_one_sampling_equals_greedy_generate() -> None:
    """top_k=1 leaves one token per position: the warped draft and verify both reduce to argmax."""
    tiny = tm.build("qwen3_vl")
    inputs = tm.make_inputs(tiny, [tm.random_video(8, 64, 64, seed=4)], ["describe the video"])
    reference = tiny.model.generate(**inputs, max_new_tokens=24, do_sample=False)
    result = SparseToDenseDecoder(tiny.model, StdConfig(gamma=4, sparse_budget=20)).generate(
        **inputs, max_new_tokens=24, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(result.sequences, reference)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_history_dependent_processors_match_generate(arch: str) -> None:
    """repetition_penalty and no_repeat_ngram_size read each row's own history at every position."""
    tiny = tm.build(arch)
    frames = 8 if arch == "llava_onevision" else 4
    videos = [tm.random_video(8, 56, 56, seed=1), tm.random_video(frames, 56, 56, seed=2)]
    inputs = tm.make_inputs(tiny, videos, ["describe the video", "what colour is the square ? answer"])
    kwargs = {"max_new_tokens": 30, "repetition_penalty": 1.8, "no_repeat_ngram_size": 2}
    reference = tiny.model.generate(**inputs, do_sample=False, **kwargs)
    result = SparseToDenseDecoder(tiny.model, StdConfig(gamma=4, sparse_budget=30)).generate(
        **inputs, **kwargs
    )
    assert torch.equal(result.sequences, reference)
    plain = tiny.model.generate(**inputs, do_sample=False, max_new_tokens=30)
    assert not torch.equal(plain, reference), (
        "the processors must change the output for this test to mean anything"
    )


def test_outcome_space_of_the_joint_test_is_enumerated_correctly() -> None:
    """Guard for the joint test's oracle: the enumerated probabilities sum to one."""
    tiny = tm.build("qwen2_vl", seed=3)
    inputs = tm.make_inputs(tiny, [tm.random_video(4, 28, 28, seed=5)], ["describe the video"])
    warp = LogitsProcessorList([TemperatureLogitsWarper(4.0), TopKLogitsWarper(3), TopPLogitsWarper(0.9)])
    with torch.inference_mode():
        exact = _exact_joint(tiny.model, inputs, warp, 3)
    assert abs(sum(exact.values()) - 1.0) < 1e-4
    assert all(len(k) == 3 for k in exact) and len(set(itertools.chain.from_iterable(exact))) > 1
