"""The demo model's card (README.md) and the machine line it records, from a training run's summary."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

from pipeline.demo import world


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
    log_rows = [
        f"| {r['step']} | {r['loss']:.3f} | {json.dumps(r['heldout_teacher_forced'])} |"
        f" {json.dumps(r.get('training_aux', {}))} |"
        for r in s["log"]
        if "step" in r
    ]
    drills = [r for r in s["log"] if "drill_steps" in r]
    spec = s["spec"]
    return "\n".join(
        [
            "# demo-video-qwen2-vl: the embedded demo model of std-video-annotate",
            "",
            "A tiny Qwen2-VL (`Qwen2VLForConditionalGeneration`) trained from scratch on the procedural world",
            "of `pipeline/demo/world.py` (coloured shapes that appear, move and disappear). It captions clips",
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
            "## The world",
            *world_lines(),
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
            f"- {s['config']['steps']} steps, peak learning rate {s['config']['lr']:g} after"
            f" {s['config']['warmup']} warm-up steps, {s['config']['clips_per_step']} clips per step at 8 frames,"
            f" auxiliary visual-token loss weight {s['config']['aux_weight']:g} (training only: each visual"
            " token's shape, motion and time bin);",
            *(
                f"- first, a text-only MCQ drill (the curriculum's first phase): {d['drill_steps']} steps of"
                f" {s['config']['drill_batch']} items (one MCQ prompt and its reply, next-token loss on every"
                f" token), held-out answer-letter accuracy {100 * d['drill_letter_accuracy']['before']:.0f}%"
                f" before, {100 * d['drill_letter_accuracy']['after']:.0f}% after ({d['drill_seconds'] / 60:.1f} min);"
                for d in drills
            ),
            f"- seed {s['config']['seed']}; machine: {s['machine']}",
            f"- wall time: {s['train_seconds'] / 60:.1f} min training, {s['total_seconds'] / 60:.1f} min in all"
            f" (with the final evaluation); load average (15 min) at the end of training: {s['load_average']}",
            f"- SHA-256 of model.safetensors: `{s['sha256']}`",
            "",
            "## Held-out accuracy",
            f"Greedy decoding on {s['final_eval_clips']} held-out clips of 32-256 frames, encoded to H.264 and"
            " decoded back, of which the model is given N frames at segment centres (the pipeline's rule; its"
            " default is 8), scored by `pipeline/demo/scoring.py` (caption attributes: colour, shape, motion,"
            " order, and their mean):",
            "",
            *rows,
            "",
            "Teacher-forced held-out exact match during training (32 clips per frame count; `:colour`,"
            " `:shape`, `:motion`: the caption tokens naming that attribute, predicted right), and the"
            " auxiliary head's own accuracy on the training batches since the last check (what the vision"
            " tower encodes: shape and motion on the tokens a shape covers, the time bin on every token):",
            "",
            "| step | loss | exact match per task@frames | auxiliary head |",
            "|---|---|---|---|",
            *log_rows,
            "",
        ]
    )


def world_lines() -> list[str]:
    """The card's description of the world, from ``pipeline.demo.world``'s constants."""
    span = f"{100 * world.MIN_LIFE:.0f}-{100 * world.MAX_LIFE:.0f}%"
    return [
        f"- {min(world.SHAPE_COUNTS)}-{max(world.SHAPE_COUNTS)} shapes per clip, of {len(world.COLOURS)} colours x {len(world.SHAPES)} shapes ({', '.join(world.SHAPES)},"
        f" {2 * world.SHAPE_RADIUS} px across) x {len(world.MOTIONS)} directions; each shape visible for"
        f" {span} of the clip, moving {world.MIN_TRAVEL}-{world.MAX_TRAVEL} px with a dim trail behind it;",
        f"- shapes sit on the {world.CELL}-px grid of the merged visual tokens (patch 14, merge 2) and move a"
        " cell at a time, so each of a shape's 2 x 2 tokens always shows the same quarter of its form; the"
        f" trailing half of each of its cells is drawn at {world.SHADE:.0%} of its colour (speed shading), so"
        " one token shows its direction too; the flat dark background's green level rises through the clip"
        " (its clock);",
        f"- clips of {world.MIN_FRAMES}-{world.MAX_FRAMES} frames at {world.FRAME_WIDTH}x{world.FRAME_HEIGHT};"
        " the caption names each shape in order of appearance; the questions ask which colour appeared or"
        " disappeared first or last, how many shapes appeared, and each shape's form and direction; a"
        ' colour-keyed answer starts with its key ("blue triangle", "blue left"), the appeared-last one with'
        ' the colours that appeared before it ("purple then blue"); each MCQ item asks one of them with'
        ' shuffled options, and the model answers with the option\'s text, then its letter ("purple D"; the'
        " letter is what is scored);",
        "- every answer depends on the few frames where a shape is visible and on the few visual tokens it"
        f" covers ({(2 * world.SHAPE_RADIUS) ** 2 / (world.FRAME_WIDTH * world.FRAME_HEIGHT):.0%} of the"
        " frame's area for a square).",
    ]


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
