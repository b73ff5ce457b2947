"""first_divergence: the first differing token per row and the dense logit margin there."""

from __future__ import annotations

import pytest
import torch

from std_core import SparseToDenseDecoder, StdConfig, first_divergence
from tests import tiny_models as tm


@pytest.fixture(scope="module")
def setup() -> tuple[tm.TinyVideoLM, dict, object]:
    tiny = tm.build("qwen2_vl", seed=1)
    videos = [tm.random_video(8, 56, 56, seed=1), tm.random_video(4, 56, 84, seed=2)]
    inputs = tm.make_inputs(tiny, videos, ["describe the video", "what colour is the square ? answer"])
    out = tiny.model.generate(
        **inputs, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    return tiny, inputs, out


def test_identical_outputs_have_no_divergence(setup: tuple) -> None:
    tiny, inputs, out = setup
    std = SparseToDenseDecoder(tiny.model, StdConfig(gamma=4, sparse_budget=20)).generate(
        **inputs, max_new_tokens=16
    )
    assert first_divergence(tiny.model, inputs, std.sequences, out.sequences) == [None, None]


def test_reports_position_tokens_and_the_dense_margin(setup: tuple) -> None:
    tiny, inputs, out = setup
    prompt_len = inputs["input_ids"].shape[1]
    altered = out.sequences.clone()
    position = 5
    dense_token = int(altered[1, prompt_len + position])
    altered[1, prompt_len + position] = (dense_token + 1) % tm.VOCAB_SIZE
    result = first_divergence(tiny.model, inputs, out.sequences, altered)
    assert result[0] is None
    found = result[1]
    assert (found.row, found.position, found.token_a) == (1, position, dense_token)
    logits = out.logits[position][1].float()  # what generate saw at that step
    top2 = logits.topk(2).values
    assert found.margin == pytest.approx(float(top2[0] - top2[1]), abs=1e-3)
    assert found.gap == pytest.approx(float(logits[dense_token] - logits[found.token_b]), abs=1e-3)
    assert found.gap >= found.margin > 0


@pytest.mark.gpu
def test_bf16_divergences_are_near_ties_on_gpu() -> None:
    """bf16 on a GPU: sequential verify has the numerics of one-token decoding (equal to the dense mode);
    a parallel verify may flip near-ties only, which first_divergence shows as a small margin."""
    tiny = tm.build("qwen2_vl", seed=2)
    model = tiny.model.to("cuda", torch.bfloat16)
    videos = [tm.random_video(16, 112, 112, seed=s) for s in range(4)]
    inputs = tm.make_inputs(tiny, videos, ["describe the video"] * 4)
    inputs = {k: v.to("cuda") for k, v in inputs.items()}
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)

    def run(config: StdConfig) -> torch.Tensor:
        return SparseToDenseDecoder(model, config).generate(**inputs, max_new_tokens=32).sequences

    dense = run(StdConfig(mode="dense"))
    assert torch.equal(run(StdConfig(gamma=4, sparse_budget=32, verify="sequential")), dense)
    reference = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    for other in (dense, run(StdConfig(gamma=4, sparse_budget=32))):
        for divergence in first_divergence(model, inputs, reference, other):
            assert divergence is None or divergence.margin < 0.25, divergence
