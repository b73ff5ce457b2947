"""Sample videos for the embedded default: procedural clips encoded with PyAV, plus a manifest.

The demo helper's world (``pipeline.demo_world.write_sample_dataset``) is used when it exists, so the
sample clips are the ones the demo model was trained on. Until then a tiny world of our own stands in:
a coloured square moving across a grey background, with one multiple-choice question about its colour.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def encode_video(frames: Iterable[np.ndarray], dest: str | Path | BinaryIO, fps: int = 8) -> None:
    """Encode uint8 frames [H, W, 3] (even H and W) as H.264 MP4 into a path or a binary file object."""
    frames = list(frames)
    height, width = frames[0].shape[:2]
    container = av.open(dest, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def moving_square(colour: str, direction: str, num_frames: int = 16, size: int = 64) -> np.ndarray:
    """[T, size, size, 3] uint8: a square of ``colour`` moving in ``direction`` over grey."""
    video = np.full((num_frames, size, size, 3), 128, dtype=np.uint8)
    side, travel = size // 4, size // 2
    dx, dy = DIRECTIONS[direction]
    for t in range(num_frames):
        step = round(travel * t / max(num_frames - 1, 1))
        x = size // 2 - side // 2 + dx * (step - travel // 2)
        y = size // 2 - side // 2 + dy * (step - travel // 2)
        video[t, max(y, 0) : y + side, max(x, 0) : x + side] = COLOURS[colour]
    return video


def write_sample_dataset(out_dir: str | Path, num_clips: int = 4, seed: int = 0) -> Path:
    """Write ``num_clips`` clips and ``manifest.jsonl`` into ``out_dir``; return the manifest's path."""
    try:  # the demo world, once it exists, is the one the demo model knows
        from pipeline.demo_world import write_sample_dataset as demo_write
    except ImportError:
        return _write_own_samples(Path(out_dir), num_clips, seed)
    return Path(demo_write(out_dir, num_clips=num_clips, seed=seed))


def _write_own_samples(out_dir: Path, num_clips: int, seed: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, directions = list(COLOURS), list(DIRECTIONS)
    lines = []
    for i in range(num_clips):
        colour, direction = colours[rng.integers(len(colours))], directions[rng.integers(len(directions))]
        name = f"clip{i:03d}.mp4"
        encode_video(moving_square(colour, direction), out_dir / name)
        lines.append(
            {
                "id": f"clip{i:03d}",
                "video_uri": name,
                "caption": f"a {colour} square moves {direction}",
                "question": "What colour is the square?",
                "options": colours,
                "answer": colour,
            }
        )
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest
