"""Bad input fails fast, before any forward, with a message that says what to fix."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from std_core import SUPPORTED_ARCHITECTURES, SparseToDenseDecoder, StdConfig, UnsupportedModelError
from tests import tiny_models as tm


@pytest.fixture(scope="module")
def tiny() -> tm.TinyVideoLM:
    return tm.build("qwen2_vl")


@pytest.fixture(scope="module")
def inputs(tiny: tm.TinyVideoLM) -> dict:
    return tm.make_inputs(tiny, [tm.random_video(8, 56, 56, seed=1)], ["describe the video"])


def _no_forward(monkeypatch: pytest.MonkeyPatch, model: torch.nn.Module) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a forward ran before validation")

    monkeypatch.setattr(model, "forward", fail)


def test_unsupported_model_names_the_supported_ones() -> None:
    model = Qwen2ForCausalLM(
        Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(UnsupportedModelError) as err:
        SparseToDenseDecoder(model)
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(err.value)


def test_no_video_in_the_inputs(tiny: tm.TinyVideoLM, monkeypatch: pytest.MonkeyPatch) -> None:
    text_only = tiny.processor(text=["describe the video"], return_tensors="pt")
    decoder = SparseToDenseDecoder(tiny.model)
    _no_forward(monkeypatch, tiny.model)
    with pytest.raises(ValueError, match="no video"):
        decoder.generate(**text_only, max_new_tokens=4)


def test_prompt_longer_than_the_models_positions(
    tiny: tm.TinyVideoLM, inputs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = SparseToDenseDecoder(tiny.model)
    _no_forward(monkeypatch, tiny.model)
    limit = tiny.model.config.text_config.max_position_embeddings
    with pytest.raises(ValueError, match="positions"):
        decoder.generate(**inputs, max_new_tokens=limit)


def test_inputs_on_another_device(
    tiny: tm.TinyVideoLM, inputs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = SparseToDenseDecoder(tiny.model)
    _no_forward(monkeypatch, tiny.model)
    moved = {k: v.to("meta") if k == "pixel_values_videos" else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"pixel_values_videos.*meta.*model\.device"):
        decoder.generate(**moved, max_new_tokens=4)


def test_right_padding_is_refused(tiny: tm.TinyVideoLM, monkeypatch: pytest.MonkeyPatch) -> None:
    videos = [tm.random_video(8, 56, 56, seed=1), tm.random_video(4, 56, 56, seed=2)]
    tiny.processor.tokenizer.padding_side = "right"
    try:
        padded = tm.make_inputs(tiny, videos, ["describe the video", "what colour is the square ? answer"])
    finally:
        tiny.processor.tokenizer.padding_side = "left"
    decoder = SparseToDenseDecoder(tiny.model)
    _no_forward(monkeypatch, tiny.model)
    with pytest.raises(ValueError, match="left padding"):
        decoder.generate(**padded, max_new_tokens=4)


@pytest.mark.parametrize("kwargs", [{"num_beams": 2}, {"num_return_sequences": 2}])
def test_unsupported_generation_modes(tiny: tm.TinyVideoLM, inputs: dict, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="does not support"):
        SparseToDenseDecoder(tiny.model).generate(**inputs, max_new_tokens=4, **kwargs)


@pytest.mark.parametrize("kwargs", [{"gamma": 0}, {"sparse_budget": 0}])
def test_bad_config_fails_before_the_decoder_exists(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        StdConfig(**kwargs)


def test_flash_attention_models_get_an_actionable_error(tiny: tm.TinyVideoLM) -> None:
    model = tm.build("qwen2_vl").model
    model.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        SparseToDenseDecoder(model)


def test_plain_generate_is_unchanged_after_wrapping(tiny: tm.TinyVideoLM, inputs: dict) -> None:
    model = tm.build("qwen2_vl", seed=4).model
    before = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    SparseToDenseDecoder(model)
    after = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(before, after)
