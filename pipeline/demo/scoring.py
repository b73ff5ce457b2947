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
- ``qa``: answers equal to the ground truth after lower-casing and stripping punctuation.
- ``mcq``: answers whose first standalone option letter (``prompts.parse_mcq_answer``) is the right one.

``Tally`` accumulates scores and ``summary()`` returns them as one flat dict; ``evaluate_items`` runs
greedy generation over held-out ``demo_world.EvalItem``s and fills a ``Tally``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline import demo_world as world
from pipeline.prompts import parse_mcq_answer

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


def normalise_answer(text: str) -> str:
    """Lower-case words only: ``" Red."`` -> ``"red"``."""
    return " ".join(_WORD.findall(text.lower()))


def score_qa(generated: str, truth: str) -> bool:
    return normalise_answer(generated) == normalise_answer(truth)


def score_mcq(generated: str, truth_letter: str, num_options: int) -> bool:
    return parse_mcq_answer(generated, num_options) == truth_letter.strip().upper()


@dataclass
class Tally:
    """Running hit lists per metric; ``summary()`` gives the fractions (NaN-free: empty metrics omitted)."""

    hits: dict[str, list[bool]] = field(default_factory=dict)

    def add(self, metric: str, values: Iterable[bool]) -> None:
        self.hits.setdefault(metric, []).extend(bool(v) for v in values)

    def add_caption(self, generated: str, truth: str) -> None:
        for name, values in score_caption(generated, truth).items():
            self.add(f"caption_{name}", values)

    def summary(self) -> dict[str, float]:
        out = {name: float(np.mean(v)) for name, v in sorted(self.hits.items()) if v}
        parts = [out[f"caption_{a}"] for a in ("colour", "shape", "motion", "order") if f"caption_{a}" in out]
        if parts:
            out["caption_attributes"] = float(np.mean(parts))
        return out


# ---------------------------------------------------------------------------------------------------
# Greedy evaluation of a model on held-out items
# ---------------------------------------------------------------------------------------------------

TASKS = ("caption", "qa", "mcq")


def chat_prompt(processor: object, prompt: str) -> str:
    """The chat-template text of one user turn holding the video and ``prompt``, ready for generation."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


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
    tally.add("qa", [score_qa(answers["qa"], item.qa.answer)])
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
