"""Decode and sample video frames on CPU workers; every failure becomes an error, never an exception.

The stage runs as Ray tasks (``map_batches(decode_frames, ...)``), separate from the model actors, so
decoding overlaps the GPU work. Each task opens its videos itself through fsspec (s3fs for ``s3://``):
bytes go from storage to the worker, never through the driver.

One video, in order (vocabulary in ``pipeline.video_decode``): probe the header → refuse a still image
and a video over the memory budget → read the timeline → pick the frame indices → decode, keeping only
the picked frames, each shrunk to ``max_pixels`` as soon as it is decoded. decord is the fast reader;
PyAV is the portable one (decord has x86_64 wheels only) and the second opinion when decord rejects a
file. Both turn frames upright by the display matrix's rotation. A file whose container declares more
frames than can be decoded is reported as truncated rather than silently shortened.

**Sampling** is by presentation time: uniform sampling takes the frame on screen at the centre of each
of ``num_frames`` equal time segments; ``fps`` sampling the frame on screen every 1/fps seconds (never
more often than the video's own rate), at most ``num_frames`` of them spread evenly. "On screen at t" is
the last frame whose timestamp is <= t. At a constant frame rate that rule is the index rule
:func:`sample_indices` (built on :func:`segment_centres`), which is then used as such; only a variable
rate video is sampled from its timestamps (:func:`sample_times`, :func:`frames_at`).

**Memory** follows the kept frames, not the video's length: each reader holds one full-size frame at a
time, so a video's peak is known from its header before decoding (:func:`estimate_decode_bytes`: the
decoder's pictures, one frame in RGB, the kept frames, and the bytes read ahead). A video whose
estimate exceeds ``FrameSampling.max_decode_bytes`` is an error row that gives the numbers; where
decord would read a file object whole beyond the budget, the streaming PyAV reader decodes it instead.
PyAV's decoder is also told the largest picture the budget allows (FFmpeg's ``max_pixels``), so a
header that understates the size cannot make it allocate more, and a ``MemoryError`` is an error row
for that video only. Chosen over a child process per video under an rlimit: forking a multi-threaded
Ray worker and piping frames back costs more than most decodes on a 2-core node, and with bounded
readers the estimate is the limit a child would enforce. What remains (a decoder allocating far beyond
its pictures) is left to Ray's memory monitor, so the stage's ``max_retries`` must be finite.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image

from pipeline.storage import StorageOptions, get_fs, protocol_of, redact
from pipeline.video_decode import (
    DecordReader,
    PyavReader,
    Timeline,
    VideoDecodeError,
    VideoProbe,
    is_constant_rate,
    load_decord,
    probe_video,
)

# Qwen2-VL's video processor default per-frame limit (size["longest_edge"]), used when the model's own
# processor config cannot be read.
DEFAULT_MAX_PIXELS = 28 * 28 * 768
# Per-video memory budget: by estimate_decode_bytes, 8 frames of 8-bit 4K video take ~0.3 GiB, of 8K
# ~1.1 GiB; 16K (~4.3 GiB) is refused.
MAX_DECODE_BYTES = 1 << 30  # the default of --max-decode-mib (1024)
REFERENCE_PICTURES = 16  # the most pictures an H.264 / HEVC decoder keeps for reference
IN_FLIGHT_PICTURES = 2  # the picture being decoded and the one handed out
PACKET_PICTURES = 1  # the compressed picture being read is at most its decoded size
RGB_COPIES = 2  # a full-size RGB frame and its rotated or resized copy
# A target time within this fraction of a frame interval of a frame's timestamp is that frame's (float
# rounding of timestamps must not move a pick to the previous frame).
TIE_TOLERANCE = 1e-4
# Containers in which decord's seeks land on the wrong frames without an error (MPEG program and
# transport streams): PyAV reads them.
DECORD_MISSEEKS = frozenset({"mpeg", "mpegts", "mpegvideo"})
EMPTY_FRAMES = np.zeros((0, 2, 2, 3), dtype=np.uint8)
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")
_URL = re.compile(r"https?://[^\s'\"<>]+")


@dataclass(frozen=True)
class FrameSampling:
    """How frames are picked and sized (see PipelineConfig for the trade-offs), and the memory one
    video's decode may take (``max_decode_bytes``: over it, the video is an error row)."""

    num_frames: int = 8
    fps: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_decode_bytes: int = MAX_DECODE_BYTES

    def __post_init__(self) -> None:
        if self.max_decode_bytes <= 0:
            raise ValueError(f"max_decode_bytes must be positive, got {self.max_decode_bytes}")


@dataclass(frozen=True)
class DecodedVideo:
    frames: np.ndarray  # [T, H, W, 3] uint8, T >= 1, upright
    total_frames: int  # frames in the file
    native_fps: float
    backend: str  # "decord" or "pyav"
    timestamps: np.ndarray  # [T] float64: seconds from the first frame to each kept frame


# --- which frames -------------------------------------------------------------------------------------


def segment_centres(total: int, count: int) -> list[int]:
    """Indices of ``count`` of ``total`` frames: the centres of ``count`` equal segments, so the first
    and last frames are not over-represented (``min(total, count)`` indices, ascending, no repeats).
    The one uniform sampling rule: the pipeline, the demo world, training and evaluation all use it."""
    count = min(total, count)
    return [min(int((i + 0.5) * total / count), total - 1) for i in range(count)]


def sample_indices(total: int, native_fps: float, sampling: FrameSampling) -> list[int]:
    """The index rule (constant frame rate): uniform ``num_frames``, or every 1/fps seconds capped at
    ``num_frames``."""
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


def sample_times(duration: float, native_fps: float, sampling: FrameSampling) -> list[float]:
    """The time rule: seconds from the first frame to take frames at, within ``duration``."""
    if duration <= 0:
        return []
    if sampling.fps is not None and native_fps > 0:
        rate = min(sampling.fps, native_fps)
        count = max(1, math.ceil(duration * rate - TIE_TOLERANCE))  # every j / rate < duration
        times = [j / rate for j in range(count)]
        if count <= sampling.num_frames:
            return times
        return [times[round(i)] for i in np.linspace(0, count - 1, sampling.num_frames)]
    return [(i + 0.5) * duration / sampling.num_frames for i in range(sampling.num_frames)]


def frames_at(timestamps: np.ndarray, times: list[float], tolerance: float = 0.0) -> list[int]:
    """Indices of the frames on screen at ``times`` (the last frame whose timestamp <= t), ascending,
    no repeats. ``timestamps``: [N] ascending seconds."""
    shown = np.searchsorted(timestamps, np.asarray(times, dtype=np.float64) + tolerance, side="right") - 1
    return sorted({int(i) for i in np.clip(shown, 0, len(timestamps) - 1)})


def pick_frames(timeline: Timeline, sampling: FrameSampling) -> list[int]:
    """The frame indices to keep: the index rule at a constant rate, the time rule otherwise."""
    stamps = timeline.timestamps
    if stamps is None or is_constant_rate(stamps):
        return sample_indices(timeline.total, timeline.native_fps, sampling)
    if sampling.fps is None and timeline.total <= sampling.num_frames:
        return list(range(timeline.total))
    interval = float(np.median(np.diff(stamps)))  # the last frame is shown for a typical interval
    duration = float(stamps[-1]) + interval
    times = sample_times(duration, timeline.total / duration, sampling)
    return frames_at(stamps, times, TIE_TOLERANCE * interval)


# --- how big ------------------------------------------------------------------------------------------


def fit_pixels(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """(H, W) scaled down, aspect kept, so that H * W <= max_pixels; unchanged when already within."""
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def resize_frame(frame: np.ndarray, max_pixels: int) -> np.ndarray:
    """[H, W, 3] → [h, w, 3] within ``max_pixels`` (bicubic, as the Qwen processors resize)."""
    height, width = fit_pixels(frame.shape[0], frame.shape[1], max_pixels)
    if (height, width) == frame.shape[:2]:
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


def resize_frames(frames: np.ndarray, max_pixels: int) -> np.ndarray:
    """[T, H, W, 3] → [T, h, w, 3] within ``max_pixels``."""
    return np.stack([resize_frame(frame, max_pixels) for frame in frames])


def estimate_decode_bytes(probe: VideoProbe, sampling: FrameSampling, buffered_bytes: int = 0) -> int:
    """Peak bytes of decoding one video: the decoder's pictures (reference, in flight, the packet being
    read), the full-size RGB frame and its copy, the kept frames, and ``buffered_bytes`` read ahead."""
    height, width = fit_pixels(probe.height, probe.width, sampling.max_pixels)
    kept = sampling.num_frames * height * width * 3
    return int(_bytes_per_picture_pixel(probe) * probe.width * probe.height) + kept + buffered_bytes


def _bytes_per_picture_pixel(probe: VideoProbe) -> float:
    pictures = REFERENCE_PICTURES + IN_FLIGHT_PICTURES + PACKET_PICTURES
    return pictures * probe.bytes_per_pixel + RGB_COPIES * 3


@dataclass(frozen=True)
class DecodePlan:
    """What the memory budget allows one video."""

    readers: list[str]  # to try in order: "decord" (where it fits and seeks right), then "pyav"
    max_picture_pixels: int  # the largest picture the decoder may allocate (FFmpeg's max_pixels)


def decord_available() -> bool:
    """Whether decord can be used here (tests patch this to take the PyAV path)."""
    return load_decord() is not None


def plan_decode(probe: VideoProbe, sampling: FrameSampling, source: str | BinaryIO) -> DecodePlan:
    """The readers within ``max_decode_bytes``; raises VideoDecodeError when even the streaming one is not."""
    limit = sampling.max_decode_bytes
    read_ahead = getattr(source, "blocksize", 0)  # fsspec files buffer one block (s3fs: 50 MiB)
    needed = estimate_decode_bytes(probe, sampling, read_ahead)
    if needed > limit:
        raise VideoDecodeError(
            f"too large for the memory budget: decoding {probe.width}x{probe.height} video for "
            f"{sampling.num_frames} frames needs about {needed / 2**30:.2f} GiB, max_decode_bytes is "
            f"{limit / 2**30:.2f} GiB"
        )
    # the declared picture size, plus whatever room the budget leaves: a header that understates the
    # size cannot make the decoder allocate more
    max_picture = probe.width * probe.height + int((limit - needed) / _bytes_per_picture_pixel(probe))
    file_bytes = source.seek(0, 2) if hasattr(source, "seek") else 0
    whole_file = 2 * file_bytes  # decord reads a file object into a bytearray, then copies it
    seeks_right = probe.format_name not in DECORD_MISSEEKS
    if decord_available() and seeks_right and estimate_decode_bytes(probe, sampling, whole_file) <= limit:
        return DecodePlan(["decord", "pyav"], max_picture)
    return DecodePlan(["pyav"], max_picture)


# --- decoding -----------------------------------------------------------------------------------------


def decode_video(source: str | BinaryIO, sampling: FrameSampling) -> DecodedVideo:
    """Sampled, resized, upright frames of one video (a local path or a seekable binary file object)."""
    try:
        probe = probe_video(source)
    except VideoDecodeError:
        raise
    except Exception as exc:  # av.error.* for files that are no container FFmpeg knows
        raise VideoDecodeError(f"not a decodable video (PyAV: {_first_line(exc)})") from exc
    if probe.still:
        raise VideoDecodeError(f"an image, not a video ({probe.format_name} format)")
    plan, problems = plan_decode(probe, sampling, source), []
    for backend in plan.readers:
        try:
            return _decode_with(backend, source, sampling, plan.max_picture_pixels)
        except VideoDecodeError:
            raise
        except MemoryError as exc:
            raise VideoDecodeError(
                f"out of memory decoding {probe.width}x{probe.height} video with {backend}"
            ) from exc
        except Exception as exc:  # decord: DECORDError, RuntimeError; PyAV: av.error.* for bad streams
            problems.append(f"{backend}: {_first_line(exc)}")
    raise VideoDecodeError("not a decodable video (" + "; ".join(problems) + ")")


def _decode_with(
    backend: str, source: str | BinaryIO, sampling: FrameSampling, max_pixels: int
) -> DecodedVideo:
    reader = DecordReader(source) if backend == "decord" else PyavReader(source, max_pixels)
    with reader:
        timeline = reader.timeline()
        if timeline.total == 0:
            raise VideoDecodeError("the video has no frames")
        if timeline.total == 1:
            raise VideoDecodeError("an image, not a video (a single frame)")
        indices = pick_frames(timeline, sampling)
        frames, timestamps, kept = EMPTY_FRAMES, np.zeros(len(indices)), 0
        for timestamp, frame in reader.frames(indices):  # one full-size frame alive at a time
            small = resize_frame(frame, sampling.max_pixels)
            if not kept:
                frames = np.empty((len(indices), *small.shape), dtype=np.uint8)
            frames[kept], timestamps[kept] = small, timestamp
            kept += 1
    assert kept == len(indices) > 0, (backend, kept, indices)
    return DecodedVideo(frames, timeline.total, timeline.native_fps, backend, timestamps)


def _is_denied(exc: BaseException) -> bool:
    """A PermissionError (local files, s3fs), or an HTTP 401/403 that fsspec's HTTP filesystem reports as
    FileNotFoundError (the response error is its cause)."""
    return isinstance(exc, PermissionError) or getattr(exc.__cause__, "status", None) in (401, 403)


def _redacted(message: str) -> str:
    """``message`` with every URL's query string removed (presigned signatures never reach a row)."""
    return _URL.sub(lambda match: redact(match.group(0)), message)


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
        for uri in map(str, batch["video_uri"]):
            start = time.perf_counter()
            try:
                video = self.load(uri)
                frames.append(video.frames)
                counts.append(len(video.frames))
                errors.append("")
            except Exception as exc:  # every per-video failure becomes data
                frames.append(EMPTY_FRAMES)
                counts.append(0)
                errors.append(_redacted(str(exc) if isinstance(exc, VideoDecodeError) else _first_line(exc)))
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
            if not size:
                raise VideoDecodeError(f"empty file (0 bytes): {redact(uri)}")
            file = fs.open(path, "rb")
        except (FileNotFoundError, PermissionError) as exc:
            reason = "permission denied" if _is_denied(exc) else "video not found"
            raise VideoDecodeError(f"{reason}: {redact(uri)}") from exc
        with file:  # local videos are decoded from their path (decord reads a file object whole)
            return decode_video(path if protocol_of(uri) == "file" else file, self.sampling)


def decode_frames(batch: dict[str, np.ndarray], sampling: FrameSampling, storage: StorageOptions) -> dict:
    """``map_batches`` entry point (Ray tasks): :class:`FrameDecoder` applied to one batch."""
    return FrameDecoder(sampling, storage)(batch)
