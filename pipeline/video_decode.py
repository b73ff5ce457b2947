"""The two video readers behind :func:`pipeline.frames.decode_video`: PyAV and decord.

Vocabulary (shared with ``pipeline.frames``):

- **frame index**: a frame's position in presentation order, 0-based;
- **timestamp**: a frame's presentation time in seconds, counted from the first frame;
- **timeline**: a video's frame count, declared frame rate and (where the rate may vary) every frame's
  timestamp, known before any frame is decoded;
- **probe**: what the container header says (size, pixel format, still picture or not), read before a
  reader is chosen.

Both readers have the same two methods, in the order the decode stage calls them: ``timeline()``, then
``frames(indices)``, which yields ``(timestamp, frame)`` for the requested indices (ascending), each
frame full size, RGB and upright (the display matrix's rotation applied), one at a time so that the
caller can shrink it before the next one is decoded. Neither reader keeps a frame it does not yield.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import BinaryIO

import numpy as np

# Frame intervals within this fraction of the median interval count as one constant frame rate
# (absorbs timestamps rounded to the time base, e.g. 33/34 ms at 29.97 fps in a 1/1000 time base).
CFR_TOLERANCE = 0.1
# FFmpeg caps a decoder's picture size at INT_MAX pixels.
FFMPEG_MAX_PIXELS = 2**31 - 1
# Bytes per pixel of a decoded picture whose pixel format is unknown (8-bit 4:4:4, or 4:2:0 above 8 bits).
UNKNOWN_BYTES_PER_PIXEL = 3.0


@functools.cache
def _av() -> ModuleType:
    """PyAV, imported on first use: the driver plans and writes without loading FFmpeg."""
    import av

    return av


@functools.cache
def load_decord() -> ModuleType | None:
    """decord, imported on first use, or None on platforms without a wheel (aarch64 and others)."""
    try:
        import decord
    except ImportError:
        return None
    return decord


class VideoDecodeError(Exception):
    """A video that cannot be used; the message is written into the row's ``error``."""


@dataclass(frozen=True)
class VideoProbe:
    """The container header of a video's first video stream (nothing decoded)."""

    width: int  # 0 when the header does not say
    height: int
    format_name: str  # the demuxer: "mov,mp4,m4a,3gp,3g2,mj2", "png_pipe", ...
    bytes_per_pixel: float  # of a decoded picture in the stream's pixel format (1.5 for yuv420p)
    still: bool  # an image format (PNG, JPEG, ... read as a one-picture "video") or cover art


@dataclass(frozen=True)
class Timeline:
    """When each frame of a video is shown, known before decoding."""

    total: int  # frames in the video
    native_fps: float  # the declared average rate (0.0 when unknown)
    timestamps: np.ndarray | None  # [total] float64 seconds, ascending, first 0.0; None: constant rate

    def __post_init__(self) -> None:
        assert self.timestamps is None or len(self.timestamps) == self.total


def is_constant_rate(timestamps: np.ndarray) -> bool:
    """True when every interval between consecutive timestamps is within CFR_TOLERANCE of the median."""
    intervals = np.diff(np.sort(np.asarray(timestamps, dtype=np.float64)))
    if len(intervals) < 2:
        return True
    median = float(np.median(intervals))
    return median > 0 and bool(np.all(np.abs(intervals - median) <= CFR_TOLERANCE * median))


def upright(frame: np.ndarray, rotation: float) -> np.ndarray:
    """[H, W, 3] turned by the display matrix's counter-clockwise ``rotation`` (degrees), as players and
    decord show it; flips are ignored (decord ignores them too)."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(frame, turns)) if turns else frame


def probe_video(source: str | BinaryIO) -> VideoProbe:
    """The header of ``source``'s first video stream; raises VideoDecodeError when it has none."""
    _rewind(source)
    av = _av()
    with av.open(source) as container:
        if not container.streams.video:
            raise VideoDecodeError("the file has no video stream")
        stream = container.streams.video[0]
        format_name = container.format.name
        disposition = av.stream.Disposition
        cover_art = bool(stream.disposition & (disposition.attached_pic | disposition.still_image))
        return VideoProbe(
            width=stream.codec_context.width or 0,
            height=stream.codec_context.height or 0,
            format_name=format_name,
            bytes_per_pixel=_bytes_per_pixel(stream.codec_context.pix_fmt),
            still=cover_art or format_name.endswith("_pipe") or format_name.startswith("image2"),
        )


def _bytes_per_pixel(pix_fmt: str | None) -> float:
    if not pix_fmt:
        return UNKNOWN_BYTES_PER_PIXEL
    try:
        planes = _av().VideoFormat(pix_fmt, 16, 16).components
    except Exception:  # a pixel format libswscale does not describe
        return UNKNOWN_BYTES_PER_PIXEL
    return sum(math.ceil(c.bits / 8) * c.width * c.height for c in planes) / 256


def _rewind(source: str | BinaryIO) -> None:
    if hasattr(source, "seek"):
        source.seek(0)


class PyavReader:
    """PyAV: the portable reader. Decodes every frame in order (so a truncated file is noticed) and
    converts to RGB only the frames it yields.

    The timeline comes from the container's sample index where that lists every frame at a constant
    rate (MP4, MOV, AVI): nothing is read twice. Otherwise (variable rate, MKV/WebM, MPEG-TS, raw
    streams) one demux pass reads every packet's timestamp without decoding, and the file is reopened.
    """

    def __init__(self, source: str | BinaryIO, max_pixels: int = FFMPEG_MAX_PIXELS) -> None:
        self.source = source
        self.max_pixels = min(max(max_pixels, 1), FFMPEG_MAX_PIXELS)
        self.total = 0
        self._open()

    def _open(self) -> None:
        _rewind(self.source)
        self.container = _av().open(self.source)
        if not self.container.streams.video:
            self.container.close()
            raise VideoDecodeError("the file has no video stream")
        self.stream = self.container.streams.video[0]
        # the decoder itself refuses pictures larger than the memory budget allows, whatever the header said
        self.stream.codec_context.options = {"max_pixels": str(self.max_pixels)}

    def __enter__(self) -> PyavReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.container.close()

    def timeline(self) -> Timeline:
        fps, declared = float(self.stream.average_rate or 0.0), self.stream.frames
        time_base = float(self.stream.time_base or 0.0)
        if declared > 1 and self._index_is_constant_rate():
            self.total = declared
            return Timeline(declared, fps, None)
        count, pts = 0, []
        for packet in self.container.demux(self.stream):
            if packet.size:  # the demuxer ends with an empty flush packet
                count += 1
                if packet.pts is not None:
                    pts.append(packet.pts)
        self.container.close()  # and decode from the start again (seeking back is unreliable in MPEG-TS)
        self._open()
        self.total = max(count, declared)
        if count < declared:
            raise VideoDecodeError(f"truncated video: {count} of {declared} declared frames decode")
        if len(pts) != count or not count or not time_base:  # no timestamps (raw streams): evenly spaced
            return Timeline(count, fps, None)
        ticks = np.sort(np.asarray(pts, dtype=np.int64))
        return Timeline(count, fps, (ticks - ticks[0]) * time_base)

    def _index_is_constant_rate(self) -> bool:
        entries = self.stream.index_entries
        if len(entries) != self.stream.frames:  # an index of key frames only (MKV cues) or none
            return False
        return is_constant_rate(np.fromiter((e.timestamp for e in entries), np.int64, len(entries)))

    def frames(self, indices: Sequence[int]) -> Iterator[tuple[float, np.ndarray]]:
        """``(timestamp, [H, W, 3] uint8)`` per index; raises VideoDecodeError if frames are missing."""
        wanted, fps = iter(indices), float(self.stream.average_rate or 1.0)
        next_index, first, decoded = next(wanted, None), None, 0
        for index, frame in enumerate(self.container.decode(self.stream)):
            decoded = index + 1
            if first is None:
                first = frame.time or 0.0
            if index == next_index:
                timestamp = frame.time - first if frame.time is not None else index / fps
                yield timestamp, upright(frame.to_ndarray(format="rgb24"), frame.rotation)
                next_index = next(wanted, None)
        if decoded < self.total:
            raise VideoDecodeError(f"truncated video: {decoded} of {self.total} declared frames decode")


class DecordReader:
    """decord: the fast reader (x86_64 wheels only). Seeks to each requested frame; applies rotation
    itself. A file object is read whole into memory (decord's own behaviour)."""

    def __init__(self, source: str | BinaryIO) -> None:
        _rewind(source)
        decord = load_decord()
        self.reader = decord.VideoReader(source, ctx=decord.cpu(0), num_threads=1)
        self.fps = float(self.reader.get_avg_fps() or 0.0)
        self.timestamps: np.ndarray | None = None

    def __enter__(self) -> DecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.reader

    def timeline(self) -> Timeline:
        total = len(self.reader)
        starts = self.reader.get_frame_timestamp(np.arange(total))[:, 0].astype(np.float64)
        if total > 1 and not np.all(np.diff(starts) > 0):  # timestamps decord could not read
            return Timeline(total, self.fps, None)
        self.timestamps = starts - starts[0]
        return Timeline(total, self.fps, self.timestamps)

    def frames(self, indices: Sequence[int]) -> Iterator[tuple[float, np.ndarray]]:
        for index in indices:
            if self.timestamps is not None:
                timestamp = float(self.timestamps[index])
            else:
                timestamp = index / self.fps if self.fps else 0.0
            yield timestamp, self.reader.get_batch([index]).asnumpy()[0]
