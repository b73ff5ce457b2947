"""Run-level checks before any model loads, and a run that is stopped by a signal.

The checks are called directly (run id, output, cluster resources, a job's output location and its
input on a cluster) and through ``jobs.caption`` on the
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
from pipeline.checks import (
    JOB_SUBMISSION_ENV,
    check_output_location,
    check_resources,
    check_run_id,
    check_sample_input,
    check_writable,
    cluster_nodes,
    under_job_submission,
)
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


# What Ray's job supervisor puts in a submitted driver's environment (besides RAY_ADDRESS).
SUBMITTED = {JOB_SUBMISSION_ENV: '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}'}


def test_the_job_submission_marker_is_the_one_ray_sets_and_ray_job_id_is_stripped() -> None:
    """Pins the facts the check stands on to the installed Ray: the supervisor sets this variable for the
    driver it starts, and strips RAY_JOB_ID (an internal flag) from the driver's environment."""
    from ray._private import ray_constants
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    assert JOB_SUBMISSION_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR
    assert "RAY_JOB_ID" in ray_constants.RAY_INTERNAL_FLAGS
    assert under_job_submission(SUBMITTED)
    assert not under_job_submission({"RAY_ADDRESS": "http://head:8265", "RAY_JOB_ID": "01000000"})


@pytest.mark.parametrize("output", ["./out", "out", "runs/nightly", "file://out"])
def test_a_relative_output_under_ray_job_submit_is_refused(output: str) -> None:
    with pytest.raises(PipelineError, match="relative path.*ray job submit.*absolute path.*s3://"):
        check_output_location(output, SUBMITTED)


@pytest.mark.parametrize("output", ["/srv/out", "~/out", "file:///srv/out", "s3://b/out", "gs://b/out"])
def test_an_absolute_or_object_store_output_under_ray_job_submit_passes(output: str) -> None:
    assert check_output_location(output, SUBMITTED) is None


def test_a_relative_output_outside_ray_job_submit_is_the_users_own_folder() -> None:
    assert check_output_location("./out", {"RAY_ADDRESS": "http://head:8265"}) is None


ONE_NODE = {"CPU": 8.0, "node:10.0.0.1": 1.0, "node:__internal_head__": 1.0}
TWO_NODES = {"CPU": 16.0, "node:10.0.0.1": 1.0, "node:10.0.0.2": 1.0, "node:__internal_head__": 1.0}


def test_nodes_are_counted_from_their_node_resources() -> None:
    assert (cluster_nodes(ONE_NODE), cluster_nodes(TWO_NODES)) == (1, 2)
    assert cluster_nodes({"node:127.0.0.1": 3.0, "node:__internal_head__": 1.0}) == 3  # one address


def test_the_sample_input_runs_on_one_node_only() -> None:
    assert check_sample_input(None, ONE_NODE) is None  # a laptop, or `ray job submit` to a local head
    with pytest.raises(PipelineError, match="no --input on a Ray cluster of 2 nodes.*Pass --input"):
        check_sample_input(None, TWO_NODES)
    with pytest.raises(PipelineError, match="no --input on a cluster that adds nodes .--wait-for-resources"):
        check_sample_input(None, ONE_NODE, wait_for_resources=True)
    assert check_sample_input("s3://bucket/clips/", TWO_NODES, wait_for_resources=True) is None
