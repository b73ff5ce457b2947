"""Many questions, one video: the token ids built with the video preprocessed once equal the processor's
own for each question's whole prompt, on the demo model's processor and on every architecture's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from pipeline import default_model_dir
from pipeline.prompts import chat_prompt
from pipeline.questions import processor_kwargs, question_inputs
from tests import tiny_models as tm

QUESTIONS = ["What colour is the first shape?", "How many shapes appear?", "Describe the video."]


def _check(processor: object, frames: np.ndarray) -> list[dict]:
    built = question_inputs(processor, frames, QUESTIONS, "cpu")
    assert len(built) == len(QUESTIONS)
    for question, inputs in zip(QUESTIONS, built, strict=True):
        full = processor(text=[chat_prompt(processor, question)], videos=[frames], return_tensors="pt",
                         **processor_kwargs(processor))  # fmt: skip
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in full:
                assert torch.equal(inputs[key], full[key]), (question, key)
    return built


def test_the_demo_processor_preprocesses_the_video_once() -> None:
    built = _check(AutoProcessor.from_pretrained(default_model_dir()), np.zeros((8, 168, 168, 3), np.uint8))
    assert "pixel_values_videos" in built[0]
    assert all("pixel_values_videos" not in b for b in built[1:])  # the fast path, not the fallback
    assert len({b["input_ids"].shape[1] for b in built}) > 1  # different suffixes: the check can fail


@pytest.mark.parametrize("arch", tm.ARCHITECTURES)
def test_every_architecture_gets_its_processors_ids(arch: str) -> None:
    tiny = tm.build(arch)
    _check(tiny.processor, tm.random_video(4, 32, 32, seed=1))
