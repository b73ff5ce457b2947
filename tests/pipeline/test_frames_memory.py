"""Memory of the decode stage: bounded by the kept frames, refused over the budget, never fatal.

Method: a long small clip and a short large one are encoded here (libx264, ultrafast) and decoded by
the PyAV reader in a fresh child process, which reports its peak resident set (``VmHWM``; not
``ru_maxrss``, which a child inherits from the forking pytest process) over its resident set just
before the decode (a warm-up decode has loaded the codecs). The growth must stay
within the module's own estimate (:func:`estimate_decode_bytes`) plus allocator slack, and that bound
must be a small fraction of the decoded video's size, so a decoder that kept every frame fails.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline import frames as frames_module
from pipeline.frames import FrameDecoder, FrameSampling, decode_video, estimate_decode_bytes
from pipeline.storage import StorageOptions
from pipeline.video_decode import probe_video

REPO = Path(__file__).resolve().parents[2]
SLACK = 16 << 20  # allocator and library noise in a child's peak RSS

CHILD = """
import json, sys
from pipeline import frames

def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

frames.decord_available = lambda: False  # the PyAV reader, as on a platform without decord
frames.decode_video(sys.argv[2], frames.FrameSampling(num_frames=2, max_pixels=32 * 32))  # warm up
resident = status_kib("VmRSS")
video = frames.decode_video(sys.argv[1], frames.FrameSampling(num_frames=8))
growth = (status_kib("VmHWM") - resident) * 1024  # this process's peak over its size before decoding
print(json.dumps({"growth": growth, "shape": list(video.frames.shape), "total": video.total_frames}))
"""


def write_moving_clip(dest: Path, num_frames: int, height: int, width: int) -> Path:
    """A bar moving over a changing grey: every frame differs, so every frame is really decoded."""
    container = av.open(str(dest), mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=24, options={"preset": "ultrafast"})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        pixels[:] = (i * 7) % 256
        pixels[: height // 4, i % width : i % width + 8] = 255
        container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
    container.mux(stream.encode())
    container.close()
    return dest


@pytest.mark.parametrize("num_frames, height, width", [(3000, 240, 320), (200, 720, 1280)])
def test_pyav_memory_follows_the_kept_frames_not_the_video(
    tmp_path: Path, num_frames: int, height: int, width: int
) -> None:
    clip = write_moving_clip(tmp_path / "clip.mp4", num_frames, height, width)
    warm = write_moving_clip(tmp_path / "warm.mp4", 16, 64, 64)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(clip), str(warm)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    sampling = FrameSampling(num_frames=8)
    bound = estimate_decode_bytes(probe_video(str(clip)), sampling) + SLACK
    full_decode = num_frames * height * width * 3  # what keeping every decoded RGB frame costs
    print(f"{num_frames}x{width}x{height}: RSS growth {result['growth'] / 2**20:.1f} MiB, bound "
          f"{bound / 2**20:.1f} MiB, full decode {full_decode / 2**20:.0f} MiB")  # fmt: skip
    assert result["total"] == num_frames and result["shape"][0] == 8
    assert result["growth"] <= bound
    assert full_decode > 5 * bound  # a decoder that kept every frame could not pass


def test_a_video_over_the_memory_budget_is_an_error_row_and_the_others_decode(
    tmp_path: Path, clip_bytes: dict[str, bytes]
) -> None:
    small = tmp_path / "small.mp4"
    small.write_bytes(clip_bytes["red-left.mp4"])
    large = write_moving_clip(tmp_path / "large.mp4", 4, 480, 640)
    sampling = FrameSampling(num_frames=4, max_pixels=64 * 64)
    needed_small = estimate_decode_bytes(probe_video(str(small)), sampling)
    needed_large = estimate_decode_bytes(probe_video(str(large)), sampling)
    assert needed_large > 2 * needed_small
    tight = FrameSampling(num_frames=4, max_pixels=64 * 64, max_decode_bytes=2 * needed_small)
    uris = np.array([str(large), str(small)], dtype=object)
    out = FrameDecoder(tight, StorageOptions())({"video_uri": uris})
    assert list(out["num_frames"]) == [0, 4]
    error = out["frame_error"][0]
    assert error.startswith(
        "too large for the memory budget: decoding 640x480 video for 4 frames needs about"
    )
    assert f"{needed_large / 2**30:.2f} GiB" in error and f"{2 * needed_small / 2**30:.2f} GiB" in error


def test_decord_leaves_a_file_it_would_buffer_over_budget_to_the_streaming_reader(
    clip_bytes: dict[str, bytes],
) -> None:
    if not frames_module.decord_available():
        pytest.skip("decord is not installed here")
    data = clip_bytes["red-left.mp4"]
    sampling = FrameSampling(num_frames=4)
    streaming = estimate_decode_bytes(probe_video(io.BytesIO(data)), sampling)
    # decord reads a file object whole (and copies it): 2 * len(data) more than the streaming reader
    just_streaming = FrameSampling(num_frames=4, max_decode_bytes=streaming + len(data))
    assert decode_video(io.BytesIO(data), just_streaming).backend == "pyav"
    roomy = FrameSampling(num_frames=4, max_decode_bytes=streaming + 2 * len(data))
    assert decode_video(io.BytesIO(data), roomy).backend == "decord"


def test_running_out_of_memory_is_that_videos_error_row(
    tmp_path: Path, clip_bytes: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    small = tmp_path / "small.mp4"
    small.write_bytes(clip_bytes["red-left.mp4"])
    large = write_moving_clip(tmp_path / "large.mp4", 4, 480, 640)
    resize = frames_module.resize_frame

    def fail_on_large(frame: np.ndarray, max_pixels: int) -> np.ndarray:
        if frame.shape[0] > 100:
            raise MemoryError  # as numpy raises when an allocation fails
        return resize(frame, max_pixels)

    monkeypatch.setattr(frames_module, "resize_frame", fail_on_large)
    uris = np.array([str(large), str(small)], dtype=object)
    out = FrameDecoder(FrameSampling(num_frames=4), StorageOptions())({"video_uri": uris})
    assert list(out["num_frames"]) == [0, 4]
    assert out["frame_error"][0].startswith("out of memory decoding 640x480 video with")
