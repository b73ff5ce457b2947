"""Model presets: the real shapes of 7B Video-LLMs with random weights, and a small CPU "kv-bound" model.

A preset fixes the language model's shape (what decoding reads every step: its weights and its KV
cache) and the architecture's vision configuration. The benchmark never runs the vision tower: it feeds
vision-encoder outputs directly (see :mod:`pipeline.bench.inputs`), so the tower's weights only take
memory. Random weights decode as fast as trained ones of the same shape, but their drafts are accepted
at meaningless rates: speedups at a real acceptance are *projected* from measured step costs (see
:mod:`pipeline.bench.projection`).

Token ids are the same small ids in every preset (pad 0, vision start 1, vision end 2, image 3, video
4, end of turn 5); text ids are drawn from ``[TEXT_TOKEN_START, vocab)``.

``max_positions`` only bounds the prompt length that ``std_core`` accepts (RoPE is computed on the fly,
no weight depends on it); :func:`build_model` raises it when a benchmark asks for longer prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

PAD_ID, VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID, END_OF_TURN_ID = 0, 1, 2, 3, 4, 5
TEXT_TOKEN_START = 8


@dataclass(frozen=True)
class Preset:
    """The shape of a Video-LLM's language model, plus its architecture and vision tower depth."""

    name: str
    arch: str  # "qwen2_vl" | "qwen2_5_vl" | "llava_onevision"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    max_positions: int
    tie_embeddings: bool
    vision_layers: int
    description: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of dense KV cache one token adds (every layer, keys and values)."""
        return self.layers * 2 * self.kv_heads * self.head_dim * _itemsize(dtype)

    def shrink(self, layers: int = 1, vocab: int = 512, vision_layers: int = 1) -> Preset:
        """The same widths with fewer layers and a small vocabulary: a CPU-sized construction check."""
        return replace(
            self,
            name=f"{self.name}-shrunk{layers}",
            layers=layers,
            vocab=vocab,
            vision_layers=vision_layers,
        )


_QWEN2_7B = dict(
    hidden=3584,
    intermediate=18944,
    layers=28,
    heads=28,
    kv_heads=4,
    rope_theta=1_000_000.0,
    vision_layers=32,
)

PRESETS: dict[str, Preset] = {
    "qwen2-vl-7b": Preset(
        name="qwen2-vl-7b",
        arch="qwen2_vl",
        vocab=152064,
        max_positions=32768,
        tie_embeddings=False,
        description="Qwen2-VL-7B-Instruct shapes (28 layers, 28 heads / 4 KV heads, head_dim 128)",
        **_QWEN2_7B,
    ),
    "qwen2.5-vl-7b": Preset(
        name="qwen2.5-vl-7b",
        arch="qwen2_5_vl",
        vocab=152064,
        max_positions=128000,
        tie_embeddings=False,
        description="Qwen2.5-VL-7B-Instruct shapes (as Qwen2-VL-7B; windowed vision tower)",
        **_QWEN2_7B,
    ),
    "llava-onevision-7b": Preset(
        name="llava-onevision-7b",
        arch="llava_onevision",
        vocab=152128,
        max_positions=32768,
        tie_embeddings=False,
        description="LLaVA-OneVision-Qwen2-7B shapes (Qwen2-7B language model, SigLIP vision tower)",
        **{**_QWEN2_7B, "vision_layers": 26},
    ),
    "kv-bound": Preset(
        name="kv-bound",
        arch="qwen2_vl",
        hidden=128,
        intermediate=512,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab=4096,
        rope_theta=10000.0,
        max_positions=32768,
        tie_embeddings=True,
        vision_layers=1,
        description=(
            "small CPU Qwen2-VL (2 layers, 4 heads / 2 KV heads, head_dim 32): 4 MB of fp32 weights read "
            "per step, 1 KiB of fp32 KV per token, so KV bytes pass weight bytes at 4k tokens x batch rows "
            "(a 7B model: 15.2 GB of bf16 weights, 56 KiB of KV per token, at 265k, e.g. batch 8 x 33k)"
        ),
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_config(preset: Preset, max_positions: int | None = None) -> PretrainedConfig:
    """The Hugging Face config of ``preset`` (random-weight model; ids as in the module docstring)."""
    positions = max(preset.max_positions, max_positions or 0)
    if preset.arch == "llava_onevision":
        return _llava_config(preset, positions)
    section = preset.head_dim // 2
    hw = 3 * section // 8  # Qwen2-VL-7B's M-RoPE split of head_dim 128: 16 / 24 / 24
    text = {
        "vocab_size": preset.vocab,
        "hidden_size": preset.hidden,
        "intermediate_size": preset.intermediate,
        "num_hidden_layers": preset.layers,
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.kv_heads,
        "max_position_embeddings": positions,
        "rope_parameters": {"rope_type": "default", "mrope_section": [section - 2 * hw, hw, hw],
                            "rope_theta": preset.rope_theta},
        "pad_token_id": PAD_ID,
        "bos_token_id": None,
        "eos_token_id": END_OF_TURN_ID,
        "tie_word_embeddings": preset.tie_embeddings,
    }  # fmt: skip
    ids = {
        "image_token_id": IMAGE_ID,
        "video_token_id": VIDEO_ID,
        "vision_start_token_id": VISION_START_ID,
        "vision_end_token_id": VISION_END_ID,
        "tie_word_embeddings": preset.tie_embeddings,
    }
    if preset.arch == "qwen2_vl":
        vision = {"depth": preset.vision_layers, "embed_dim": 1280, "hidden_size": preset.hidden,
                  "num_heads": 16, "mlp_ratio": 4}  # fmt: skip
        if preset.hidden < 1280:
            vision.update(embed_dim=64, num_heads=2)  # a small tower for a small language model
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if preset.arch == "qwen2_5_vl":
        full = [i for i in (7, 15, 23, 31) if i < preset.vision_layers] or [preset.vision_layers - 1]
        vision = {"depth": preset.vision_layers, "hidden_size": 1280, "intermediate_size": 3420,
                  "num_heads": 16, "out_hidden_size": preset.hidden, "window_size": 112,
                  "fullatt_block_indexes": full}  # fmt: skip
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    raise ValueError(f"unknown architecture {preset.arch!r}")


def _llava_config(preset: Preset, positions: int) -> LlavaOnevisionConfig:
    text = {
        "model_type": "qwen2",
        "vocab_size": preset.vocab,
        "hidden_size": preset.hidden,
        "intermediate_size": preset.intermediate,
        "num_hidden_layers": preset.layers,
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.kv_heads,
        "max_position_embeddings": positions,
        "rope_theta": preset.rope_theta,
        "pad_token_id": PAD_ID,
        "bos_token_id": None,
        "eos_token_id": END_OF_TURN_ID,
        "tie_word_embeddings": preset.tie_embeddings,
    }
    vision = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
              "num_hidden_layers": preset.vision_layers, "num_attention_heads": 16, "image_size": 384,
              "patch_size": 14}  # fmt: skip
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=preset.tie_embeddings,
    )


_MODEL_CLASSES = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
}


def build_model(
    preset: Preset,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_positions: int | None = None,
    seed: int = 0,
    init_std: float | None = None,
) -> torch.nn.Module:
    """A randomly initialised model of ``preset``, built directly on ``device`` in ``dtype`` (eval mode,
    sdpa attention, greedy, no end-of-sequence token: every row generates ``max_new_tokens``).
    ``device="meta"`` builds the shapes only (parameter counts without memory). ``init_std`` overrides
    the weights' initialisation std (transformers' 0.02: random models repeat one token, so every draft
    is accepted; ~0.5: varied tokens, drafts almost never accepted)."""
    torch.manual_seed(seed)
    config = build_config(preset, max_positions)
    if init_std is not None:
        for sub in (config, config.text_config, config.vision_config):
            sub.initializer_range = init_std
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = _MODEL_CLASSES[preset.arch]._from_config(config, dtype=dtype, attn_implementation="sdpa")
    generation = model.generation_config
    generation.do_sample, generation.eos_token_id, generation.pad_token_id = False, None, PAD_ID
    generation.bos_token_id = None
    model.config.bos_token_id = None
    return model.eval()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
