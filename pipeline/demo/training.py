"""Train the demo Video-LLM from scratch on the procedural world: ``python -m jobs.train_demo_model``.

Reproducible: step ``k``'s batch is a pure function of ``(seed, k)`` (training clip seeds
``seed * 10**8 + k * clips_per_step + i``, below the held-out seeds), torch is seeded, and torch runs on
``--threads`` threads; a background thread builds the next batch while the current step computes.

One training sequence packs one clip with several turns (the caption, QA pairs and MCQ items, in random
order), so the vision tower and the visual tokens are paid once for several supervised answers; the loss
covers the assistant answers only.

Before the video steps, ``--drill-steps`` text-only steps drill the MCQ letter copy (:func:`drill`), the
curriculum's first phase.

The model sees what the pipeline feeds it: ``n`` frames picked from a clip (32-256 frames) at segment
centres (``frames.segment_centres``, the pipeline's rule). ``n`` follows a curriculum: 8 frames (the
pipeline's default) for the first ``--short-fraction`` of the steps, then a mix of 8 to 256 frames (the
long inputs are what the StD benchmark measures). The batch shrinks as ``n`` grows so every step sees
about the same number of visual tokens.

Logged: loss and learning rate, and every ``--eval-every`` steps the teacher-forced held-out exact-match
rate per task (equal to greedy exact match) and the share of the captions' colour, shape and motion words
predicted right (which attribute is learned, before whole captions are). At the end, the model is saved with its processor, greedy-
evaluated on ``--final-eval-clips`` held-out clips that went through H.264, once per frame count in
``--final-eval-frames``, and its card (README.md) is written. :func:`train_demo_model` is the whole run;
``jobs/train_demo_model.py`` maps its flags one-to-one onto :class:`TrainConfig` and prints the summary
as its last stdout line (one JSON object). Progress is logged (``logging``) and shown as tqdm bars.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads collapse throughput.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from pipeline.config import flag  # noqa: E402
from pipeline.demo import builders, scoring, world  # noqa: E402
from pipeline.demo.card import machine, model_card  # noqa: E402
from pipeline.demo.model_dir import default_model_dir  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.frames import segment_centres  # noqa: E402
from pipeline.prompts import CAPTION_PROMPT, chat_prompt, user_message  # noqa: E402

log = logging.getLogger(__name__)

IGNORE = -100
FRAME_COUNTS = (8, 16, 32, 64, 128, 256)  # frames per training input after the 8-frame phase
FRAME_WEIGHTS = (0.5, 0.2, 0.15, 0.1, 0.03, 0.02)
QA_TURNS, MCQ_TURNS = 5, 3  # per training sequence, besides the caption


@dataclass(frozen=True)
class TrainConfig:
    """One field per ``jobs.train_demo_model`` flag (``jobs/_cli.py`` reads each field's metadata)."""

    steps: int = flag(3100, "optimizer steps on video clips (after the drill)")
    clips_per_step: int = flag(8, "batch size at 8 frames (halves each time the frame count doubles, >= 1)")
    lr: float = flag(1e-3, "peak learning rate (AdamW)")
    warmup: int = flag(300, "linear warm-up steps")
    weight_decay: float = flag(0.01, "AdamW weight decay")
    seed: int = flag(0, "seeds torch and the training clips (0-9)")
    device: Literal["cpu", "cuda"] = flag("cpu", "where the model trains")
    threads: int = flag(2, "torch CPU threads")
    short_fraction: float = flag(0.4, "share of 8-frame-only steps")
    single_shape_fraction: float = flag(
        0.0, "share of the first steps that see one shape per clip (a curriculum)"
    )
    aux_weight: float = flag(
        1.0, "weight of a training-only loss on the visual tokens (each token's shape and motion)"
    )
    drill_steps: int = flag(
        800, "text-only MCQ letter-copy steps before the video steps (a curriculum; 0: none)"
    )
    drill_batch: int = flag(64, "MCQ items per drill step")
    eval_every: int = flag(500, "steps between held-out checks")
    final_eval_clips: int = flag(300, "0 skips the final eval")
    final_eval_frames: tuple[int, ...] = flag(
        (8, 32), "frame counts the final evaluation feeds the model (8 is the pipeline's default)"
    )
    output: str = flag(
        str(default_model_dir()), "model directory to write (the committed demo model by default)"
    )
    force: bool = flag(False, "overwrite existing weights in --output")
    dry_run: bool = flag(
        False, "plan only: check --output / --force and print the run's settings; train nothing"
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.clips_per_step < 1 or self.warmup < 0:
            raise ValueError("steps and clips_per_step must be >= 1, warmup >= 0")
        if self.drill_steps < 0 or self.drill_batch < 1:
            raise ValueError("drill_steps must be >= 0 and drill_batch >= 1")
        if not 0 <= self.seed < 10:
            raise ValueError(
                "seed must be in 0..9 (training seeds are seed * 10**8 + i, below held-out seeds)"
            )
        fractions = (self.short_fraction, self.single_shape_fraction)
        if not all(0 <= f <= 1 for f in fractions) or any(n < 2 for n in self.final_eval_frames):
            raise ValueError(
                "short_fraction and single_shape_fraction must be in [0, 1], final_eval_frames >= 2"
            )


# ---------------------------------------------------------------------------------------------------
# Training sequences
# ---------------------------------------------------------------------------------------------------


def conversation(clip: world.Clip, rng: np.random.Generator) -> list[dict]:
    """The caption, QA pairs and MCQ items about ``clip`` as chat turns in random order (video first)."""
    pairs, items = world.qa_pairs(clip), world.mcq_items(clip)  # items[i] asks pairs[i]'s question
    asked = [int(i) for i in rng.choice(len(pairs), size=min(QA_TURNS, len(pairs)), replace=False)]
    # Half of the MCQ items repeat a QA question, so the option lookup can also be learned from text alone.
    multiple = {asked[j] if rng.random() < 0.5 else int(rng.integers(len(items))) for j in range(MCQ_TURNS)}
    turns = [(CAPTION_PROMPT, world.caption(clip))]
    turns += [(pairs[i].question, pairs[i].reply) for i in asked]
    turns += [(items[i].prompt, items[i].reply) for i in sorted(multiple)]
    messages = []
    for i in rng.permutation(len(turns)):
        question, answer = turns[i]
        messages += [
            user_message(question, with_video=not messages),
            {"role": "assistant", "content": answer},
        ]
    return messages


def answer_labels(input_ids: torch.Tensor, tokenizer: object) -> torch.Tensor:
    """Labels equal to ``input_ids`` [B, L] on assistant answers (through their <|im_end|>), else IGNORE."""
    start, role, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "assistant", "<|im_end|>"])
    labels = torch.full_like(input_ids, IGNORE)
    for b, row in enumerate(input_ids.tolist()):
        inside = False
        for i, token in enumerate(row):
            if inside:
                labels[b, i] = token
                inside = token != end
            elif i >= 2 and row[i - 2] == start and row[i - 1] == role:
                labels[b, i], inside = token, token != end
    return labels


DRILL_SEED_BASE = 10**7  # drill items come from clips seeded below this (no clip is rendered)
DRILL_HELDOUT = 256  # held-out drill items, from clip seeds at and above DRILL_SEED_BASE


def drill_batch(processor: object, rng: np.random.Generator, count: int, heldout: bool = False) -> dict:
    """``count`` text-only MCQ items (one user turn without the video, then its reply, ``"purple D"``) with
    the next-token loss on every token (``labels``), and each row's answer-letter position
    (``letter_at``, for :func:`drill_accuracy`).

    The copy an MCQ answer needs, the letter two tokens before the option that names the answer, is slow
    to learn from the answers alone: the letter's only training signal is the answer itself, so the
    heads that fetch a line's letter into its option text and the head that finds the option must
    appear together. The loss on the prompt's own tokens trains the first on its own (after an option's
    text comes the next letter, which a model can only predict by knowing the previous one). Measured
    from scratch on the demo model's architecture (batch 64): 92% letter accuracy after 800 steps, 73%
    with the loss on the answer letter alone (``MCQItem.reply``); in the committed model's run, 98% after
    its 800 drill steps (its card)."""
    base = DRILL_SEED_BASE if heldout else 0
    texts = []
    for _ in range(count):
        clip = world.make_clip(base + int(rng.integers(DRILL_SEED_BASE)))
        items = world.mcq_items(clip)
        item = items[int(rng.integers(len(items)))]
        turns = [user_message(item.prompt, with_video=False), {"role": "assistant", "content": item.reply}]
        texts.append(processor.apply_chat_template(turns, tokenize=False))
    batch = dict(processor(text=texts, padding=True, return_tensors="pt"))
    answers = answer_labels(batch["input_ids"], processor.tokenizer)
    # the reply ends "<option> <letter>" then <|im_end|>: the letter is the answer's second-to-last token
    last = (answers != IGNORE).cumsum(dim=1).argmax(dim=1)
    batch["letter_at"] = last - 1
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
    return batch


@torch.no_grad()
def drill_accuracy(model: torch.nn.Module, batch: dict, device: str) -> float:
    """Teacher-forced accuracy of the answer letters of a :func:`drill_batch`."""
    model.eval()
    ids, at = batch["input_ids"].to(device), batch["letter_at"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    rows = torch.arange(len(at), device=device)
    model.train()
    return round((logits[rows, at - 1].argmax(-1) == ids[rows, at]).float().mean().item(), 3)


def chroma_subsample(frames: np.ndarray) -> np.ndarray:
    """Approximate yuv420p: average each 2x2 block's chroma (BT.601), keep full-resolution luma."""
    x = frames.astype(np.float32)
    y = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    chroma = x - y[..., None]
    blocks = (chroma[:, ::2, ::2] + chroma[:, 1::2, ::2] + chroma[:, ::2, 1::2] + chroma[:, 1::2, 1::2]) / 4
    chroma = blocks.repeat(2, axis=1).repeat(2, axis=2)
    return np.clip(y[..., None] + chroma + 0.5, 0, 255).astype(np.uint8)


def training_batch(
    processor: object,
    seeds: list[int],
    num_frames: int,
    rng: np.random.Generator,
    single_shape: bool = False,
    with_aux: bool = False,
) -> dict:
    """Processor outputs plus ``labels`` (and, ``with_aux``, the visual tokens' ``aux_labels``): one
    multi-turn sequence per seed, ``num_frames`` frames each."""
    texts, videos, aux = [], [], []
    for seed in seeds:
        clip = world.make_clip(seed)
        if single_shape:  # curriculum: the clip's first shape alone (its script and ground truth follow)
            clip = dataclasses.replace(clip, tracks=clip.tracks[:1])
        picks = segment_centres(clip.num_frames, num_frames)
        frames = world.render_frames(clip, picks)
        if with_aux:
            aux.append(token_labels(clip, picks))
        videos.append(chroma_subsample(frames) if rng.random() < 0.5 else frames)
        texts.append(processor.apply_chat_template(conversation(clip, rng), tokenize=False))
    batch = processor(text=texts, videos=videos, padding=True, return_tensors="pt")
    batch["labels"] = answer_labels(batch["input_ids"], processor.tokenizer)
    if with_aux:
        batch["aux_labels"] = torch.cat(aux)
    return dict(batch)


AUX_MIN_COVER = 1 / 8  # a token is labelled with a shape that covers this share of its 28-px cell
TIME_BINS = 8  # the clip's clock, read into every visual token: 8 bins of 1/8 of the clip (< MIN_GAP)


def token_labels(clip: world.Clip, picks: Sequence[int]) -> torch.Tensor:
    """Per merged visual token, in the processor's order (temporal patch, then row, then column):
    ``[tokens, 3]`` = (shape class, motion class, time bin).

    - Shape and motion: those of the shape covering most of the token's 28-px cell on the patch's first
      frame (at least AUX_MIN_COVER of it), 0 where none does (classes are 1 + the index in SHAPES /
      MOTIONS). Every token a shape covers is labelled, so each of them learns to carry it.
    - Time bin: which TIME_BINS-th of the clip the patch's first frame lies in (the background's clock
      shows it), on every token. A shape's tokens then carry *when* as content, so "the shape that
      appeared first" is a content lookup (the tokens of the lowest bin), where rotary positions alone
      left the language model guessing the order (caption order 51%). Appearances lie MIN_GAP > 1/8 of
      the clip apart, so two shapes' first tokens never share a bin."""
    cell = 2 * 14  # merge 2 x patch 14
    rows, cols = clip.height // cell, clip.width // cell
    groups = (len(picks) + 1) // 2
    yy, xx = np.mgrid[0 : rows * cell, 0 : cols * cell].astype(np.float32)
    labels = torch.zeros(groups, rows, cols, 3, dtype=torch.long)
    for g in range(groups):
        f, best = picks[2 * g], np.full((rows, cols), AUX_MIN_COVER * cell * cell)
        labels[g, ..., 2] = time_bin(f, clip.num_frames)
        for t in clip.tracks:
            if t.appear <= f < t.disappear:
                mask = world.shape_mask(t.shape, *t.centre(f), yy, xx)
                cover = mask.reshape(rows, cell, cols, cell).sum(axis=(1, 3))
                wins = torch.from_numpy(cover >= best)
                labels[g, ..., :2][wins] = torch.tensor(
                    [1 + world.SHAPES.index(t.shape), 1 + world.MOTIONS.index(t.motion)]
                )
                best = np.maximum(best, cover)
    return labels.reshape(-1, 3)


def time_bin(frame: int, num_frames: int) -> int:
    """The TIME_BINS-th of a ``num_frames`` clip that ``frame`` lies in (the clock's progress, binned)."""
    return min(TIME_BINS - 1, int(TIME_BINS * frame / max(1, num_frames - 1)))


class VisualAux(torch.nn.Module):
    """Training-only head on the vision tower's merged tokens: predicts each token's shape and motion
    class and its time bin, so the vision tower learns to encode them where the language model can read
    them. The head is not part of the saved model (a plain Qwen2-VL)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.sizes = (1 + len(world.SHAPES), 1 + len(world.MOTIONS), TIME_BINS)
        self.head = torch.nn.Linear(hidden, sum(self.sizes))
        self.features: torch.Tensor | None = None
        self._tally = torch.zeros(5, dtype=torch.long)
        model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.features = getattr(output, "pooler_output", output)

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """The head's cross-entropy on ``labels`` [tokens, 3] (summed over the three targets); also
        tallies its own accuracy (:meth:`accuracy`: shape and motion on the tokens a shape covers, time
        on all), so a log tells whether the vision side has learned."""
        logits = self.head(self.features).split(self.sizes, dim=-1)
        covered = labels[:, 0] > 0
        with torch.no_grad():
            hits = [part.argmax(-1).eq(labels[:, i]) for i, part in enumerate(logits)]
            counts = [(hits[0] & covered).sum(), (hits[1] & covered).sum(), hits[2].sum(), covered.sum()]
            self._tally += torch.tensor([*map(int, counts), len(labels)])
        return sum(torch.nn.functional.cross_entropy(part, labels[:, i]) for i, part in enumerate(logits))

    def accuracy(self) -> dict[str, float]:
        """Shape and motion accuracy on covered tokens, time-bin accuracy on all tokens, since the last
        call (training batches)."""
        shape, motion, time_hits, covered, tokens = self._tally.tolist()
        self._tally.zero_()
        return {
            "aux_shape": round(shape / max(covered, 1), 3),
            "aux_motion": round(motion / max(covered, 1), 3),
            "aux_time": round(time_hits / max(tokens, 1), 3),
        }


def frame_count(step: int, cfg: TrainConfig, rng: np.random.Generator) -> int:
    """8 frames for the first ``short_fraction`` of the steps, then a mix of FRAME_COUNTS."""
    if step < cfg.short_fraction * cfg.steps:
        return FRAME_COUNTS[0]
    return int(rng.choice(FRAME_COUNTS, p=FRAME_WEIGHTS))


def step_batch(processor: object, cfg: TrainConfig, step: int) -> tuple[int, dict]:
    """(frames per clip, batch) of training step ``step``: a pure function of ``cfg.seed`` and ``step``."""
    rng = np.random.default_rng([cfg.seed, step])
    num_frames = frame_count(step, cfg, rng)
    count = max(1, cfg.clips_per_step * FRAME_COUNTS[0] // num_frames)
    first = cfg.seed * 10**8 + step * cfg.clips_per_step
    single = step < cfg.single_shape_fraction * cfg.steps
    seeds = list(range(first, first + count))
    return num_frames, training_batch(processor, seeds, num_frames, rng, single, with_aux=cfg.aux_weight > 0)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to a tenth of it."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------
# Held-out monitoring (teacher forced)
# ---------------------------------------------------------------------------------------------------


def monitor_batches(
    processor: object, seeds: list[int], frame_counts: tuple[int, ...]
) -> list[tuple[str, dict]]:
    """Single-turn held-out sequences per task (the inference layout), as (name, batch) pairs."""
    batches = []
    items = [world.eval_item(s) for s in seeds]
    for count in frame_counts:
        videos = [world.render_frames(i.clip, segment_centres(i.clip.num_frames, count)) for i in items]
        answers = {"caption": [i.caption for i in items], "qa": [i.qa.reply for i in items]}
        answers["mcq"] = [i.mcq.reply for i in items]
        for task in scoring.TASKS:
            texts = [
                chat_prompt(processor, item.prompts[task]) + answer + "<|im_end|>"
                for item, answer in zip(items, answers[task], strict=True)
            ]
            batch = processor(text=texts, videos=videos, padding=True, return_tensors="pt")
            batch["labels"] = answer_labels(batch["input_ids"], processor.tokenizer)
            batches.append((f"{task}@{count}f", dict(batch)))
    return batches


def attribute_ids(tokenizer: object) -> dict[str, torch.Tensor]:
    """Token ids of each caption attribute's words (colour, shape, motion), for :func:`monitor`."""
    words = {"colour": list(world.COLOURS), "shape": list(world.SHAPES), "motion": list(world.MOTIONS)}
    return {k: torch.tensor(tokenizer.convert_tokens_to_ids(v)) for k, v in words.items()}


@torch.no_grad()
def monitor(
    model: torch.nn.Module,
    batches: list[tuple[str, dict]],
    device: str,
    attributes: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Exact-match rate of the argmax answer under teacher forcing, per task and frame count; with
    ``attributes``, also the argmax accuracy on each attribute's words in the captions
    (``caption@8f:shape``: the caption tokens that name a shape, predicted right)."""
    model.eval()
    out = {}
    for name, batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"][:, 1:]
        hit = logits[:, :-1].argmax(-1) == labels
        out[name] = round((hit | (labels == IGNORE)).all(dim=1).float().mean().item(), 3)
        for attribute, ids in (attributes or {}).items() if name.startswith("caption") else ():
            where = torch.isin(labels, ids.to(device))
            out[f"{name}:{attribute}"] = round(hit[where].float().mean().item(), 3)
    model.train()
    return out


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    lr: float,
    device: str,
    aux: VisualAux | None = None,
    aux_weight: float = 0.0,
) -> float:
    """One AdamW step on ``batch`` at learning rate ``lr`` (gradients clipped to norm 1); returns the
    language-model loss (the auxiliary loss, where weighted in, is added to what is optimised only)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    batch = {k: v.to(device) for k, v in batch.items()}
    aux_labels = batch.pop("aux_labels", None)
    loss = model(**batch).loss
    total = loss + aux_weight * aux.loss(aux_labels) if aux is not None and aux_weight else loss
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train(cfg: TrainConfig, model: torch.nn.Module, processor: object) -> list[dict]:
    """Run ``cfg.steps`` optimizer steps in place on ``model``; return the log records."""
    aux = VisualAux(model).to(cfg.device) if cfg.aux_weight else None
    params = list(model.parameters()) + (list(aux.parameters()) if aux is not None else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    watch = monitor_batches(processor, world.heldout_seeds(32, offset=900_000), (8, 32))
    attributes = attribute_ids(processor.tokenizer)
    records, smoothed = [], None
    model.train()
    if cfg.drill_steps:
        records.append(drill(cfg, model, optimizer, processor))
        log.info("%s", json.dumps(records[-1]))
    bar = tqdm(range(cfg.steps), desc="train", mininterval=5, file=sys.stderr)
    # builds step k + 1 while step k computes; log lines go through tqdm.write, beside the bar
    with ThreadPoolExecutor(max_workers=1) as prefetch, logging_redirect_tqdm():
        upcoming = prefetch.submit(step_batch, processor, cfg, 0)
        for step in bar:
            num_frames, batch = upcoming.result()
            if step + 1 < cfg.steps:
                upcoming = prefetch.submit(step_batch, processor, cfg, step + 1)
            lr = learning_rate(step, cfg)
            loss = optimizer_step(model, optimizer, batch, lr, cfg.device, aux, cfg.aux_weight)
            smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
            bar.set_postfix(loss=f"{smoothed:.3f}", frames=num_frames)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                record = {"step": step + 1, "loss": round(smoothed, 4), "lr": learning_rate(step, cfg)}
                record["heldout_teacher_forced"] = monitor(model, watch, cfg.device, attributes)
                if aux is not None:
                    record["training_aux"] = aux.accuracy()
                records.append(record)
                log.info("%s", json.dumps(record))
    return records


def drill(
    cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, processor: object
) -> dict:
    """The curriculum's first phase: ``cfg.drill_steps`` text-only MCQ steps (:func:`drill_batch`) at
    ``cfg.lr`` after a 100-step warm-up; returns its log record (held-out letter accuracy before and
    after)."""
    started = time.time()
    held = drill_batch(processor, np.random.default_rng([cfg.seed, 1]), DRILL_HELDOUT, heldout=True)
    before = drill_accuracy(model, held, cfg.device)
    for step in tqdm(range(cfg.drill_steps), desc="drill", mininterval=5, file=sys.stderr):
        batch = drill_batch(processor, np.random.default_rng([cfg.seed, 2, step]), cfg.drill_batch)
        batch.pop("letter_at")
        loss = optimizer_step(model, optimizer, batch, cfg.lr * min(1.0, (step + 1) / 100), cfg.device)
    return {
        "drill_steps": cfg.drill_steps,
        "drill_loss": round(loss, 4),
        "drill_letter_accuracy": {"before": before, "after": drill_accuracy(model, held, cfg.device)},
        "drill_seconds": round(time.time() - started, 1),
    }


def final_eval(cfg: TrainConfig, model: torch.nn.Module, processor: object) -> dict[str, dict[str, float]]:
    """Greedy accuracy on held-out clips (H.264 round trip), per frame count the model is given."""
    items = [world.eval_item(s) for s in world.heldout_seeds(cfg.final_eval_clips)]
    model.eval()
    results = {}
    for count in cfg.final_eval_frames:

        def frames_of(clip: world.Clip, count: int = count) -> np.ndarray:
            return world.sample_frames(world.codec_roundtrip(world.render_frames(clip)), count)

        with (
            tqdm(total=len(items), desc=f"eval {count} frames", mininterval=5, file=sys.stderr) as bar,
            logging_redirect_tqdm(),
        ):
            tally = scoring.evaluate_items(
                model, processor, items, frames_of, clips_per_batch=8, progress=bar
            )
        results[f"{count}_frames"] = {k: round(v, 4) for k, v in tally.summary().items()}
        log.info("%s", json.dumps({f"final_eval_{count}_frames": results[f"{count}_frames"]}))
    return results


def train_demo_model(cfg: TrainConfig, command: str) -> dict:
    """The whole run: train from scratch, save the model directory and its card, run the final
    evaluation. Returns the summary (``command``: how the run was started, for the card). Refuses,
    with a PipelineError, to overwrite weights in ``cfg.output`` unless ``cfg.force``."""
    out = Path(cfg.output)
    if (out / "model.safetensors").exists() and not cfg.force:
        raise PipelineError(f"{out / 'model.safetensors'} exists: refusing to overwrite it without --force")
    if cfg.dry_run:
        return {
            "status": "planned",
            "dry_run": True,
            "output": str(out),
            "command": command,
            "config": asdict(cfg),
        }
    started = time.time()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    processor = builders.build_processor()
    spec = builders.DemoModelSpec()
    model = Qwen2VLForConditionalGeneration(builders.build_config(processor.tokenizer, spec)).to(cfg.device)
    records = train(cfg, model, processor)
    train_seconds, load = time.time() - started, round(os.getloadavg()[2], 1)
    sha256 = builders.save_model_dir(out, model.cpu(), processor)
    accuracy = final_eval(cfg, model, processor) if cfg.final_eval_clips else {}
    summary = {
        "output": str(out),
        "command": command,
        "sha256": sha256,
        "parameters": builders.parameter_count(model),
        "weights_mb": round((out / "model.safetensors").stat().st_size / 1e6, 2),
        "accuracy": accuracy,
        "final_eval_clips": cfg.final_eval_clips,
        "train_seconds": round(train_seconds),
        "total_seconds": round(time.time() - started),
        "load_average": load,
        "machine": f"{machine()}, torch threads {cfg.threads}",
        "config": asdict(cfg),
        "spec": asdict(spec),
        "log": records,
    }
    (out / "README.md").write_text(model_card(summary))
    return {k: v for k, v in summary.items() if k not in ("log", "spec")}
