"""Train the demo Video-LLM from scratch on the procedural world: ``python -m jobs.train_demo_model``.

Reproducible: step ``k``'s batch is a pure function of ``(seed, k)`` (training clip seeds
``seed * 10**8 + k * clips_per_step + i``, below the held-out seeds), torch is seeded, and torch runs on
``--threads`` threads; a background thread builds the next batch while the current step computes.

One training sequence packs one clip with several turns (the caption, QA pairs and MCQ items, in random
order), so the vision tower and the visual tokens are paid once for several supervised answers; the loss
covers the assistant answers only.

The model sees what the pipeline feeds it: ``n`` frames picked from a clip (32-256 frames) at segment
centres (``demo_world.segment_centres``, the pipeline's rule). ``n`` follows a curriculum: 8 frames (the
pipeline's default) for the first ``--short-fraction`` of the steps, then a mix of 8 to 256 frames (the
long inputs are what the StD benchmark measures). The batch shrinks as ``n`` grows so every step sees
about the same number of visual tokens.

Logged: loss and learning rate, and every ``--eval-every`` steps the teacher-forced held-out exact-match
rate per task (equal to greedy exact match). At the end, the model is saved with its processor, greedy-
evaluated on ``--final-eval-clips`` held-out clips that went through H.264, once per frame count in
``--final-eval-frames``, and its card (README.md) is written. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared CPU, spinning threads collapse throughput.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import Qwen2VLForConditionalGeneration  # noqa: E402

from pipeline import demo_eval, demo_model  # noqa: E402
from pipeline import demo_world as world  # noqa: E402
from pipeline.prompts import CAPTION_PROMPT  # noqa: E402

IGNORE = -100
FRAME_COUNTS = (8, 16, 32, 64, 128, 256)  # frames per training input after the 8-frame phase
FRAME_WEIGHTS = (0.5, 0.2, 0.15, 0.1, 0.03, 0.02)
QA_TURNS, MCQ_TURNS = 3, 2  # per training sequence, besides the caption


@dataclass(frozen=True)
class TrainConfig:
    """One field per flag (see ``parse_args`` for each one's meaning)."""

    steps: int = 3000
    clips_per_step: int = 8  # at 8 frames; halves each time the frame count doubles (at least 1)
    lr: float = 5e-4
    warmup: int = 300
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "cpu"
    threads: int = 2
    short_fraction: float = 0.3  # the first part of training sees only 8-frame inputs
    single_shape_fraction: float = 0.0  # the first part of training sees one shape per clip
    aux_weight: float = 0.0  # weight of the visual-token auxiliary loss (0: the language-model loss only)
    eval_every: int = 250
    final_eval_clips: int = 300
    final_eval_frames: tuple[int, ...] = (8, 32)
    output: str = str(demo_model.default_model_dir())
    force: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.clips_per_step < 1 or self.warmup < 0:
            raise ValueError("steps and clips_per_step must be >= 1, warmup >= 0")
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
    turns += [(pairs[i].question, pairs[i].answer) for i in asked]
    turns += [(items[i].prompt, items[i].answer) for i in sorted(multiple)]
    messages = []
    for i in rng.permutation(len(turns)):
        content = [{"type": "text", "text": turns[i][0]}]
        if not messages:
            content.insert(0, {"type": "video"})
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": turns[i][1]}]
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
        picks = world.segment_centres(clip.num_frames, num_frames)
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


def token_labels(clip: world.Clip, picks: Sequence[int]) -> torch.Tensor:
    """Per merged visual token, in the processor's order (temporal patch, then row, then column):
    ``[tokens, 2]`` = (shape class, motion class) of the shape whose centre lies in the token's 28-px
    cell on the patch's first frame, 0 where none does (classes are 1 + the index in SHAPES / MOTIONS)."""
    cell = 2 * 14  # merge 2 x patch 14
    rows, cols = clip.height // cell, clip.width // cell
    groups = (len(picks) + 1) // 2
    labels = torch.zeros(groups, rows, cols, 2, dtype=torch.long)
    for g in range(groups):
        f = picks[2 * g]
        for t in clip.tracks:
            if t.appear <= f < t.disappear:
                cx, cy = t.centre(f)
                r, c = min(rows - 1, int(cy // cell)), min(cols - 1, int(cx // cell))
                labels[g, r, c] = torch.tensor(
                    [1 + world.SHAPES.index(t.shape), 1 + world.MOTIONS.index(t.motion)]
                )
    return labels.reshape(-1, 2)


class VisualAux(torch.nn.Module):
    """Training-only head on the vision tower's merged tokens: predicts each token's shape and motion
    class, so the vision tower learns to encode them where the language model can read them. The head
    is not part of the saved model (a plain Qwen2-VL)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        hidden = model.config.text_config.hidden_size
        self.head = torch.nn.Linear(hidden, 1 + len(world.SHAPES) + 1 + len(world.MOTIONS))
        self.features: torch.Tensor | None = None
        model.model.visual.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.features = getattr(output, "pooler_output", output)

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features)
        shapes = 1 + len(world.SHAPES)
        return torch.nn.functional.cross_entropy(logits[:, :shapes], labels[:, 0]) + (
            torch.nn.functional.cross_entropy(logits[:, shapes:], labels[:, 1])
        )


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
        videos = [world.render_frames(i.clip, world.segment_centres(i.clip.num_frames, count)) for i in items]
        answers = {"caption": [i.caption for i in items], "qa": [i.qa.answer for i in items]}
        answers["mcq"] = [i.mcq.answer for i in items]
        for task in demo_eval.TASKS:
            texts = [
                demo_eval.chat_prompt(processor, item.prompts[task]) + answer + "<|im_end|>"
                for item, answer in zip(items, answers[task], strict=True)
            ]
            batch = processor(text=texts, videos=videos, padding=True, return_tensors="pt")
            batch["labels"] = answer_labels(batch["input_ids"], processor.tokenizer)
            batches.append((f"{task}@{count}f", dict(batch)))
    return batches


@torch.no_grad()
def monitor(model: torch.nn.Module, batches: list[tuple[str, dict]], device: str) -> dict[str, float]:
    """Exact-match rate of the argmax answer under teacher forcing, per task and frame count."""
    model.eval()
    out = {}
    for name, batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"][:, 1:]
        right = (logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE)
        out[name] = round(right.all(dim=1).float().mean().item(), 3)
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
    watch = monitor_batches(processor, world.heldout_seeds(16, offset=900_000), (8, 64))
    log, smoothed = [], None
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", mininterval=5, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=1) as prefetch:  # builds step k + 1 while step k computes
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
                record["heldout_teacher_forced"] = monitor(model, watch, cfg.device)
                log.append(record)
                tqdm.write(json.dumps(record), file=sys.stderr)
    return log


def final_eval(cfg: TrainConfig, model: torch.nn.Module, processor: object) -> dict[str, dict[str, float]]:
    """Greedy accuracy on held-out clips (H.264 round trip), per frame count the model is given."""
    items = [world.eval_item(s) for s in world.heldout_seeds(cfg.final_eval_clips)]
    model.eval()
    results = {}
    for count in cfg.final_eval_frames:

        def frames_of(clip: world.Clip, count: int = count) -> np.ndarray:
            return world.sample_frames(world.codec_roundtrip(world.render_frames(clip)), count)

        with tqdm(total=len(items), desc=f"eval {count} frames", mininterval=5, file=sys.stderr) as bar:
            tally = demo_eval.evaluate_items(
                model, processor, items, frames_of, clips_per_batch=8, progress=bar
            )
        results[f"{count}_frames"] = {k: round(v, 4) for k, v in tally.summary().items()}
        tqdm.write(json.dumps({f"final_eval_{count}_frames": results[f"{count}_frames"]}), file=sys.stderr)
    return results


def model_card(s: dict) -> str:
    """The model card (README.md) of a finished run, from its summary."""
    acc = s["accuracy"]  # {"8_frames": {metric: value}, ...}
    metrics = sorted({m for scores in acc.values() for m in scores})
    rows = [
        "| metric | " + " | ".join(f"{k.split('_')[0]} frames" for k in acc) + " |",
        "|---|" + "---|" * len(acc),
    ]
    rows += [
        f"| {m} | " + " | ".join(f"{100 * acc[k].get(m, math.nan):.1f}%" for k in acc) + " |" for m in metrics
    ]
    log = [f"| {r['step']} | {r['loss']:.3f} | {json.dumps(r['heldout_teacher_forced'])} |" for r in s["log"]]
    spec = s["spec"]
    return "\n".join(
        [
            "# demo-video-qwen2-vl: the embedded demo model of std-video-annotate",
            "",
            "A tiny Qwen2-VL (`Qwen2VLForConditionalGeneration`) trained from scratch on the procedural world",
            "of `pipeline/demo_world.py` (coloured shapes that appear, move and disappear). It captions clips",
            "and answers the world's questions; it knows nothing else. Load it offline like any Qwen2-VL:",
            "",
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "from pipeline import default_model_dir",
            "",
            "processor = AutoProcessor.from_pretrained(default_model_dir())",
            "model = AutoModelForImageTextToText.from_pretrained(default_model_dir())",
            "```",
            "",
            "## Architecture",
            f"- language model: hidden {spec['text_hidden']}, {spec['text_layers']} layers, {spec['text_heads']}"
            f" query heads / {spec['text_kv_heads']} KV heads (GQA), MLP {spec['text_intermediate']}, M-RoPE,"
            " tied embeddings, word-level vocabulary of the world with Qwen2-VL's special tokens;",
            f"- vision tower: width {spec['vision_dim']}, {spec['vision_depth']} blocks, patch 14, temporal patch"
            " 2, 2x2 merge;",
            f"- {s['parameters']:,} parameters, model.safetensors {s['weights_mb']} MB (fp32);",
            "- frames: 168x168 kept as they are, 36 visual tokens per 2 frames (8 frames: 144 tokens, 256"
            " frames: 4,608); the processor never re-samples frames.",
            "",
            "## Training",
            f"- command: `{s['command']}`",
            f"- seed {s['config']['seed']}; machine: {s['machine']}",
            f"- wall time: {s['train_seconds'] / 60:.1f} min training, {s['total_seconds'] / 60:.1f} min in all"
            f" (with the final evaluation); load average (15 min) at the end of training: {s['load_average']}",
            f"- SHA-256 of model.safetensors: `{s['sha256']}`",
            "",
            "## Held-out accuracy",
            f"Greedy decoding on {s['final_eval_clips']} held-out clips of 32-256 frames, encoded to H.264 and"
            " decoded back, of which the model is given N frames at segment centres (the pipeline's rule; its"
            " default is 8), scored by `pipeline/demo_eval.py` (caption attributes: colour, shape, motion,"
            " order, and their mean):",
            "",
            *rows,
            "",
            "Teacher-forced held-out exact match during training (16 clips per frame count):",
            "",
            "| step | loss | exact match per task@frames |",
            "|---|---|---|",
            *log,
            "",
        ]
    )


def machine() -> str:
    """A one-line description of the machine the run used."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs{gpu}"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.train_demo_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--clips-per-step", type=int, default=d.clips_per_step, help="batch size at 8 frames")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed, help="seeds torch and the training clips (0-9)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=d.device)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument(
        "--short-fraction", type=float, default=d.short_fraction, help="share of 8-frame-only steps"
    )
    p.add_argument(
        "--single-shape-fraction",
        type=float,
        default=d.single_shape_fraction,
        help="share of the first steps that see one shape per clip (a curriculum)",
    )
    p.add_argument(
        "--aux-weight",
        type=float,
        default=d.aux_weight,
        help="weight of a training-only loss on the visual tokens (each token's shape and motion)",
    )
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out checks")
    p.add_argument("--final-eval-clips", type=int, default=d.final_eval_clips, help="0 skips the final eval")
    p.add_argument(
        "--final-eval-frames", type=int, nargs="+", default=list(d.final_eval_frames),
        help="frame counts the final evaluation feeds the model (8 is the pipeline's default)",
    )  # fmt: skip
    p.add_argument("--output", default=d.output, help="model directory to write (default: the committed one)")
    p.add_argument("--force", action="store_true", help="overwrite existing weights in --output")
    args = p.parse_args(argv)
    args.final_eval_frames = tuple(args.final_eval_frames)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    out = Path(cfg.output)
    if (out / "model.safetensors").exists() and not cfg.force:
        raise SystemExit(f"{out / 'model.safetensors'} exists: refusing to overwrite it without --force")
    started = time.time()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    processor = demo_model.build_processor()
    spec = demo_model.DemoModelSpec()
    model = Qwen2VLForConditionalGeneration(demo_model.build_config(processor.tokenizer, spec)).to(cfg.device)
    log = train(cfg, model, processor)
    train_seconds, load = time.time() - started, round(os.getloadavg()[2], 1)
    sha256 = demo_model.save_model_dir(out, model.cpu(), processor)
    accuracy = final_eval(cfg, model, processor) if cfg.final_eval_clips else {}
    args = sys.argv[1:] if argv is None else argv
    summary = {
        "output": str(out),
        "command": " ".join(["python -m jobs.train_demo_model", *args]),
        "sha256": sha256,
        "parameters": demo_model.parameter_count(model),
        "weights_mb": round((out / "model.safetensors").stat().st_size / 1e6, 2),
        "accuracy": accuracy,
        "final_eval_clips": cfg.final_eval_clips,
        "train_seconds": round(train_seconds),
        "total_seconds": round(time.time() - started),
        "load_average": load,
        "machine": f"{machine()}, torch threads {cfg.threads}",
        "config": asdict(cfg),
        "spec": asdict(spec),
        "log": log,
    }
    (out / "README.md").write_text(model_card(summary))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("log", "spec")}))


if __name__ == "__main__":
    main()
