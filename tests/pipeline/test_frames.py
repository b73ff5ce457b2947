"""Frame decoding on real files (H.264 MP4, MPEG-2 TS, PNG, JPEG, encoded here with PyAV and PIL):
sampling, resizing, rotation, variable frame rate, and every bad input.

Each bad input must come back as data (an empty frame array and a readable reason), never as an
exception, and decord and PyAV must agree on good files. Clips whose frames are flat grey levels let a
test read back which frame (or which second) each kept frame came from.
"""

from __future__ import annotations

import http.server
import io
import os
import re
import threading
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from pipeline import frames as frames_module
from pipeline.frames import (
    TIE_TOLERANCE,
    FrameDecoder,
    FrameSampling,
    Timeline,
    VideoDecodeError,
    decode_video,
    fit_pixels,
    frames_at,
    pick_frames,
    sample_indices,
    sample_times,
    segment_centres,
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
    monkeypatch.setattr(frames_module, "decord_available", lambda: False)  # a platform without decord wheels
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


# --- clips made here: grey levels say which frame (or second) a kept frame came from -----------------

VFR_TIMES = [i / 60 for i in range(60)] + [1.0 + k for k in range(8)]  # 60 frames in 1 s, then 1 fps: 9 s
VFR_TIME_BASE = Fraction(1, 600)


def grey(levels: list[int], height: int = 64, width: int = 64) -> np.ndarray:
    """[T, H, W, 3] uint8: frame i is flat grey ``levels[i]``."""
    return np.stack([np.full((height, width, 3), level, dtype=np.uint8) for level in levels])


def second_level(t: float) -> int:
    return 20 + 25 * int(t)


def write_clip(
    dest: Path,
    frames: np.ndarray,
    *,
    times: list[float] | None = None,
    rotation: int = 0,
    fmt: str = "mp4",
    codec: str = "libx264",
    rate: int = 8,
) -> Path:
    """Encode [T, H, W, 3] frames; ``times`` (seconds) make the clip variable-rate, ``rotation`` tags
    the display matrix (counter-clockwise degrees, as phones write it)."""
    container = av.open(str(dest), mode="w", format=fmt)
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    if rotation:
        stream.set_display_rotation(rotation)
    if times is not None:
        stream.codec_context.time_base = VFR_TIME_BASE
    for i, pixels in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        if times is not None:
            frame.pts, frame.time_base = round(times[i] / VFR_TIME_BASE), VFR_TIME_BASE
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    return dest


def corner_frame() -> np.ndarray:
    """32 high, 64 wide, grey, with a red block in the top-left corner."""
    frame = np.full((32, 64, 3), 128, dtype=np.uint8)
    frame[:8, :16] = (220, 40, 40)
    return frame


def image_bytes(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(corner_frame()).save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def odd_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Name → path of the inputs of the issue "Every input fails safe"."""
    root = tmp_path_factory.mktemp("odd")
    clips = {
        "vfr.mp4": write_clip(root / "vfr.mp4", grey([second_level(t) for t in VFR_TIMES]), times=VFR_TIMES),
        "rot90.mp4": write_clip(root / "rot90.mp4", np.stack([corner_frame()] * 4), rotation=90),
        "rot180.mp4": write_clip(root / "rot180.mp4", np.stack([corner_frame()] * 4), rotation=180),
        "one-frame.mp4": write_clip(root / "one-frame.mp4", grey([100])),
        "mpeg2.ts": write_clip(
            root / "mpeg2.ts",
            grey([10 + 3 * i for i in range(50)]),
            fmt="mpegts",
            codec="mpeg2video",
            rate=25,
        ),
    }
    for fmt, name in [("PNG", "png.mp4"), ("JPEG", "jpeg.mp4")]:
        (root / name).write_bytes(image_bytes(fmt))
        clips[name] = root / name
    return clips


@pytest.fixture(params=["decord", "pyav"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with decord (where installed) and with PyAV alone (a platform without decord)."""
    if request.param == "decord" and not frames_module.decord_available():
        pytest.skip("decord is not installed here")
    if request.param == "pyav":
        monkeypatch.setattr(frames_module, "decord_available", lambda: False)
    return request.param


def seconds_of(video_frames: np.ndarray) -> list[int]:
    """The second each VFR-clip frame belongs to, read from its grey level."""
    return [round((float(f.mean()) - 20) / 25) for f in video_frames]


# --- sampling by presentation time ---------------------------------------------------------------------


def test_the_time_rule_is_the_index_rule_at_a_constant_rate() -> None:
    # the oracle: on evenly spaced timestamps, the frames on screen at the sample times are sample_indices
    for total in [*range(2, 40), 240, 1001]:
        for fps in (8.0, 25.0, 30000 / 1001, 60.0):
            stamps = np.arange(total) / fps
            for sampling in [
                FrameSampling(n, f) for n in (1, 3, 8, 16) for f in (None, 0.5, 2.0, 7.0, 100.0)
            ]:
                expected = sample_indices(total, fps, sampling)
                times = sample_times(total / fps, fps, sampling)
                assert frames_at(stamps, times, TIE_TOLERANCE / fps) == expected, (total, fps, sampling)
                assert pick_frames(Timeline(total, fps, stamps), sampling) == expected


def test_variable_frame_rate_timestamps_decide_the_picks() -> None:
    stamps = np.asarray(VFR_TIMES)
    by_index = sample_indices(len(stamps), 68 / 9, FrameSampling(num_frames=8))
    assert sum(stamps[i] < 1 for i in by_index) == 7  # the issue: 7 of 8 in the first second of 9
    picks = pick_frames(Timeline(len(stamps), 68 / 9, stamps), FrameSampling(num_frames=8))
    assert [int(stamps[i]) for i in picks] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_variable_frame_rate_video_is_sampled_by_time(odd_clips: dict[str, Path], backend: str) -> None:
    uniform = decode_video(str(odd_clips["vfr.mp4"]), FrameSampling(num_frames=8))
    assert uniform.backend == backend and uniform.total_frames == len(VFR_TIMES)
    assert seconds_of(uniform.frames) == [0, 1, 2, 3, 4, 5, 6, 7]  # one per segment of 9/8 s
    assert list(np.floor(uniform.timestamps)) == [0, 1, 2, 3, 4, 5, 6, 7]
    every_second = decode_video(str(odd_clips["vfr.mp4"]), FrameSampling(num_frames=8, fps=1.0))
    kept = seconds_of(every_second.frames)
    assert len(kept) == 8 and kept[0] == 0 and kept[-1] == 8 and kept == sorted(set(kept))


def test_a_stream_without_a_frame_count_is_counted_and_sampled(odd_clips: dict[str, Path]) -> None:
    with av.open(str(odd_clips["mpeg2.ts"])) as container:
        assert container.streams.video[0].frames == 0  # MPEG-TS declares no frame count
    video = decode_video(str(odd_clips["mpeg2.ts"]), FrameSampling(num_frames=8))
    assert video.backend == "pyav"  # decord seeks to wrong frames in MPEG-TS, silently
    assert video.total_frames == 50 and video.native_fps == pytest.approx(25.0)
    indices = [round((float(f.mean()) - 10) / 3) for f in video.frames]
    assert indices == segment_centres(50, 8)


# --- rotation, stills -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, corner", [("rot90.mp4", (64, 32), "bottom-left"), ("rot180.mp4", (32, 64), "bottom-right")]
)
def test_a_rotated_clip_comes_out_upright(
    odd_clips: dict[str, Path], backend: str, name: str, shape: tuple[int, int], corner: str
) -> None:
    video = decode_video(str(odd_clips[name]), FrameSampling(num_frames=2))
    assert video.frames.shape == (2, *shape, 3)
    red = (video.frames[0, ..., 0].astype(int) - video.frames[0, ..., 2]) > 100
    rows, cols = np.nonzero(red)
    vertical, horizontal = corner.split("-")
    assert (rows.mean() > shape[0] / 2) == (vertical == "bottom")
    assert (cols.mean() > shape[1] / 2) == (horizontal == "right")


def test_pyav_rotates_as_decord_does(odd_clips: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    if not frames_module.decord_available():
        pytest.skip("decord is not installed here")
    sampling = FrameSampling(num_frames=2)
    with_decord = decode_video(str(odd_clips["rot90.mp4"]), sampling)
    monkeypatch.setattr(frames_module, "decord_available", lambda: False)
    with_pyav = decode_video(str(odd_clips["rot90.mp4"]), sampling)
    assert with_pyav.frames.shape == with_decord.frames.shape
    assert np.abs(with_pyav.frames.astype(int) - with_decord.frames.astype(int)).mean() < 3


def test_a_still_image_is_an_error_row(odd_clips: dict[str, Path], backend: str) -> None:
    names = ["png.mp4", "jpeg.mp4", "one-frame.mp4"]
    batch = {"video_uri": np.array([str(odd_clips[n]) for n in names], dtype=object)}
    out = FrameDecoder(FrameSampling(), StorageOptions())(batch)
    assert list(out["num_frames"]) == [0, 0, 0]
    assert all(e.startswith("an image, not a video") for e in out["frame_error"]), out["frame_error"]


# --- permission errors -----------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_local_file_says_permission_denied(clip_dir: Path) -> None:
    path = clip_dir / "red-left.mp4"
    path.chmod(0)
    with pytest.raises(VideoDecodeError, match=re.escape(f"permission denied: {path}")):
        FrameDecoder(FrameSampling(), StorageOptions()).load(str(path))


class DeniedFileSystem(LocalFileSystem):
    """A local filesystem whose files can be listed but not opened (as without read permission)."""

    def _open(self, path: str, mode: str = "rb", **kwargs: object):
        raise PermissionError(13, "Permission denied", path)


def test_a_permission_error_from_the_filesystem_says_so(
    clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frames_module, "get_fs", lambda uri, storage: (DeniedFileSystem(), uri))
    uri = str(clip_dir / "red-left.mp4")
    out = FrameDecoder(FrameSampling(), StorageOptions())({"video_uri": np.array([uri], dtype=object)})
    assert list(out["frame_error"]) == [f"permission denied: {uri}"]


@pytest.fixture
def forbidding_http_server() -> Iterator[str]:
    """``http://127.0.0.1:<port>``: answers every request 403 Forbidden, as a presigned URL past expiry."""

    class Forbidden(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(403)
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_http_403_says_permission_denied_without_the_signature(forbidding_http_server: str) -> None:
    uri = f"{forbidding_http_server}/clips/v.mp4?X-Amz-Signature=secret123&X-Amz-Expires=60"
    out = FrameDecoder(FrameSampling(), StorageOptions())({"video_uri": np.array([uri], dtype=object)})
    assert list(out["frame_error"]) == [f"permission denied: {forbidding_http_server}/clips/v.mp4"]


def test_s3_access_denied_says_permission_denied(
    s3_endpoint: str, s3_bucket: str, clip_bytes: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs
    from moto import settings

    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).pipe(
        f"{s3_bucket}/private/red-left.mp4", clip_bytes["red-left.mp4"]
    )
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks credentials: 403
    uri = f"s3://{s3_bucket}/private/red-left.mp4"
    out = FrameDecoder(FrameSampling(), StorageOptions())({"video_uri": np.array([uri], dtype=object)})
    assert list(out["frame_error"]) == [f"permission denied: {uri}"]


# --- the same inputs through S3 ---------------------------------------------------------------------------


def test_every_kind_of_input_through_s3(
    s3_endpoint: str, s3_bucket: str, odd_clips: dict[str, Path], clip_bytes: dict, backend: str
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    names = ["vfr.mp4", "rot90.mp4", "png.mp4", "mpeg2.ts"]
    for name in names:
        fs.pipe(f"{s3_bucket}/odd/{name}", odd_clips[name].read_bytes())
    fs.pipe(f"{s3_bucket}/odd/truncated.mp4", clip_bytes["truncated.mp4"])
    uris = [f"s3://{s3_bucket}/odd/{name}" for name in [*names, "truncated.mp4"]]
    decoder = FrameDecoder(FrameSampling(num_frames=8), StorageOptions())
    out = decoder({"video_uri": np.array(uris, dtype=object)})
    assert list(out["num_frames"]) == [8, 4, 0, 8, 0]
    assert list(out["frame_error"][:2]) == ["", ""] and out["frame_error"][3] == ""
    assert seconds_of(out["frames"][0]) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert out["frames"][1].shape == (4, 64, 32, 3)  # upright
    assert out["frame_error"][2] == "an image, not a video (png_pipe format)"
    assert "not a decodable video" in out["frame_error"][4]
    assert decoder.load(uris[0]).backend == backend
