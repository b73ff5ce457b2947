"""Processor inputs for many questions about one video, with the video preprocessed once.

``std_core.generate_shared`` prefills a video once for all its questions; it takes, per question, the
processor outputs of that question's full chat prompt, and the video's tensors only from the first.
Running the processor once per question would resize and patch the same frames again for each one,
so :func:`question_inputs` runs it once, on the first question's prompt (frames included), and builds
every other question's token ids from it: the prompt up to the end of the expanded video tokens is the
same for every question, and what follows (the question and the assistant header) is tokenized alone.

That is only valid where tokenizing the text after the video on its own gives the same ids as the
processor gives inside the whole prompt (a special token such as ``<|vision_end|>`` ends the video in
the Qwen templates, so the split falls on a token boundary). It is checked on the first question, whose
ids the processor produced: where the check fails, every question goes through the processor with the
frames, as before (correct, just slower).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.prompts import chat_prompt

_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def processor_kwargs(processor: object) -> dict:
    """Keyword arguments every video processor call of the pipeline passes."""
    if getattr(processor.video_processor, "cap_pixels_per_frame", False) is None:
        return {"cap_pixels_per_frame": True}  # the reference (qwen-vl-utils) behaviour, stated
    return {}


def question_inputs(
    processor: object, frames: np.ndarray, prompts: Sequence[str], device: str | torch.device
) -> list[dict[str, torch.Tensor]]:
    """Processor outputs (batch 1 each) of the full chat prompt of every prompt in ``prompts`` about one
    video ``frames [T, H, W, 3]``: the first with the video's tensors, the rest token ids only."""
    texts = [chat_prompt(processor, prompt) for prompt in prompts]
    first = dict(
        processor(text=[texts[0]], videos=[frames], return_tensors="pt", **processor_kwargs(processor))
    )
    tails = _tails(processor, texts)
    ids = first["input_ids"][0]
    n = len(tails[0]) if tails else 0
    if tails is None or n == 0 or ids[-n:].tolist() != tails[0]:
        return [_on_device(first, device)] + [
            _on_device(dict(processor(text=[t], videos=[frames], return_tensors="pt", **processor_kwargs(processor))), device)
            for t in texts[1:]
        ]  # fmt: skip
    out = [_on_device(first, device)]
    for tail in tails[1:]:
        tail_ids = torch.tensor([tail], dtype=ids.dtype)
        question = {"input_ids": torch.cat([first["input_ids"][:, :-n], tail_ids], dim=1)}
        question["attention_mask"] = torch.ones_like(question["input_ids"])
        if "mm_token_type_ids" in first:
            mm = first["mm_token_type_ids"][:, :-n]
            question["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(tail_ids, dtype=mm.dtype)], dim=1)
        out.append(_on_device(question, device))
    return out


def _tails(processor: object, texts: list[str]) -> list[list[int]] | None:
    """The token ids of each prompt's text after its video placeholder (None: no single placeholder)."""
    placeholder = getattr(processor, "video_token", None)
    if not placeholder or any(text.count(placeholder) != 1 for text in texts):
        return None
    tokenizer = processor.tokenizer
    return [tokenizer(text.split(placeholder, 1)[1], add_special_tokens=False)["input_ids"] for text in texts]


def _on_device(inputs: dict, device: str | torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in inputs.items() if isinstance(value, torch.Tensor)}
