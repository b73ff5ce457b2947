"""Frame decoding on real H.264 files (encoded with PyAV): sampling, resizing, and every bad input.

Each bad input must come back as data (an empty frame array and a readable reason), never as an
exception, and decord and PyAV must agree on good files.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline import frames as frames_module
from pipeline.frames import (
    FrameDecoder,
    FrameSampling,
    VideoDecodeError,
    decode_video,
    fit_pixels,
    sample_indices,
)
from pipeline.storage import StorageOptions

BAD_CLIPS = {
    "truncated.mp4": "not a decodable video",
    "corrupt.mp4": "not a decodable video",
    "empty.mp4": "empty file (0 bytes)",
    "notes.mp4": "not a decodable video",
}


@pytest.fixture
def clip_dir(tmp_path: Path, clip_bytes: dict[str, bytes]) -> Path:
    for name, data in clip_bytes.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def test_uniform_sampling_takes_segment_centres_and_never_repeats() -> None:
    assert sample_indices(24, 8.0, FrameSampling(num_frames=8)) == [1, 4, 7, 10, 13, 16, 19, 22]
    assert sample_indices(3, 8.0, FrameSampling(num_frames=8)) == [0, 1, 2]
    assert sample_indices(0, 8.0, FrameSampling(num_frames=8)) == []


def test_fps_sampling_follows_time_and_is_capped_by_num_frames() -> None:
    # 3 s at 8 fps sampled at 2 fps: one frame every 4, six in all
    assert sample_indices(24, 8.0, FrameSampling(num_frames=8, fps=2.0)) == [0, 4, 8, 12, 16, 20]
    capped = sample_indices(240, 8.0, FrameSampling(num_frames=8, fps=2.0))
    assert len(capped) == 8 and capped == sorted(set(capped)) and capped[0] == 0 and capped[-1] >= 232


def test_fit_pixels_keeps_aspect_within_the_limit() -> None:
    assert fit_pixels(48, 64, 10_000) == (48, 64)
    h, w = fit_pixels(1080, 1920, 28 * 28 * 16)
    assert h * w <= 28 * 28 * 16 and abs(w / h - 1920 / 1080) < 0.05


def test_good_clip_decodes_with_requested_frames_and_pixel_limit(clip_dir: Path) -> None:
    video = decode_video(str(clip_dir / "red-left.mp4"), FrameSampling(num_frames=8, max_pixels=32 * 32))
    assert video.frames.shape == (8, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.total_frames == 16 and video.native_fps == pytest.approx(8.0)
    # the red square is there (decoded pixels, not zeros)
    assert (video.frames[..., 0].astype(int) - video.frames[..., 2].astype(int)).max() > 100


def test_pyav_fallback_matches_decord(clip_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sampling = FrameSampling(num_frames=5, max_pixels=64 * 64)
    with_decord = decode_video(str(clip_dir / "green-right.mp4"), sampling)
    monkeypatch.setattr(frames_module, "decord", None)  # a platform without decord wheels
    with open(clip_dir / "green-right.mp4", "rb") as f:
        with_pyav = decode_video(f, sampling)
    assert (with_decord.backend, with_pyav.backend) == ("decord", "pyav")
    assert with_pyav.frames.shape == with_decord.frames.shape
    assert np.abs(with_pyav.frames.astype(int) - with_decord.frames.astype(int)).mean() < 3


def test_a_short_clip_gives_the_frames_it_has(clip_dir: Path) -> None:
    video = decode_video(str(clip_dir / "short.mp4"), FrameSampling(num_frames=8))
    assert len(video.frames) == 3


@pytest.mark.parametrize("name", sorted(BAD_CLIPS))
def test_bad_inputs_raise_a_readable_decode_error(clip_dir: Path, name: str) -> None:
    decoder = FrameDecoder(FrameSampling(), StorageOptions())
    with pytest.raises(VideoDecodeError, match=re.escape(BAD_CLIPS[name])):
        decoder.load(str(clip_dir / name))


def test_a_truncated_faststart_file_is_an_error_not_a_shorter_video(tmp_path: Path, square_video) -> None:
    path = tmp_path / "faststart.mp4"
    container = av.open(str(path), mode="w", format="mp4", options={"movflags": "faststart"})
    stream = container.add_stream("libx264", rate=8)
    stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    for frame in square_video("red", "left", num_frames=48, size=64):
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    data = path.read_bytes()
    assert data[4:8] == b"ftyp" and b"moov" in data[:64]  # the index is up front: a partial read is possible
    with pytest.raises(VideoDecodeError):
        decode_video(io.BytesIO(data[: int(len(data) * 0.8)]), FrameSampling(num_frames=8))


def test_decoder_stage_turns_every_failure_into_a_row(clip_dir: Path) -> None:
    names = ["red-left.mp4", "short.mp4", *sorted(BAD_CLIPS), "missing.mp4"]
    batch = {"video_uri": np.array([str(clip_dir / n) for n in names] + [""], dtype=object)}
    out = FrameDecoder(FrameSampling(num_frames=8), StorageOptions())(batch)
    assert list(out["num_frames"]) == [8, 3] + [0] * (len(BAD_CLIPS) + 2)
    errors = dict(zip([*names, ""], out["frame_error"], strict=True))
    assert errors["red-left.mp4"] == "" and errors["short.mp4"] == ""
    for name, reason in BAD_CLIPS.items():
        assert reason in errors[name]
    assert errors["missing.mp4"].startswith("video not found")
    assert errors[""] == "video_uri is empty"
    assert all(f.ndim == 4 and f.shape[-1] == 3 for f in out["frames"])


def test_decoder_stage_streams_videos_from_s3(s3_endpoint: str, s3_bucket: str, clip_bytes: dict) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.pipe(f"{s3_bucket}/clips/red-left.mp4", clip_bytes["red-left.mp4"])
    fs.pipe(f"{s3_bucket}/clips/empty.mp4", b"")
    uris = [
        f"s3://{s3_bucket}/clips/red-left.mp4",
        f"s3://{s3_bucket}/clips/empty.mp4",
        f"s3://{s3_bucket}/x.mp4",
    ]
    # no endpoint passed: AWS_ENDPOINT_URL (set by the fixture) is honoured as by boto3
    out = FrameDecoder(FrameSampling(num_frames=4), StorageOptions())(
        {"video_uri": np.array(uris, dtype=object)}
    )
    assert list(out["num_frames"]) == [4, 0, 0]
    assert out["frame_error"][1].startswith("empty file") and out["frame_error"][2].startswith(
        "video not found"
    )
