"""Benchmark presets and inputs: real 7B shapes (built on the meta device, no memory), shrunk 7B presets
built for real on CPU, and synthetic inputs that ``generate`` accepts without running a vision tower.

Method: parameter counts of the full presets are compared with the published model sizes; the synthetic
inputs are checked by decoding them with plain ``generate`` and with StD (fp32, CPU: equal tokens) and by
checking that the vision features reach the model (other features, other tokens).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.bench.inputs import SyntheticSpec, fresh, synthetic_inputs, video_grid
from pipeline.bench.presets import PRESETS, VIDEO_ID, build_model, get_preset
from std_core import SparseToDenseDecoder, StdConfig

# Published totals (language model + vision tower), in billions of parameters.
PUBLISHED = {"qwen2-vl-7b": 8.29, "qwen2.5-vl-7b": 8.29, "llava-onevision-7b": 8.03}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_7b_presets_have_the_published_shapes(name: str) -> None:
    model = build_model(PRESETS[name], torch.bfloat16, "meta")
    total = sum(p.numel() for p in model.parameters()) / 1e9
    assert total == pytest.approx(PUBLISHED[name], abs=0.03)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (28, 28, 4)
    assert PRESETS[name].kv_bytes_per_token(torch.bfloat16) == 28 * 2 * 4 * 128 * 2  # 56 KiB, as in the notes


def test_kv_bound_preset_is_kv_bound_at_the_top_of_the_sweep() -> None:
    model = build_model(PRESETS["kv-bound"])
    weights = sum(p.numel() * 4 for n, p in model.named_parameters() if "visual" not in n)
    kv_16k_batch8 = PRESETS["kv-bound"].kv_bytes_per_token(torch.float32) * 16384 * 8
    assert kv_16k_batch8 > 10 * weights
    assert PRESETS["kv-bound"].kv_bytes_per_token(torch.float32) * 1024 < weights


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="kv-bound"):
        get_preset("gpt-5")


@pytest.mark.parametrize("tokens", [1, 64, 100, 1024, 16384, 65536, 4097])
def test_video_grid_holds_exactly_the_visual_tokens(tokens: int) -> None:
    t, h, w = video_grid(tokens)
    assert h % 2 == 0 and w % 2 == 0 and t * h * w // 4 == tokens


def _small(arch: str):
    preset = dataclasses.replace(PRESETS["kv-bound"], name=f"small-{arch}", arch=arch, vocab=256)
    return build_model(preset, init_std=0.5)  # varied tokens: equality is earned, not a repeated token


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_synthetic_inputs_decode_equally_with_generate_and_std(arch: str) -> None:
    model = _small(arch)
    spec = SyntheticSpec(visual_tokens=96, batch=3, text_tokens=12, padding=3)
    inputs = synthetic_inputs(model, spec)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == (3, 96 + 12 + 2)
    assert mask.sum(dim=1).tolist() == [ids.shape[1] - p for p in (0, 2, 3)]  # left padding 0..3
    assert ((ids == VIDEO_ID).sum(dim=1) == 96).all()
    with torch.inference_mode():
        plain = model.generate(**fresh(inputs), max_new_tokens=10, do_sample=False)
    std = SparseToDenseDecoder(model, StdConfig(gamma=3, sparse_budget=40)).generate(
        **fresh(inputs), max_new_tokens=10
    )
    assert torch.equal(plain, std.sequences)
    assert len(set(plain[0, -10:].tolist())) > 1
    other = synthetic_inputs(model, dataclasses.replace(spec, seed=1))
    other["input_ids"] = ids  # same text, other vision features
    with torch.inference_mode():
        assert not torch.equal(model.generate(**fresh(other), max_new_tokens=10, do_sample=False), plain)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shrunk_7b_presets_build_and_decode_on_cpu(name: str) -> None:
    """The real widths (hidden 3584, 28 / 4 heads) with one layer and a small vocabulary."""
    model = build_model(PRESETS[name].shrink(layers=1, vocab=512), torch.float32, "cpu")
    assert model.config.text_config.hidden_size == 3584
    inputs = synthetic_inputs(model, SyntheticSpec(visual_tokens=64, batch=2, text_tokens=8, padding=1))
    result = SparseToDenseDecoder(model, StdConfig(gamma=2, sparse_budget=32)).generate(
        **fresh(inputs), max_new_tokens=4
    )
    with torch.inference_mode():
        assert torch.equal(
            result.sequences, model.generate(**fresh(inputs), max_new_tokens=4, do_sample=False)
        )
