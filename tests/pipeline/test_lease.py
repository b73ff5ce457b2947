"""One run per output: the lease, locally and on a real S3 endpoint (moto's server), and the jobs behind it.

Contenders are real: threads racing for one lease object through the filesystem, and ``jobs.annotate``
runs on the session's local Ray against an output whose lease another run holds, or held and lost.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import annotate
from pipeline.errors import PipelineError
from pipeline.lease import LEASE_NAME, LeaseRecord, OutputLease
from pipeline.storage import StorageOptions


@pytest.fixture(params=["local", "s3"])
def output(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return f"s3://{request.getfixturevalue('s3_bucket')}/out"


def _lease(output: str, run_id: str, ttl: float = 1.5, wait: bool = False) -> OutputLease:
    return OutputLease(output, StorageOptions(), run_id, ttl=ttl, wait=wait)


def test_a_second_run_is_refused_naming_the_holder_until_the_first_ends(output: str) -> None:
    refused = pytest.raises(PipelineError, match=r"in use by run first on .* \(pid \d+\).*--wait-for-lease")
    with _lease(output, "first", ttl=30), refused:
        _lease(output, "second").acquire()
    with _lease(output, "second") as second:  # released: free again
        assert not second.lost()


def test_exactly_one_of_many_racing_runs_gets_the_lease(output: str) -> None:
    won, refused, start = [], [], threading.Barrier(6)

    def contend(i: int) -> None:
        lease = _lease(output, f"run{i}", ttl=30)
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except PipelineError:
            refused.append(i)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    won[0].release()


def test_a_renewed_lease_outlives_its_ttl_and_a_killed_holders_expires(output: str) -> None:
    holder = _lease(output, "holder", ttl=2.0)  # renewed every 0.67 s
    holder.acquire()
    time.sleep(3.0)  # past the first expiry: renewed in the background, still held
    with pytest.raises(PipelineError, match="in use by run holder"):
        _lease(output, "early").acquire()
    holder._stop.set()  # the holder is killed: nobody renews any more
    holder._renewer.join()
    time.sleep(2.2)  # past the last renewal's expiry
    with _lease(output, "successor") as successor:
        assert not successor.lost()
        assert holder._renew() is False  # the old holder would learn it lost the lease


def test_wait_for_lease_starts_once_the_holder_is_done(output: str) -> None:
    """The holder created the output folder and removes it, left empty, when it releases: the waiter
    still takes the lease (it once died there with FileNotFoundError, unseen in its thread)."""
    holder = _lease(output, "holder", ttl=30)
    holder.acquire()
    waiter = _lease(output, "waiter", wait=True)
    errors: list[BaseException] = []

    def acquire() -> None:
        try:
            waiter.acquire()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=acquire)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive()  # still waiting
    holder.release()
    thread.join(timeout=15)
    assert not thread.is_alive() and not errors and not waiter.lost(), errors
    record, _ = waiter._read()
    assert record is not None and record.run_id == "waiter"  # the lease is the waiter's now
    waiter.release()


@pytest.mark.slow
def test_annotate_refuses_a_held_output_and_takes_over_a_stale_lease(
    ray_local: str, model_dir: Path, tmp_path: Path, clip_bytes: dict, capsys
) -> None:
    (tmp_path / "clips").mkdir()
    for name in ("red-left.mp4", "blue-up.mp4"):
        (tmp_path / "clips" / name).write_bytes(clip_bytes[name])
    out = tmp_path / "out"
    out.mkdir()
    argv = ["--input", str(tmp_path / "clips"), "--output", str(out), "--model", str(model_dir),
            "--max-new-tokens", "4", "--dense-sample", "0"]  # fmt: skip
    with _lease(str(out), "cron-1", ttl=60):
        assert annotate.main(argv) == 2
        error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
        assert "is in use by run cron-1" in error
    assert not list(out.glob("part-*"))  # the refused run did no work
    stale = LeaseRecord("killed-run", "elsewhere", 1, "t", time.time() - 600, time.time() - 300)
    (out / LEASE_NAME).write_bytes(stale.encode())  # a run killed without releasing its lease
    assert annotate.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows_ok"] == 2 and not (out / LEASE_NAME).exists()  # released at the end
    assert sorted(pq.read_table(out)["id"].to_pylist()) == ["blue-up:caption", "red-left:caption"]


def test_a_lease_removes_the_folders_it_created_when_the_run_wrote_nothing(tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    with OutputLease(str(out), StorageOptions(), "r1"):
        assert (out / LEASE_NAME).exists()
    assert not (tmp_path / "new").exists()  # a run that failed at planning leaves no trace
    with OutputLease(str(out), StorageOptions(), "r2"):
        (out / "part-r2-00000.parquet").write_bytes(b"rows")
    assert (out / "part-r2-00000.parquet").exists() and not (out / LEASE_NAME).exists()
