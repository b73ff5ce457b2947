"""Decode and sample video frames on CPU workers; every failure becomes an error, never an exception.

The stage runs as Ray tasks (``map_batches(decode_frames, ...)``), separate from the model actors, so
decoding overlaps the GPU work. Each task opens its videos itself through fsspec (s3fs for ``s3://``):
bytes go from storage to the worker, never through the driver.

decord is the fast path; PyAV is the portable fallback (decord has x86_64 wheels only) and the second
opinion when decord rejects a file. A file whose container declares more frames than can be decoded is
reported as truncated rather than silently shortened.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from pipeline.storage import StorageOptions, get_fs, protocol_of

try:
    import decord
except ImportError:  # aarch64 and other platforms without a decord wheel
    decord = None

# Qwen2-VL's video processor default per-frame limit (size["longest_edge"]), used when the model's own
# processor config cannot be read.
DEFAULT_MAX_PIXELS = 28 * 28 * 768
EMPTY_FRAMES = np.zeros((0, 2, 2, 3), dtype=np.uint8)
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


class VideoDecodeError(Exception):
    """A video that cannot be used; the message is written into the row's ``error``."""


@dataclass(frozen=True)
class FrameSampling:
    """How frames are picked and sized (see PipelineConfig for the trade-offs)."""

    num_frames: int = 8
    fps: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [T, H, W, 3] uint8, T >= 1
    total_frames: int  # frames in the file
    native_fps: float
    backend: str  # "decord" or "pyav"


def segment_centres(total: int, count: int) -> list[int]:
    """Indices of ``count`` of ``total`` frames: the centres of ``count`` equal segments, so the first
    and last frames are not over-represented (``min(total, count)`` indices, ascending, no repeats).
    The one uniform sampling rule: the pipeline, the demo world, training and evaluation all use it."""
    count = min(total, count)
    return [min(int((i + 0.5) * total / count), total - 1) for i in range(count)]


def sample_indices(total: int, native_fps: float, sampling: FrameSampling) -> list[int]:
    """Frame indices to keep: uniform ``num_frames``, or every 1/fps seconds capped at ``num_frames``."""
    if total <= 0:
        return []
    if sampling.fps is not None and native_fps > 0:
        step = native_fps / sampling.fps
        picks = sorted({min(int(i * step), total - 1) for i in range(max(1, math.ceil(total / step)))})
        if len(picks) <= sampling.num_frames:
            return picks
        total_picks = np.linspace(0, len(picks) - 1, sampling.num_frames)
        return [picks[round(i)] for i in total_picks]
    return segment_centres(total, sampling.num_frames)


def fit_pixels(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """(H, W) scaled down, aspect kept, so that H * W <= max_pixels; unchanged when already within."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def resize_frames(frames: np.ndarray, max_pixels: int) -> np.ndarray:
    """[T, H, W, 3] → [T, h, w, 3] within ``max_pixels`` (bicubic, as the Qwen processors resize)."""
    height, width = fit_pixels(frames.shape[1], frames.shape[2], max_pixels)
    if (height, width) == frames.shape[1:3]:
        return frames
    resized = [np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames]
    return np.stack(resized)


def decode_video(source: str | BinaryIO, sampling: FrameSampling) -> DecodedVideo:
    """Sampled, resized frames of one video (a local path or a seekable binary file object)."""
    problems = []
    if decord is not None:
        try:
            return _decode_decord(source, sampling)
        except Exception as exc:  # decord raises DECORDError and RuntimeError for bad input
            problems.append(f"decord: {_first_line(exc)}")
            if hasattr(source, "seek"):
                source.seek(0)
    try:
        return _decode_pyav(source, sampling)
    except VideoDecodeError:
        raise
    except Exception as exc:  # av.error.* for corrupt containers and streams
        problems.append(f"PyAV: {_first_line(exc)}")
    raise VideoDecodeError("not a decodable video (" + "; ".join(problems) + ")")


def _decode_decord(source: str | BinaryIO, sampling: FrameSampling) -> DecodedVideo:
    reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
    total, fps = len(reader), float(reader.get_avg_fps() or 0.0)
    indices = sample_indices(total, fps, sampling)
    if not indices:
        raise VideoDecodeError("the video has no frames")
    frames = reader.get_batch(indices).asnumpy()
    return DecodedVideo(resize_frames(frames, sampling.max_pixels), total, fps, "decord")


def _decode_pyav(source: str | BinaryIO, sampling: FrameSampling) -> DecodedVideo:
    import av

    with av.open(source) as container:
        if not container.streams.video:
            raise VideoDecodeError("the file has no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0.0)
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    declared = stream.frames or len(decoded)
    if not decoded:
        raise VideoDecodeError("the video has no frames")
    if len(decoded) < declared:
        raise VideoDecodeError(f"truncated video: {len(decoded)} of {declared} declared frames decode")
    indices = sample_indices(len(decoded), fps, sampling)
    frames = np.stack([decoded[i] for i in indices])
    return DecodedVideo(resize_frames(frames, sampling.max_pixels), len(decoded), fps, "pyav")


def _first_line(exc: BaseException) -> str:
    """``Type: message`` on one line, without decord's ``[hh:mm:ss] file.cc:123:`` prefixes."""
    text = _LOG_PREFIX.sub("", str(exc)).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


class FrameDecoder:
    """The decode stage: a batch of video rows in, the same rows plus frames out (one per video).

    Output columns added: ``frames`` ([T, H, W, 3] uint8; empty on error), ``num_frames``,
    ``frame_error`` ("" when ok) and ``frame_seconds``.
    """

    def __init__(self, sampling: FrameSampling, storage: StorageOptions) -> None:
        self.sampling = sampling
        self.storage = storage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, object]:
        frames, counts, errors, seconds = [], [], [], []
        for uri in batch["video_uri"]:
            start = time.perf_counter()
            try:
                video = self.load(str(uri))
                frames.append(video.frames)
                counts.append(len(video.frames))
                errors.append("")
            except Exception as exc:  # every per-video failure becomes data
                frames.append(EMPTY_FRAMES)
                counts.append(0)
                errors.append(str(exc) if isinstance(exc, VideoDecodeError) else _first_line(exc))
            seconds.append(time.perf_counter() - start)
        return {
            **batch,
            "frames": frames,
            "num_frames": np.asarray(counts, dtype=np.int32),
            "frame_error": np.asarray(errors, dtype=object),
            "frame_seconds": np.asarray(seconds, dtype=np.float64),
        }

    def load(self, uri: str) -> DecodedVideo:
        """Open ``uri`` on its filesystem and decode it; raises VideoDecodeError with a readable reason."""
        if not uri:
            raise VideoDecodeError("video_uri is empty")
        fs, path = get_fs(uri, self.storage)
        try:
            size = fs.size(path)
        except FileNotFoundError as exc:
            raise VideoDecodeError(f"video not found: {uri}") from exc
        if not size:
            raise VideoDecodeError(f"empty file (0 bytes): {uri}")
        if protocol_of(uri) == "file":
            return decode_video(path, self.sampling)
        with fs.open(path, "rb") as f:
            return decode_video(f, self.sampling)


def decode_frames(batch: dict[str, np.ndarray], sampling: FrameSampling, storage: StorageOptions) -> dict:
    """``map_batches`` entry point (Ray tasks): :class:`FrameDecoder` applied to one batch."""
    return FrameDecoder(sampling, storage)(batch)
