"""Atomic Parquet output, the resume set, and the run accounting, on local disk and a real S3 endpoint."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.accounting import Progress, RunAccounting
from pipeline.schema import NAMES, SCHEMA, to_table
from pipeline.sink import ParquetSink, ok_ids, part_files, read_rows, remove_outputs, write_json
from pipeline.storage import StorageOptions

LOCAL = StorageOptions()


def _row(i: int, status: str = "ok", **extra: object) -> dict:
    return {
        "id": f"v{i}:caption",
        "video_id": f"v{i}",
        "video_uri": f"/data/v{i}.mp4",
        "task": "caption",
        "status": status,
        "error": None if status == "ok" else "boom",
        "num_frames": 8,
        "created_at": datetime.now(timezone.utc),
        **extra,
    }


def test_rows_are_committed_in_whole_files_of_rows_per_file(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path), LOCAL, run_id="r1", rows_per_file=3)
    sink.write(to_table([_row(i) for i in range(4)]))
    assert [Path(f).name for f in part_files(str(tmp_path), LOCAL)] == ["part-r1-00000.parquet"]
    sink.write(to_table([_row(i) for i in range(4, 7)]))
    sink.close()
    files = part_files(str(tmp_path), LOCAL)
    assert [pq.read_metadata(f).num_rows for f in files] == [3, 3, 1]
    assert pq.read_schema(files[0]).names == list(NAMES)
    assert not (tmp_path / "_tmp").exists()  # nothing half-written left behind


def test_a_half_written_file_is_never_trusted(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path), LOCAL, run_id="r1")
    sink.write(to_table([_row(0)]))
    sink.close()
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "part-r2-00000.parquet.abc").write_bytes(b"PAR1 half a file")  # a killed writer
    assert ok_ids(str(tmp_path), LOCAL) == {"v0:caption"}
    assert read_rows(str(tmp_path), LOCAL).num_rows == 1


def test_resume_set_is_ids_with_an_ok_row(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path), LOCAL, run_id="r1")
    sink.write(to_table([_row(0), _row(1, "error"), _row(2, "error")]))
    sink.close()
    sink = ParquetSink(str(tmp_path), LOCAL, run_id="r2")
    sink.write(to_table([_row(2)]))  # a later run fixed v2
    sink.close()
    assert ok_ids(str(tmp_path), LOCAL) == {"v0:caption", "v2:caption"}
    assert ok_ids(str(tmp_path / "nothing-yet"), LOCAL) == set()


def test_overwrite_removes_rows_and_summaries(tmp_path: Path) -> None:
    sink = ParquetSink(str(tmp_path), LOCAL, run_id="r1")
    sink.write(to_table([_row(0)]))
    sink.close()
    write_json(str(tmp_path / "_summary.json"), {"rows": 1}, LOCAL)
    (tmp_path / "keep.txt").write_text("not ours")
    assert remove_outputs(str(tmp_path), LOCAL) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_s3_output_round_trip(s3_bucket: str) -> None:
    output = f"s3://{s3_bucket}/annotations"
    sink = ParquetSink(output, StorageOptions(), run_id="r1", rows_per_file=2)
    sink.write(to_table([_row(i) for i in range(3)]))
    sink.close()
    write_json(f"{output}/_summary.json", {"rows": 3}, StorageOptions())
    assert sink.files == [f"{output}/part-r1-00000.parquet", f"{output}/part-r1-00001.parquet"]
    table = read_rows(output, StorageOptions())
    assert table.schema == SCHEMA and sorted(table["id"].to_pylist()) == [f"v{i}:caption" for i in range(3)]
    import s3fs

    assert json.loads(s3fs.S3FileSystem().cat(f"{s3_bucket}/annotations/_summary.json")) == {"rows": 3}


def test_accounting_summary_from_rows() -> None:
    accounting = RunAccounting(expected_rows=4, started=time.perf_counter() - 6.0)  # a 6 s run
    std = {"visual_tokens": 100, "prompt_tokens": 120, "generated_tokens": 10, "drafted_tokens": 12,
           "accepted_tokens": 6, "rounds": 3, "decode_seconds": 0.5}  # fmt: skip
    accounting.add(to_table([
        _row(0, **std, dense_decode_seconds=1.0, dense_match=True),
        {**_row(0, **std), "id": "v0:qa:1"},  # the same video again: frames counted once
        _row(1, **std, task="mcq", correct=True),
        _row(2, "error"),
    ]))  # fmt: skip
    summary = accounting.summary(gpus_per_actor=2)
    assert (summary["videos"], summary["rows"], summary["rows_ok"], summary["rows_error"]) == (3, 4, 3, 1)
    assert summary["frames"] == 24 and summary["generated_tokens"] == 30 and summary["visual_tokens"] == 300
    assert summary["acceptance_rate"] == pytest.approx(18 / 36)
    assert summary["mean_accepted_per_round"] == pytest.approx(27 / 9)  # (generated - 1) per round, bonus in
    assert summary["speedup"] == pytest.approx(2.0) and summary["dense_match_rate"] == 1.0
    assert summary["mcq_accuracy"] == 1.0 and summary["top_errors"] == {"boom": 1}
    assert summary["gpu_seconds_per_video"] == pytest.approx(2 * 6.0 / 3, rel=0.05)  # 2 GPUs held for 6 s
    assert summary["videos_per_s"] == pytest.approx(3 / 6.0, rel=0.05)
    assert summary["items_per_s"] == pytest.approx(4 / 6.0, rel=0.05)  # 4 rows (items) of 3 videos
    assert "rows 4/4" in accounting.progress_line()


def test_held_gpu_seconds_count_each_actor_to_its_last_batch() -> None:
    """An actor's span is its age at its latest batch (batches may arrive out of order); the spans of
    every actor the run saw are summed, a restarted actor's included."""
    accounting = RunAccounting(expected_rows=3, started=time.perf_counter() - 100.0)
    accounting.add(to_table([_row(0), _row(1), _row(2)]))
    for actor, age in (("a", 10.0), ("b", 4.0), ("a", 30.0), ("a", 20.0), ("b-restarted", 2.5)):
        accounting.add_actor_age(pa.array([actor, actor]), pa.array([age, age]))
    summary = accounting.summary(gpus_per_actor=2, num_actors=2)
    assert summary["actors_seen"] == 3 and summary["actor_seconds"] == pytest.approx(36.5)
    assert summary["held_gpu_seconds_per_video"] == pytest.approx(2 * 36.5 / 3, abs=1e-3)
    assert summary["gpu_seconds_per_video"] == pytest.approx(4 * 100.0 / 3, rel=0.05)  # the upper bound
    assert accounting.summary(gpus_per_actor=0)["held_gpu_seconds_per_video"] is None  # no GPUs: no GPU time


def test_progress_logs_rate_limited_lines_and_no_repeats(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.accounting")
    accounting = RunAccounting(expected_rows=2)
    progress = Progress(accounting, interval=3600)
    accounting.add(to_table([_row(0)]))
    progress.update()  # the first rows: printed at once
    accounting.add(to_table([_row(1, "error")]))
    progress.update()  # within the interval: quiet
    progress.update(force=True)  # the end of the run
    progress.update(force=True)  # nothing new: no repeated line
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.accounting"]
    assert [line.split(" videos")[0] for line in lines] == [
        "[progress] rows 1/2 (50%; ok 1, error 0)",
        "[progress] rows 2/2 (100%; ok 1, error 1)",
    ]
    assert "ETA ?" in lines[0] and "done" in lines[1]


def test_steady_rate_speedup_batches_budget_warning_and_eta() -> None:
    accounting = RunAccounting(expected_rows=6, started=time.perf_counter() - 30.0, sparse_budget=200)
    timed = {"decode_seconds": 1.0, "prompt_tokens": 150}
    accounting.add(
        to_table([_row(0, **timed, dense_decode_seconds=2.0), _row(1, **timed, dense_decode_seconds=2.0)])
    )
    accounting.first_batch_at -= 4.0  # the first batch came 4 s before the second
    accounting.add(
        to_table([_row(2, **timed, dense_decode_seconds=8.0), _row(3, decode_seconds=1.0, prompt_tokens=900)])
    )
    summary = accounting.summary(gpus_per_actor=0)
    assert summary["startup_seconds"] == pytest.approx(26.0, abs=0.5)  # 30 s run, first batch after ~26 s
    assert summary["videos_per_s"] == pytest.approx(4 / 30, rel=0.05)  # wall clock, start-up included
    assert summary["steady_videos_per_s"] == pytest.approx(
        2 / 4.0, rel=0.05
    )  # 2 videos after the first batch
    assert summary["speedup"] == pytest.approx(12 / 3) and summary["speedup_batches"] == 2
    assert summary["speedup_median_batch"] == pytest.approx((2.0 + 8.0) / 2)  # median of 2.0 and 8.0
    assert summary["rows_budget_covers_prompt"] == 3  # prompts of 150 tokens within the budget of 200
    line = accounting.progress_line(recent_rate=0.5)
    assert "4/6 (67%" in line and "0.50 rows/s" in line and "ETA 4s" in line


def test_a_failed_part_write_is_retried_and_a_lasting_failure_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fsspec.implementations.local import LocalFileSystem

    from pipeline import sink as sink_module

    monkeypatch.setattr(sink_module, "COMMIT_BACKOFF", 0.0)
    real_pipe = LocalFileSystem.pipe_file
    calls = {"n": 0, "fail": 1}

    def flaky(self, path, value, **kwargs):
        calls["n"] += 1
        if calls["n"] <= calls["fail"]:
            raise OSError(5, "Input/output error", path)  # a transient storage fault
        return real_pipe(self, path, value, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", flaky)
    sink = ParquetSink(str(tmp_path / "out"), StorageOptions(), run_id="r", rows_per_file=1)
    sink.write(to_table([_row(0)]))  # the first attempt fails, the second commits
    assert calls["n"] == 2 and read_rows(str(tmp_path / "out"), StorageOptions()).num_rows == 1
    calls.update(n=0, fail=10)
    with pytest.raises(OSError, match="Input/output error"):
        sink.write(to_table([_row(1)]))  # every attempt fails: the run's caller reports it
    assert calls["n"] == sink_module.COMMIT_ATTEMPTS
    assert read_rows(str(tmp_path / "out"), StorageOptions()).num_rows == 1  # what was committed stays
