"""The Hugging Face glue: which architectures StD supports and how to address their inputs.

Everything model-specific lives here: detecting the architecture from the config, the ids of the
visual placeholder tokens, and the RoPE positions of decode steps. Qwen-VL models use M-RoPE, whose
position ids are ``[3, B, q]`` (temporal, height, width); a generated token has the same value in all
three, the last prompt position + 1 + its index (``rope_deltas`` folded in), never its slot in a
compacted cache. LLaVA-OneVision's Qwen2 language model uses 1-D positions ``[B, q]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from std_core.config import SUPPORTED_ARCHITECTURES

_MROPE = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


class UnsupportedModelError(ValueError):
    """The model is not one of :data:`SUPPORTED_ARCHITECTURES`."""


@dataclass(frozen=True)
class ModelSpec:
    """What the decoder needs to know about a supported model."""

    arch: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    video_token_id: int
    image_token_id: int | None

    @property
    def groups(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def visual_token_ids(self) -> tuple[int, ...]:
        return tuple(t for t in (self.video_token_id, self.image_token_id) if t is not None)

    @property
    def mrope(self) -> bool:
        return self.arch in _MROPE


def inspect_model(model: torch.nn.Module) -> ModelSpec:
    """The :class:`ModelSpec` of a loaded ``...ForConditionalGeneration``; raises for other models."""
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"StD supports {', '.join(SUPPORTED_ARCHITECTURES)} (…ForConditionalGeneration models); "
            f"got {type(model).__name__} with model_type={arch!r}"
        )
    text = config.text_config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return ModelSpec(
        arch=arch,
        num_layers=text.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        max_positions=text.max_position_embeddings,
        video_token_id=config.video_token_id,
        image_token_id=getattr(config, "image_token_id", None),
    )


def next_positions(spec: ModelSpec, prompt_position_ids: torch.Tensor) -> torch.Tensor:
    """``[R, B]``: the RoPE position of the first generated token of each row (R = 3 for M-RoPE).

    ``prompt_position_ids`` are the positions ``generate`` prepared for the prompt: ``[4, B, L]``
    (a text row, then the three M-RoPE rows) or ``[3, B, L]`` for Qwen-VL, ``[B, L]`` for 1-D RoPE.
    The prompt is left padded, so the last column is every row's last real token.
    """
    if spec.mrope:
        if prompt_position_ids.ndim != 3:
            raise ValueError(
                f"expected M-RoPE position ids [3|4, B, L], got {tuple(prompt_position_ids.shape)}"
            )
        return prompt_position_ids[-3:, :, -1] + 1
    return prompt_position_ids[None, :, -1] + 1


def decode_position_ids(spec: ModelSpec, base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Position ids of a decode forward: ``base [R, B]`` + ``offsets [B, q]`` (index of each token
    among the generated ones). ``[3, B, q]`` for M-RoPE, ``[B, q]`` otherwise."""
    positions = base[:, :, None] + offsets[None]
    return positions if spec.mrope else positions[0]
