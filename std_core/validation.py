"""Checks on a ``generate`` call that fail fast, before any heavy work, with a message to act on."""

from __future__ import annotations

import torch

from std_core.models import ModelSpec

_UNSUPPORTED = {
    "num_beams": "beam search",
    "num_return_sequences": "several sequences per prompt",
    "assistant_model": "a separate assistant model",
    "prefill_chunk_size": "chunked prefill",
}


def validate_generate_inputs(
    model: torch.nn.Module, spec: ModelSpec, inputs: dict, max_new_tokens: int | None
) -> None:
    """Raise ``ValueError`` for inputs StD cannot decode (see each message)."""
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError("StD needs `input_ids` [batch, length] as the model's processor returns them")
    for name, what in _UNSUPPORTED.items():
        value = inputs.get(name)
        if value not in (None, 1):
            raise ValueError(f"StD does not support {what} ({name}={value!r})")
    if inputs.get("streamer") is not None:
        raise ValueError("StD does not support a streamer")
    device = model.device
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            raise ValueError(
                f"input `{name}` is on {value.device} but the model is on {device}: move the processor "
                f"outputs with `.to(model.device)` first"
            )
    if not bool((input_ids == spec.video_token_id).any()):
        raise ValueError(
            "no video in the inputs: StD accelerates decoding over visual tokens and needs at least one "
            f"video placeholder token (id {spec.video_token_id}); pass `videos=` to the processor"
        )
    mask = inputs.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("StD needs left padding: build the processor with tokenizer padding_side='left'")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    needed = input_ids.shape[1] + (max_new_tokens or 0)
    if needed > spec.max_positions:
        raise ValueError(
            f"the prompt ({input_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens or 0}) exceeds the "
            f"model's {spec.max_positions} positions: sample fewer frames, lower the resolution or "
            "max_new_tokens"
        )
