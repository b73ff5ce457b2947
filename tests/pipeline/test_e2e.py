"""End to end on local Ray with a real S3 endpoint (moto's server): the jobs as users run them.

Every run here is real: Ray Data schedules decode tasks and a model actor (one logical GPU), videos are
H.264 files read from S3 through s3fs, and rows are read back from Parquet with pyarrow. The model is a
small random model of the demo architecture, so texts are nonsense but every counter is real.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from ray import cloudpickle

from jobs import annotate, caption
from pipeline.annotator import Annotator
from pipeline.config import PipelineConfig
from pipeline.run import build_dataset, plan_run, run_pipeline
from pipeline.schema import SCHEMA

pytestmark = pytest.mark.slow

GOOD = ["red-left.mp4", "green-right.mp4", "blue-up.mp4", "short.mp4"]
BAD = {
    "truncated.mp4": "not a decodable video",
    "corrupt.mp4": "not a decodable video",
    "empty.mp4": "empty file (0 bytes)",
    "notes.mp4": "not a decodable video",
    "missing.mp4": "video not found",
}
FAST = ["--max-new-tokens", "6", "--num-frames", "8", "--batch-size", "3", "--gamma", "3"]


def _last_json(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bucket(ray_local: str, s3_endpoint: str, clip_bytes: dict[str, bytes]) -> str:
    """A bucket with clips/ (good and bad files), good/ (good files only) and a manifest of clips/."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    name = "e2e-videos"
    fs.mkdir(name)
    for file in [*GOOD, *BAD]:
        if file in clip_bytes:
            fs.pipe(f"{name}/clips/{file}", clip_bytes[file])
    for file in GOOD:
        fs.pipe(f"{name}/good/{file}", clip_bytes[file])
    manifest = "".join(
        json.dumps({"id": f.split(".")[0], "video_uri": f"clips/{f}"}) + "\n" for f in [*GOOD, *BAD]
    )
    fs.pipe(f"{name}/manifest.jsonl", manifest.encode())
    return name


@pytest.fixture(scope="module")
def caption_run(bucket: str, model_dir: Path) -> dict:
    """``jobs.caption`` over the manifest of good and bad clips, into S3; what it wrote is read back at
    once, so no test depends on another's order (tests that add rows work on a copy of the output)."""
    argv = ["--input", f"s3://{bucket}/manifest.jsonl", "--output", f"s3://{bucket}/captions", "--model",
            str(model_dir), "--rows-per-file", "4", "--decoder", "std", *FAST]  # fmt: skip
    # --decoder std: this run checks StD's accounting (auto, the default, decodes this tiny model densely)
    rc = caption.main(argv)
    fs = s3fs.S3FileSystem()
    parts = sorted(fs.glob(f"{bucket}/captions/part-*.parquet"))
    tables = [pq.read_table(p, filesystem=fs) for p in parts]
    summary = json.loads(fs.cat(f"{bucket}/captions/_summary.json"))
    return {"argv": argv, "rc": rc, "tables": tables, "summary": summary}


def test_caption_rows_statuses_schema_and_summary(caption_run: dict, bucket: str) -> None:
    assert caption_run["rc"] == 0
    tables = caption_run["tables"]
    assert len(tables) == 3  # 9 rows, 4 per file
    assert all(t.schema == SCHEMA for t in tables)
    rows = {r["video_id"]: r for t in tables for r in t.to_pylist()}
    assert sum(t.num_rows for t in tables) == len(rows) == len(GOOD) + len(BAD)  # nothing lost, no duplicate
    for video in GOOD:
        row = rows[video.split(".")[0]]
        assert row["status"] == "ok" and row["error"] is None and row["text"] is not None
        assert row["generated_tokens"] >= 1 and row["visual_tokens"] > 0 and row["task"] == "caption"
    assert rows["short"]["num_frames"] == 3 and rows["red-left"]["num_frames"] == 8
    for video, reason in BAD.items():
        row = rows[video.split(".")[0]]
        assert row["status"] == "error" and reason in row["error"], row
        assert row["video_uri"] == f"s3://{bucket}/clips/{video}"
    summary = caption_run["summary"]
    assert (summary["rows"], summary["rows_ok"], summary["rows_error"], summary["videos"]) == (9, 4, 5, 9)
    assert summary["frames"] == 3 * 8 + 3 and summary["status"] == "ok" and summary["files"] == 3
    assert summary["generated_tokens"] == sum(r["generated_tokens"] or 0 for r in rows.values())
    assert summary["num_gpus_per_actor"] == 1.0 and summary["gpu_seconds_per_video"] > 0
    assert (
        summary["actors_seen"] >= 1
        and summary["actor_seconds"] <= summary["num_actors"] * summary["wall_seconds"]
    )
    assert 0 < summary["held_gpu_seconds_per_video"] <= summary["gpu_seconds_per_video"]
    assert summary["dense_sample_rows"] >= 1 and summary["dense_match_rate"] == 1.0 and summary["speedup"] > 0
    for key in ("videos_per_s", "generated_tokens_per_s", "acceptance_rate", "mean_accepted_per_round"):
        assert summary[key] is not None and summary[key] > 0, key


def test_caption_refuses_an_output_that_holds_rows(caption_run: dict, capsys) -> None:
    assert caption.main(caption_run["argv"]) == 2
    out = _last_json(capsys)
    assert out["status"] == "error" and "--if-exists resume" in out["error"]


def test_annotate_retries_only_items_without_an_ok_row(caption_run: dict, bucket: str, capsys) -> None:
    fs = s3fs.S3FileSystem()
    fs.copy(f"{bucket}/captions/", f"{bucket}/captions-retry/", recursive=True)  # leave the run's output be
    argv = list(caption_run["argv"])
    argv[argv.index("--output") + 1] = f"s3://{bucket}/captions-retry"
    assert annotate.main(argv) == 0
    summary = _last_json(capsys)
    assert (summary["items_skipped"], summary["rows_expected"], summary["rows_error"]) == (4, 5, 5)


def test_annotate_resumes_idempotently(bucket: str, model_dir: Path, capsys) -> None:
    output = f"s3://{bucket}/incremental"
    argv = ["--input", f"s3://{bucket}/good/", "--output", output, "--model", str(model_dir),
            "--rows-per-file", "2", "--dense-sample", "0", *FAST]  # fmt: skip
    assert annotate.main(argv) == 0
    first = _last_json(capsys)
    assert (first["rows_ok"], first["files"]) == (4, 2)
    assert annotate.main(argv) == 0
    second = _last_json(capsys)
    assert (second["items_skipped"], second["rows"], second["files"]) == (4, 0, 0)  # nothing to do
    fs = s3fs.S3FileSystem()
    parts = sorted(fs.glob(f"{bucket}/incremental/part-*.parquet"))
    lost = pq.read_table(parts[0], filesystem=fs)["id"].to_pylist()
    fs.rm(parts[0])  # some output rows disappear
    assert annotate.main(argv) == 0
    third = _last_json(capsys)
    assert (third["items_skipped"], third["rows_ok"]) == (2, 2)
    new = [p for p in fs.glob(f"{bucket}/incremental/part-*.parquet") if third["run_id"] in p]
    assert sorted(id_ for p in new for id_ in pq.read_table(p, filesystem=fs)["id"].to_pylist()) == sorted(
        lost
    )


def test_qa_with_two_questions_on_one_video_gives_two_rows(ray_local: str, model_dir: Path, tmp_path: Path,
                                                           clip_bytes: dict) -> None:  # fmt: skip
    (tmp_path / "v.mp4").write_bytes(clip_bytes["red-left.mp4"])
    row = {"id": "v", "video_uri": "v.mp4", "questions": ["Which shape?", "Which way does it move?"]}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    config = PipelineConfig(input=str(tmp_path / "m.jsonl"), output=str(tmp_path / "out"), model=str(model_dir),
                            task="qa", max_new_tokens=4, dense_sample=0)  # fmt: skip
    summary = run_pipeline(config)
    table = pq.read_table(tmp_path / "out")
    assert sorted(table["id"].to_pylist()) == ["v:qa:0", "v:qa:1"]
    assert sorted(table["question"].to_pylist()) == sorted(row["questions"])
    assert set(table["status"].to_pylist()) == {"ok"} and (summary["videos"], summary["rows"]) == (1, 2)


class CrashOnceAnnotator(Annotator):
    """Kills its own process on its first batch (once per run, marked by a file), as an OOM kill would."""

    marker = Path(os.environ.get("PYTEST_CRASH_MARKER", "/nonexistent"))

    def __call__(self, batch):
        if not self.marker.exists():
            self.marker.write_text("crashed")
            os._exit(1)
        return super().__call__(batch)


def test_a_crashed_actor_is_restarted_and_its_batch_retried_without_duplicates(
    ray_local: str, model_dir: Path, tmp_path: Path, clip_bytes: dict
) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in GOOD:
        (clips / name).write_bytes(clip_bytes[name])
    marker = tmp_path / "crashed"
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    CrashOnceAnnotator.marker = marker  # pickled by value into the actor
    config = PipelineConfig(input=str(clips), output=str(tmp_path / "out"), model=str(model_dir), batch_size=2,
                            max_new_tokens=4, dense_sample=0)  # fmt: skip
    summary = run_pipeline(config, annotator_cls=CrashOnceAnnotator)
    assert marker.read_text() == "crashed"  # the crash did happen
    ids = pq.read_table(tmp_path / "out")["id"].to_pylist()
    assert sorted(ids) == sorted(f"{n.split('.')[0]}:caption" for n in GOOD)  # every row once
    assert summary["rows_ok"] == len(GOOD) and summary["status"] == "ok"


def test_cpu_fallback_keeps_decoding_a_separate_task_stage(
    ray_local: str, model_dir: Path, tmp_path: Path, clip_bytes: dict
) -> None:
    """With num_gpus=0 the model actors request the same CPU as a default map; Ray would fuse decoding
    into the actors (no overlap of decode and generate) unless the decode stage's resources differ."""
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(clip_bytes["red-left.mp4"])
    config = PipelineConfig(input=str(tmp_path / "clips"), output=str(tmp_path / "out"), model=str(model_dir),
                            num_gpus=0, max_new_tokens=2, dense_sample=0)  # fmt: skip
    ds = build_dataset(config, plan_run(config), num_gpus=0.0).materialize()
    stats = ds.stats()
    assert "MapBatches(decode_frames)" in stats and "MapBatches(Annotate)" in stats
    assert "decode_frames)->MapBatches(Annotate)" not in stats
    assert ds.take_all()[0]["status"] == "ok"
