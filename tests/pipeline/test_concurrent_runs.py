"""Two runs on one output, for real: ``jobs.annotate`` processes started side by side on one local and
one S3 output (moto's server), against the session's Ray. One does the work; one started without
``--wait-for-lease`` refuses at once naming the holder; one that waits finds the work done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs

from pipeline.lease import LEASE_NAME
from pipeline.sink import read_rows
from pipeline.storage import StorageOptions

ROOT = Path(__file__).resolve().parents[2]
CLIPS = ("red-left.mp4", "blue-up.mp4", "green-right.mp4")


def _start(argv: list[str], ray_address: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "jobs.annotate", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, dict]:
    out, err = process.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    assert lines, f"no JSON line (exit {process.returncode}): {err[-2000:]}"
    if process.returncode < 0:  # killed by a signal after its JSON line (two CI runs: SIGABRT)
        print(f"exit {process.returncode}; stderr tail:\n{err[-3000:]}", file=sys.stderr)
    return process.returncode, json.loads(lines[-1])


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_on_one_output_do_the_work_once(
    ray_local: str,
    model_dir: Path,
    tmp_path: Path,
    clip_bytes: dict,
    s3_endpoint: str,
    s3_bucket: str,
    where: str,
) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for name in CLIPS:
        (clips / name).write_bytes(clip_bytes[name])
    if where == "local":
        output = str(tmp_path / "out")
        fs, lease = None, tmp_path / "out" / LEASE_NAME
    else:
        output = f"s3://{s3_bucket}/annotations"
        fs, lease = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True), None
    argv = ["--input", str(clips), "--output", output, "--model", str(model_dir), "--max-new-tokens", "4",
            "--dense-sample", "0"]  # fmt: skip
    first = _start([*argv, "--run-id", "first"], ray_local)
    deadline = time.monotonic() + 120
    while not (lease.exists() if lease else fs.exists(f"{s3_bucket}/annotations/{LEASE_NAME}")):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never took the lease"
        time.sleep(0.2)
    waiting = _start([*argv, "--run-id", "waiting", "--wait-for-lease"], ray_local)
    refused = _start([*argv, "--run-id", "refused"], ray_local)

    code, summary = _finish(refused)
    assert code == 2 and "is in use by run first" in summary["error"]
    assert first.poll() is None  # refused while the first run still works
    code, summary = _finish(first)
    assert code == 0 and summary["status"] == "ok" and summary["rows_ok"] == len(CLIPS)
    code, summary = _finish(waiting)
    assert code == 0 and summary["status"] == "ok"
    assert (
        summary["items_skipped"] == len(CLIPS) and summary["rows_expected"] == 0
    )  # waited, then found it done

    table = read_rows(output, StorageOptions(endpoint_url=s3_endpoint if fs else None))
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(f"{Path(n).stem}:caption" for n in CLIPS)  # each once
    assert set(table["status"].to_pylist()) == {"ok"} and set(table["run_id"].to_pylist()) == {"first"}
