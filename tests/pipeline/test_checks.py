"""Run-level checks before any model loads, and a run that is stopped by a signal.

The checks are called directly (run id, output, cluster resources) and through ``jobs.caption`` on the
session's local Ray (2 CPUs, 1 logical GPU), where a run that cannot be scheduled must fail at once
instead of waiting forever. The interrupted run is real: a SIGTERM sent to this process while rows
stream in stops it, and what was received is committed and readable.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from jobs import caption
from pipeline.annotator import Annotator
from pipeline.checks import check_resources, check_run_id, check_writable
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.run import run_pipeline
from pipeline.storage import StorageOptions


def _last_json(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("run_id", ["nightly/1", "../up", ".hidden", "a b", "x" * 129, ""])
def test_run_ids_that_cannot_name_files_are_refused(run_id: str) -> None:
    with pytest.raises(PipelineError, match="--run-id"):
        check_run_id(run_id)


def test_run_ids_that_name_files_pass() -> None:
    for run_id in ("20261201T084054Z-a1b2c3", "nightly", "v1.2_rerun-3"):
        assert check_run_id(run_id) is None


def test_an_output_that_is_a_file_or_under_a_file_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(PipelineError, match="is a file, not a folder"):
        check_writable(str(tmp_path / "f"), StorageOptions())
    with pytest.raises(PipelineError, match="is a file, so the folder cannot be created"):
        check_writable(str(tmp_path / "f" / "out"), StorageOptions())
    check_writable(str(tmp_path / "new" / "deeper"), StorageOptions())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the probe left nothing, created nothing


def test_an_unwritable_output_is_refused_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(self, path, value, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(
        LocalFileSystem, "pipe_file", denied
    )  # as a read-only folder answers (tests run as root)
    with pytest.raises(PipelineError, match="is not writable .permission denied"):
        check_writable(str(tmp_path / "out"), StorageOptions())


def test_an_s3_output_is_probed_and_left_clean(s3_bucket: str) -> None:
    import s3fs

    check_writable(f"s3://{s3_bucket}/annotations/", StorageOptions())
    assert s3fs.S3FileSystem(skip_instance_cache=True).ls(s3_bucket, refresh=True) == []


def test_actors_must_leave_a_cpu_for_decoding_and_find_their_gpus() -> None:
    two_cpus = {"CPU": 2.0}
    check_resources(two_cpus, num_actors=1, gpus_per_actor=0.0)
    with pytest.raises(PipelineError, match="needs 2 CPU.*plus 1 for decoding.*has 2: pass --num-actors 1"):
        check_resources(two_cpus, num_actors=2, gpus_per_actor=0.0)
    with pytest.raises(PipelineError, match="needs 1 GPU.*has 0: pass --num-gpus 0"):
        check_resources({"CPU": 16.0}, num_actors=1, gpus_per_actor=1.0)
    check_resources({"CPU": 16.0, "GPU": 8.0}, num_actors=4, gpus_per_actor=2.0)
    check_resources({"CPU": 2.0}, num_actors=4, gpus_per_actor=1.0, wait_for_resources=True)  # autoscaling


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--num-actors", "2"], "--num-actors 2 needs 2 CPU"), (["--num-gpus", "2"], "needs 2 GPU")],
)
def test_a_run_that_cannot_be_scheduled_fails_at_once(
    argv: list[str], message: str, ray_local: str, model_dir: Path, tmp_path: Path, clip_bytes: dict, capsys
) -> None:
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(clip_bytes["red-left.mp4"])
    start = time.perf_counter()
    code = caption.main(["--input", str(tmp_path / "clips"), "--output", str(tmp_path / "out"),
                         "--model", str(model_dir), *argv])  # fmt: skip
    out = _last_json(capsys)
    assert code == 2 and out["status"] == "error" and message in out["error"], out
    assert time.perf_counter() - start < 60  # before any actor is started, not after a wait
    assert not list((tmp_path / "out").glob("part-*"))


class SlowAnnotator(Annotator):
    """The real annotator, a second slower per batch: the run is still streaming when the signal comes."""

    def __call__(self, batch):
        time.sleep(1.0)
        return super().__call__(batch)


def test_sigterm_stops_the_run_commits_what_arrived_and_says_interrupted(
    ray_local: str, model_dir: Path, tmp_path: Path, clip_bytes: dict
) -> None:
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(8):
        (clips / f"v{i}.mp4").write_bytes(clip_bytes["red-left.mp4"])
    out = tmp_path / "out"
    config = PipelineConfig(input=str(clips), output=str(out), model=str(model_dir), batch_size=1,
                            rows_per_file=1, max_new_tokens=2, dense_sample=0)  # fmt: skip

    def signal_after_the_first_part() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=signal_after_the_first_part, daemon=True)
    watcher.start()
    summary = run_pipeline(config, annotator_cls=SlowAnnotator)
    watcher.join()
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGTERM"
    assert 1 <= summary["rows"] < 8 and summary["files"] == summary["rows"]  # stopped early, rows kept
    ids = pq.read_table(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary["rows"]
    assert json.loads((out / "_summary.json").read_text())["status"] == "interrupted"


def decode_or_die(batch, sampling, storage):
    """The real decode stage, except that its worker dies (as one killed for memory would) on "poison"."""
    from pipeline.frames import decode_frames

    if any("poison" in str(uri) for uri in batch["video_uri"]):
        os._exit(1)
    return decode_frames(batch, sampling, storage)


@pytest.mark.slow
def test_a_video_whose_decode_task_keeps_dying_is_an_error_row_and_the_others_are_ok(
    ray_local: str, model_dir: Path, tmp_path: Path, clip_bytes: dict
) -> None:
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in ("a", "poison", "b"):
        (clips / f"{name}.mp4").write_bytes(clip_bytes["red-left.mp4"])
    config = PipelineConfig(input=str(clips), output=str(tmp_path / "out"), model=str(model_dir), batch_size=3,
                            max_new_tokens=2, dense_sample=0)  # fmt: skip
    summary = run_pipeline(config, decode_fn=decode_or_die)
    rows = {r["video_id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == ["a", "b", "poison"] and summary["rows"] == 3  # no item lost
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"  # the batch's other videos keep their rows
    assert rows["poison"]["status"] == "error" and "failed after its retries" in rows["poison"]["error"]
    assert summary["status"] == "ok" and summary["rows_error"] == 1


def test_a_signal_inside_a_critical_section_waits_for_its_end() -> None:
    """A block is written and counted together: the signal is raised after the section, not inside."""
    from pipeline.errors import RunInterrupted, SignalGuard

    done = []
    with SignalGuard() as guard:
        with pytest.raises(RunInterrupted, match="SIGTERM"), guard.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now, and must not have raised here
            done.append("written and counted")
        assert done == ["written and counted"]
        with pytest.raises(RunInterrupted, match="SIGINT"):  # outside a section: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
        with guard.critical(raise_pending=False):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert guard.pending == "SIGTERM"  # remembered for the summary, not raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
