"""Scoring the demo world's three tasks from generated text, plus a small greedy evaluation loop.

Metrics (each a fraction in [0, 1]):
- caption attributes: a caption is split at "then" into one description per shape; each ground-truth
  shape is matched to the first generated description of the same colour.
  - ``caption_colour``: ground-truth shapes whose colour is mentioned;
  - ``caption_shape`` / ``caption_motion``: ground-truth shapes whose matched description names the right
    shape / direction (no match counts as wrong);
  - ``caption_order``: clips whose generated colour sequence equals the ground truth's (same count, same
    order of appearance);
  - ``caption_attributes``: the mean of those four.
- ``qa`` and ``mcq``: the generic metrics of ``pipeline.evaluation`` (``score_qa``: answers equal to the
  ground truth after lower-casing and stripping punctuation; ``score_mcq``: answers whose first standalone
  option letter is the right one), imported from there.

``Tally`` (``pipeline.evaluation.Tally`` plus ``add_caption``) accumulates scores and ``summary()``
returns them as one flat dict; ``evaluate_items`` runs greedy generation over held-out
``world.EvalItem``s and fills a ``Tally``. ``score_caption`` is the caption scorer that
``pipeline.evaluation`` applies to the demo's own held-out clips.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import evaluation
from pipeline.demo import world
from pipeline.evaluation import normalise_answer, score_mcq, score_qa
from pipeline.prompts import chat_prompt

__all__ = ["Tally", "evaluate_items", "normalise_answer", "parse_caption", "score_caption", "score_mcq",
           "score_item", "score_qa"]  # fmt: skip

_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ShapeMention:
    colour: str | None
    shape: str | None
    motion: str | None


def parse_caption(text: str) -> list[ShapeMention]:
    """One mention per "then"-separated clause: its first colour, shape and direction words (or None)."""
    mentions = []
    for clause in re.split(r"\bthen\b", text.lower()):
        words = _WORD.findall(clause)
        if not words:
            continue
        mentions.append(
            ShapeMention(
                colour=next((w for w in words if w in world.COLOURS), None),
                shape=next((w for w in words if w in world.SHAPES), None),
                motion=next((w for w in words if w in world.MOTIONS), None),
            )
        )
    return [m for m in mentions if m.colour or m.shape or m.motion]


def score_caption(generated: str, truth: str) -> dict[str, list[bool]]:
    """Per-shape hits for colour, shape and motion, and one clip-level hit for order."""
    truth_mentions, generated_mentions = parse_caption(truth), parse_caption(generated)
    by_colour: dict[str, ShapeMention] = {}
    for mention in generated_mentions:
        if mention.colour is not None:
            by_colour.setdefault(mention.colour, mention)
    hits: dict[str, list[bool]] = {"colour": [], "shape": [], "motion": []}
    for true in truth_mentions:
        match = by_colour.get(true.colour or "")
        hits["colour"].append(match is not None)
        hits["shape"].append(match is not None and match.shape == true.shape)
        hits["motion"].append(match is not None and match.motion == true.motion)
    hits["order"] = [[m.colour for m in generated_mentions] == [m.colour for m in truth_mentions]]
    return hits


class Tally(evaluation.Tally):
    """:class:`pipeline.evaluation.Tally` that also scores demo-world captions."""

    def add_caption(self, generated: str, truth: str) -> None:
        self.add_scores("caption_", score_caption(generated, truth))


# ---------------------------------------------------------------------------------------------------
# Greedy evaluation of a model on held-out items
# ---------------------------------------------------------------------------------------------------

TASKS = ("caption", "qa", "mcq")


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    processor: object,
    videos: Sequence[np.ndarray],
    prompts: Sequence[str],
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers, one per (video uint8 [T, H, W, 3], prompt) pair; videos of a call share T."""
    texts = [chat_prompt(processor, p) for p in prompts]
    batch = processor(text=texts, videos=list(videos), padding=True, return_tensors="pt").to(model.device)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def score_item(tally: Tally, item: world.EvalItem, answers: dict[str, str]) -> None:
    """Add one item's three generated answers (keyed by task) to ``tally``."""
    tally.add_caption(answers["caption"], item.caption)
    tally.add("qa", [score_qa(answers["qa"], item.qa.reply)])
    tally.add("mcq", [score_mcq(answers["mcq"], item.mcq.answer, len(item.mcq.options))])


def evaluate_items(
    model: torch.nn.Module,
    processor: object,
    items: Sequence[world.EvalItem],
    frames_of: object = world.render_frames,
    clips_per_batch: int = 4,
    progress: object = None,
) -> Tally:
    """Greedy-decode every task of every item and score it.

    ``frames_of(clip) -> uint8 [T, H, W, 3]`` supplies the model's frames (e.g. all rendered frames, or
    the pipeline's sample of an H.264 round trip). Items are batched in order of clip length.
    """
    tally = Tally()
    ordered = sorted(items, key=lambda item: item.clip.num_frames)
    for start in range(0, len(ordered), clips_per_batch):
        chunk = ordered[start : start + clips_per_batch]
        frames = [frames_of(item.clip) for item in chunk]
        videos = [f for f in frames for _ in TASKS]
        prompts = [item.prompts[task] for item in chunk for task in TASKS]
        answers = generate_answers(model, processor, videos, prompts)
        for i, item in enumerate(chunk):
            score_item(tally, item, dict(zip(TASKS, answers[3 * i : 3 * i + 3], strict=True)))
        if progress is not None:
            progress.update(len(chunk))
    return tally
