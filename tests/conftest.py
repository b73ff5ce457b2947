"""Shared pytest configuration and fixtures.

Configuration: one torch thread per test; GPU tests skip cleanly without CUDA; no hub access.

Fixtures (real components, started by the tests themselves):

- ``s3_endpoint``: moto's ``ThreadedMotoServer`` on 127.0.0.1 (a real HTTP S3 API, as s3fs's own
  suite uses). The standard AWS variables point at it (``AWS_ENDPOINT_URL`` included), exactly as a
  user would set them, so nothing in the pipeline is told about the test. ``s3_bucket``: a fresh bucket.
- ``ray_local``: one local Ray for the session (``num_cpus=2, num_gpus=1``: one logical GPU, so the
  ``num_gpus=1`` actor path is scheduled while torch stays on CPU). It starts after ``s3_endpoint`` so
  its workers inherit the AWS variables.
- ``model_dir``: a small random model of the demo architecture, saved once per session.
- ``clip_bytes``: real H.264 MP4s (a coloured square moving over grey) encoded with PyAV, and every
  kind of bad input, as bytes; ``square_video``: the frames generator itself.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP

import av  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tests run tiny models and time nothing: one torch thread avoids oversubscribing the CPUs that
# Ray workers and other processes share (OpenMP spinning made shared-machine runs 10x slower).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Every test starts on one torch thread, whatever an earlier test or job set."""
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
GOOD_CLIPS = ("red-left", "green-right", "blue-up")


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def encode_video(frames: np.ndarray, dest: str | Path | BinaryIO, fps: int = 8) -> None:
    """Encode uint8 frames [T, H, W, 3] (even H and W) as H.264 MP4 into a path or a binary file object."""
    container = av.open(dest, mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    for frame in frames:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
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


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto S3 server; AWS_* variables point at it for the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in [*AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket (its name) on the session's S3 server."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray (2 CPUs, 1 logical GPU) for the whole session; yields its address."""
    import ray

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("STD_ANNOTATE_CACHE", str(tmp_path_factory.mktemp("cache")))
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Qwen2-VL of the demo architecture, with its processor, saved once."""
    from pipeline.demo.builders import build_untrained_model

    return build_untrained_model(tmp_path_factory.mktemp("models") / "tiny")


def _mp4(colour: str, direction: str, num_frames: int = 16) -> bytes:
    out = io.BytesIO()
    encode_video(moving_square(colour, direction, num_frames=num_frames, size=64), out)
    return out.getvalue()


@pytest.fixture(scope="session")
def square_video():
    """:func:`moving_square`, for tests that encode clips their own way."""
    return moving_square


@pytest.fixture(scope="session")
def clip_bytes() -> dict[str, bytes]:
    """Name → file contents: three good clips, a 3-frame clip, and the bad inputs of the issue."""
    clips = {f"{name}.mp4": _mp4(*name.split("-")) for name in GOOD_CLIPS}
    good = clips["red-left.mp4"]
    corrupt = bytearray(good)
    corrupt[len(good) // 3 : len(good) // 3 + 200] = b"\x55" * 200
    clips.update(
        {
            "short.mp4": _mp4("yellow", "down", num_frames=3),
            "truncated.mp4": good[: len(good) // 2],
            "corrupt.mp4": bytes(corrupt),
            "empty.mp4": b"",
            "notes.mp4": b"these are meeting notes, not a video\n" * 40,
        }
    )
    return clips
