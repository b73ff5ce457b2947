"""Benchmark inputs: synthetic prompts with precomputed vision features, or real clips of the demo world.

*Synthetic* inputs (random-weight presets): ``input_ids`` with ``visual_tokens`` video placeholders
between the vision start/end tokens, random text around them, and the vision encoder's output passed as
``mm_encoder_outputs`` (random features), so ``generate`` skips the vision tower and goes straight to
the language model. Qwen models also get ``mm_token_type_ids`` (2 on video tokens) and a
``video_grid_thw`` with t·h·w / merge² = visual tokens, from which ``generate`` computes M-RoPE
positions. Rows are left padded by 0..``padding`` tokens (real batches are padded; with padding, plain
``generate`` attends with an explicit mask, the case ``TRANSFORMERS_SDPA_FORCE_GQA`` is about).

*World* inputs (trained checkpoints): held-out clips of :mod:`pipeline.demo.world` at a chosen length,
each with the caption prompt, through the checkpoint's own processor. :func:`encode_videos` then runs
the vision tower once (timed) and swaps the pixels for its output, exactly as ``generate`` would store
it, so every variant decodes from the same features and no variant's timing holds the vision tower.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from pipeline.bench.presets import PAD_ID, TEXT_TOKEN_START, VIDEO_ID, VISION_END_ID, VISION_START_ID

_MERGE = 2  # Qwen's spatial merge: one language-model token per 2 x 2 patches
_TOKENS_PER_FRAME = 256  # merged tokens per temporal patch when visual_tokens allows (448 x 448 frames)
_TEXT_BEFORE_VIDEO = 4


@dataclass(frozen=True)
class SyntheticSpec:
    """One synthetic batch: ``batch`` rows of ``visual_tokens`` video tokens and ``text_tokens`` text."""

    visual_tokens: int
    batch: int
    text_tokens: int = 32
    padding: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.visual_tokens < 1 or self.batch < 1:
            raise ValueError("visual_tokens and batch must be >= 1")
        if not 0 <= self.padding < self.text_tokens - _TEXT_BEFORE_VIDEO:
            raise ValueError(f"padding must be in [0, text_tokens - {_TEXT_BEFORE_VIDEO})")


def video_grid(visual_tokens: int) -> tuple[int, int, int]:
    """A Qwen ``(t, h, w)`` patch grid with ``t * h * w / merge**2 == visual_tokens``."""
    per_frame = math.gcd(visual_tokens, _TOKENS_PER_FRAME)
    side = max(d for d in range(1, math.isqrt(per_frame) + 1) if per_frame % d == 0)
    return visual_tokens // per_frame, _MERGE * side, _MERGE * (per_frame // side)


def synthetic_inputs(model: torch.nn.Module, spec: SyntheticSpec) -> dict:
    """``generate`` keyword arguments for ``spec`` on ``model``'s device (see the module docstring)."""
    generator = torch.Generator().manual_seed(spec.seed)
    config = model.config
    vocab = config.text_config.vocab_size
    pads = [round(spec.padding * b / (spec.batch - 1)) if spec.batch > 1 else 0 for b in range(spec.batch)]
    rows = []
    for pad in pads:
        text = torch.randint(TEXT_TOKEN_START, vocab, (spec.text_tokens - pad,), generator=generator).tolist()
        video = [VISION_START_ID] + [VIDEO_ID] * spec.visual_tokens + [VISION_END_ID]
        rows.append([PAD_ID] * pad + text[:_TEXT_BEFORE_VIDEO] + video + text[_TEXT_BEFORE_VIDEO:])
    input_ids = torch.tensor(rows)  # [B, text_tokens + visual_tokens + 2], left padded
    attention_mask = (torch.arange(input_ids.shape[1])[None] >= torch.tensor(pads)[:, None]).long()
    hidden = config.text_config.hidden_size
    features = torch.randn(spec.batch, spec.visual_tokens, hidden, generator=generator)
    inputs: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
    if config.model_type == "llava_onevision":
        inputs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=features)}
    else:
        inputs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=tuple(features))}
        inputs["mm_token_type_ids"] = (input_ids == VIDEO_ID).long() * 2
        inputs["video_grid_thw"] = torch.tensor([video_grid(spec.visual_tokens)] * spec.batch)
    return to_device(inputs, model.device, model.dtype)


def to_device(inputs: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors (and vision features, in the model's dtype) moved to ``device``."""
    out = {}
    for key, value in inputs.items():
        if key == "mm_encoder_outputs":
            out[key] = {m: _features_to(v, device, dtype) for m, v in value.items()}
        elif isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        else:
            out[key] = value
    return out


def _features_to(output: BaseModelOutputWithPooling, device: torch.device, dtype: torch.dtype):
    pooled = output.pooler_output
    if isinstance(pooled, tuple):
        pooled = tuple(p.to(device, dtype) for p in pooled)
    else:
        pooled = pooled.to(device, dtype)
    return BaseModelOutputWithPooling(pooler_output=pooled)


def fresh(inputs: dict) -> dict:
    """A per-call copy of ``inputs``: ``generate`` may add keys to the dicts it is given."""
    out = dict(inputs)
    if "mm_encoder_outputs" in out:
        out["mm_encoder_outputs"] = dict(out["mm_encoder_outputs"])
    return out


@dataclass(frozen=True)
class WorldSpec:
    """One batch of held-out demo-world clips of ``frames`` frames, each with the caption prompt."""

    frames: int
    batch: int
    seed: int = 0


def world_inputs(model: torch.nn.Module, processor: object, spec: WorldSpec) -> dict:
    """Processor inputs (left padded, on the model's device) for ``spec``'s clips and caption prompts."""
    from pipeline.demo import world
    from pipeline.prompts import CAPTION_PROMPT, chat_prompt

    seeds = world.heldout_seeds(spec.batch, offset=spec.seed * 1000)
    videos = [world.render_frames(world.make_clip(seed, spec.frames)) for seed in seeds]
    texts = [chat_prompt(processor, CAPTION_PROMPT)] * spec.batch
    batch = processor(text=texts, videos=videos, padding=True, return_tensors="pt")
    return {key: value.to(model.device) for key, value in batch.items()}


def encode_videos(model: torch.nn.Module, inputs: dict) -> tuple[dict, float]:
    """Run the vision tower on ``inputs``' videos once: inputs with ``mm_encoder_outputs`` instead of
    ``pixel_values_videos`` (what ``generate`` computes before its prefill), and the seconds it took."""
    encoder = model.base_model.get_video_features
    names = inspect.signature(encoder).parameters
    kwargs = {key: inputs[key] for key in names if key in inputs}
    _synchronize(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        features = encoder(**kwargs, return_dict=True)
    _synchronize(model.device)
    seconds = time.perf_counter() - start
    out = {key: value for key, value in inputs.items() if key != "pixel_values_videos"}
    out["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=features.pooler_output)}
    return out, seconds


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
