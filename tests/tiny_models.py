"""Tiny randomly initialised Video-LLMs of every supported architecture, built from real configs.

Each builder returns a model (fp32, eval mode) and its real Hugging Face processor over a small
word-level tokenizer, so test inputs are exactly what the model's own processor produces (left
padding, ``mm_token_type_ids``, grids). No download happens: everything is built from configs.

``initializer_range`` is raised so that random models produce varied, input-dependent tokens instead
of repeating one token forever; the exactness tests assert that variety.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
WORDS = [
    "describe",
    "the",
    "video",
    "what",
    "colour",
    "shape",
    "moves",
    "left",
    "right",
    "up",
    "down",
    "red",
    "green",
    "blue",
    "yellow",
    "square",
    "circle",
    "triangle",
    "appears",
    "disappears",
    "first",
    "last",
    "then",
    "and",
    "a",
    "an",
    "is",
    "was",
    "which",
    "how",
    "many",
    "frames",
    "start",
    "end",
    "user",
    "assistant",
    "system",
    "you",
    "are",
    "helpful",
    "answer",
    "question",
    "with",
    "option",
    "letter",
    "A",
    "B",
    "C",
    "D",
    ".",
    ",",
    "?",
    ":",
    "\n",
]
VOCAB_SIZE = 160  # > len(specials) + len(WORDS); the rest are unnamed ids the model may emit

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyVideoLM:
    """A tiny model, its processor, and the id of its video placeholder token."""

    arch: str
    model: torch.nn.Module
    processor: object
    video_token: str
    image_token: str


def _tokenizer(specials: list[str], extra: dict[str, str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        padding_side="left",
        extra_special_tokens=extra,
    )
    return tok


def _qwen_text(head_dim: int, **overrides: object) -> dict:  # noqa: D401
    section = head_dim // 2
    mrope = [section - 2 * (section // 4), section // 4, section // 4]
    text = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "initializer_range": 0.5,
        "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
        "pad_token_id": 0,
        "eos_token_id": 2,
    }
    text.update(overrides)
    return text


def _qwen_ids(tok: PreTrainedTokenizerFast) -> dict:
    ids = tok.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _finish(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.generation_config.do_sample = False
    model.generation_config.bos_token_id = None
    model.config.bos_token_id = None
    return model.eval()


def build_qwen2_vl(seed: int = 0, qwen25: bool = False) -> TinyVideoLM:
    torch.manual_seed(seed)
    tok = _tokenizer(QWEN_SPECIALS, {})
    vision = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": 0.5,
    }
    if qwen25:
        vision.update({"intermediate_size": 64, "out_hidden_size": 64, "window_size": 56})
        vision.pop("embed_dim")
        config = Qwen2_5_VLConfig(text_config=_qwen_text(16), vision_config=vision, **_qwen_ids(tok))
        model = Qwen2_5_VLForConditionalGeneration(config)
        processor_cls = Qwen2_5_VLProcessor
    else:
        config = Qwen2VLConfig(text_config=_qwen_text(16), vision_config=vision, **_qwen_ids(tok))
        model = Qwen2VLForConditionalGeneration(config)
        processor_cls = Qwen2VLProcessor
    pixels = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 64}
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )
    arch = "qwen2_5_vl" if qwen25 else "qwen2_vl"
    return TinyVideoLM(arch, _finish(model, seed), processor, "<|video_pad|>", "<|image_pad|>")


def build_qwen3_vl(seed: int = 0) -> TinyVideoLM:
    torch.manual_seed(seed)
    tok = _tokenizer(QWEN_SPECIALS, {})
    text = _qwen_text(16)
    text["head_dim"] = 16
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
        "initializer_range": 0.5,
    }
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    model = Qwen3VLForConditionalGeneration(config)
    pixels = {"size": {"shortest_edge": 32 * 32, "longest_edge": 32 * 32 * 4096}}  # a whole-video budget
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, min_pixels=32 * 32, max_pixels=32 * 32 * 64),
        video_processor=Qwen3VLVideoProcessor(
            **pixels, patch_size=16, do_sample_frames=False, cap_pixels_per_frame=True
        ),
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )
    return TinyVideoLM("qwen3_vl", _finish(model, seed), processor, "<|video_pad|>", "<|image_pad|>")


def build_llava_onevision(seed: int = 0) -> TinyVideoLM:
    torch.manual_seed(seed)
    tok = _tokenizer(LLAVA_SPECIALS, {"image_token": "<image>", "video_token": "<video>"})
    ids = tok.convert_tokens_to_ids
    text = {
        "model_type": "qwen2",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "initializer_range": 0.5,
        "pad_token_id": 0,
        "eos_token_id": 2,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 7,
    }
    config = LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_layer=-1,
        image_grid_pinpoints=[[56, 56]],
        initializer_range=0.5,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    size = {"height": 56, "width": 56}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[56, 56]]),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tok,
        num_image_tokens=64,
        vision_feature_select_strategy="full",
        chat_template=QWEN_TEMPLATE.replace("<|vision_start|><|video_pad|><|vision_end|>", "<video>").replace(
            "<|vision_start|><|image_pad|><|vision_end|>", "<image>"
        ),
    )
    return TinyVideoLM("llava_onevision", _finish(model, seed), processor, "<video>", "<image>")


def build(arch: str, seed: int = 0) -> TinyVideoLM:
    """The tiny model of ``arch`` (one of :data:`ARCHITECTURES`)."""
    if arch == "qwen2_vl":
        return build_qwen2_vl(seed)
    if arch == "qwen2_5_vl":
        return build_qwen2_vl(seed, qwen25=True)
    if arch == "qwen3_vl":
        return build_qwen3_vl(seed)
    if arch == "llava_onevision":
        return build_llava_onevision(seed)
    raise ValueError(arch)


def random_video(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """A uint8 video [T, H, W, 3] of smooth random blobs (not constant, so visual tokens differ)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(num_frames, height // 4 + 1, width // 4 + 1, 3), dtype=np.uint8)
    frames = base.repeat(4, axis=1).repeat(4, axis=2)[:, :height, :width]
    return np.ascontiguousarray(frames)


def make_inputs(
    tiny: TinyVideoLM,
    videos: list[np.ndarray],
    prompts: list[str],
    images: list[np.ndarray] | None = None,
) -> dict:
    """Processor inputs for a batch: one chat-formatted prompt per video, left padded."""
    texts = []
    for prompt in prompts:
        content = (
            [{"type": "video"}] + ([{"type": "image"}] if images else []) + [{"type": "text", "text": prompt}]
        )
        messages = [{"role": "user", "content": content}]
        texts.append(tiny.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    kwargs: dict = {"text": texts, "videos": videos, "padding": True, "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    batch = tiny.processor(**kwargs)
    return dict(batch)


def assert_same(result: torch.Tensor, reference: torch.Tensor) -> None:
    """Token-for-token equality, naming the first mismatch (row, column) when there is one."""
    assert result.shape == reference.shape, f"{tuple(result.shape)} != {tuple(reference.shape)}"
    mismatch = (result != reference).nonzero()
    assert mismatch.numel() == 0, f"first mismatch (row, col): {mismatch[0].tolist()}"
