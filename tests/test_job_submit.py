"""`ray job submit` from this repository: what the working directory ships, and ``scripts/submit.py``.

The shipped package is built exactly as the pinned Ray builds ``--working-dir .`` (its own
``create_package`` with its default excludes, ``.gitignore`` and ``.rayignore``; a private API, so the
pin matters), once as the README's default command ships it and once with the README's excludes for
runs with ``--model``. The wrapper is driven through a fake job client that replays what Ray's
``JobSubmissionClient`` returns (log chunks, status, the driver's exit code), so exit codes and the
final JSON line are checked without a cluster.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.job_submission import JobStatus

from jobs._cli import EXIT_ERROR, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("submit", ROOT / "scripts" / "submit.py")
submit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(submit)


def _readme_model_excludes() -> list[str]:
    """The ``excludes`` of the README's ``--runtime-env-json`` for runs with ``--model``."""
    found = re.findall(r"--runtime-env-json '(\{[^']*\})'", (ROOT / "README.md").read_text())
    assert found, "the README shows no --runtime-env-json"
    excludes = {tuple(json.loads(text)["excludes"]) for text in found}
    assert len(excludes) == 1, f"the README's commands disagree: {excludes}"
    return list(excludes.pop())


def _shipped(tmp_path: Path, excludes: list[str]) -> dict[str, int]:
    """Path → size of every file ``ray job submit --working-dir .`` ships (with ``excludes``)."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / f"working_dir-{len(excludes)}-{hash(tuple(excludes))}.zip"  # Ray reuses a file there
    excludes = ray_constants.get_runtime_env_default_excludes() + excludes
    create_package(str(ROOT), package, include_gitignore=True, excludes=excludes)
    with zipfile.ZipFile(package) as zf:
        return {info.filename: info.file_size for info in zf.infolist() if not info.is_dir()}


def test_the_working_dir_ships_the_code_and_the_demo_weights_but_no_tests_or_figures(tmp_path: Path) -> None:
    files = _shipped(tmp_path, [])
    for needed in ("jobs/caption.py", "jobs/annotate.py", "pipeline/run.py", "std_core/decoder.py",
                   "pipeline/demo/model/model.safetensors", "pipeline/demo/model/config.json"):  # fmt: skip
        assert needed in files, needed
    for unneeded in ("tests/", "benchmarks/", ".ci/", "scripts/", ".venv/", ".git/", "out/", "bench-out/"):
        assert not [f for f in files if f.startswith(unneeded)], unneeded
    assert "BENCHMARKS.md" not in files and "cluster.yaml" not in files


def test_the_readme_excludes_leave_out_the_demo_weights_for_runs_with_a_model(tmp_path: Path) -> None:
    excludes = _readme_model_excludes()
    everything, code = _shipped(tmp_path, []), _shipped(tmp_path, excludes)
    assert not [f for f in code if f.startswith("pipeline/demo/model/")]
    assert set(everything) - set(code) == {f for f in everything if f.startswith("pipeline/demo/model/")}
    weights = sum(size for f, size in everything.items() if f.startswith("pipeline/demo/model/"))
    weights_file = (ROOT / "pipeline/demo/model/model.safetensors").stat().st_size  # 8 MB
    assert weights >= weights_file and sum(code.values()) < 4 << 20  # the weights left out, not the code


# --- scripts/submit.py ------------------------------------------------------------------------------

SUMMARY = {"status": "incomplete", "rows": 3, "rows_expected": 4}


class FakeJobs:
    """What ``JobSubmissionClient`` answers for one job: its log (in chunks), status and exit code."""

    def __init__(self, chunks: list[str], status: str, exit_code: int | None, message: str | None = None,
                 tail_breaks: bool = False) -> None:  # fmt: skip
        self.chunks, self.status, self.exit_code = chunks, JobStatus(status), exit_code
        self.message, self.tail_breaks = message, tail_breaks
        self.submitted: dict = {}

    def submit_job(self, **kwargs) -> str:
        self.submitted = kwargs
        return "raysubmit_test"

    async def tail_job_logs(self, job_id: str):
        for chunk in self.chunks[: 1 if self.tail_breaks else None]:
            yield chunk
        if self.tail_breaks:
            raise RuntimeError("Websocket closed unexpectedly")

    def get_job_status(self, job_id: str) -> JobStatus:
        return self.status

    def get_job_logs(self, job_id: str) -> str:
        return "".join(self.chunks)

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        return SimpleNamespace(status=self.status, driver_exit_code=self.exit_code, message=self.message)


def _job_log(summary: dict) -> list[str]:
    """A job's log as Ray streams it: our lines, the final JSON line, Ray's own lines after it, the
    chunks cut in the middle of lines."""
    text = ("[plan] 4 items; 0 done\n[run] 1 actor(s)\n" + json.dumps(summary) + "\n"
            "(raylet) [2026-12-01 12:00:00] worker exited\nINFO sdk.py -- WebSocket closed\n")  # fmt: skip
    return [text[:30], text[30:75], text[75:]]


def _run(fake: FakeJobs, argv: list[str] | None = None) -> tuple[int, list[str]]:
    args, command = submit.parse_args(argv or ["--working-dir", ".", "--", "python", "-m", "jobs.annotate"])
    out = io.StringIO()
    code = submit.run(fake, args, command, out)
    return code, out.getvalue().splitlines()


def test_the_flags_before_the_separator_are_the_wrappers_and_the_command_follows_it() -> None:
    args, command = submit.parse_args(["--address", "http://head:8265", "--working-dir", ".",
                                       "--runtime-env-json", '{"excludes": ["/pipeline/demo/model/"]}',
                                       "--", "python", "-m", "jobs.caption", "--prompt", "a b"])  # fmt: skip
    assert args.address == "http://head:8265" and command[-2:] == ["--prompt", "a b"]
    assert submit.runtime_env(args) == {"excludes": ["/pipeline/demo/model/"], "working_dir": "."}
    fake = FakeJobs(_job_log({"status": "ok"}), "SUCCEEDED", 0)
    submit.run(fake, args, command, io.StringIO())
    assert fake.submitted["entrypoint"] == "python -m jobs.caption --prompt 'a b'"  # quoted, as typed


@pytest.mark.parametrize(
    "argv", [["--working-dir", "."], ["--working-dir", ".", "--"], ["--runtime-env-json", "[1]", "--", "x"]]
)
def test_a_missing_command_or_a_bad_runtime_env_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        submit.parse_args(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("status", "ray_status", "driver_code", "expected"),
    [
        ("ok", "SUCCEEDED", EXIT_OK, 0),
        ("incomplete", "FAILED", EXIT_INCOMPLETE, 1),
        ("error", "FAILED", EXIT_ERROR, 2),
        ("failed", "FAILED", EXIT_FAILED, 3),
        ("interrupted", "FAILED", 130, 130),
        ("interrupted", "STOPPED", 143, 143),
        ("interrupted", "STOPPED", -15, 143),
    ],  # fmt: skip
)
def test_the_log_ends_with_the_jobs_json_line_and_the_exit_code_is_the_jobs(
    status: str, ray_status: str, driver_code: int, expected: int
) -> None:
    summary = {**SUMMARY, "status": status}
    code, lines = _run(FakeJobs(_job_log(summary), ray_status, driver_code))
    assert code == expected and json.loads(lines[-1]) == summary


def test_a_broken_log_stream_still_ends_with_the_summary_and_code() -> None:
    code, lines = _run(FakeJobs(_job_log(SUMMARY), "FAILED", EXIT_INCOMPLETE, tail_breaks=True))
    assert code == EXIT_INCOMPLETE and json.loads(lines[-1]) == SUMMARY


def test_a_job_whose_driver_never_ran_is_an_error_with_rays_message() -> None:
    fake = FakeJobs(["Runtime env is setting up.\n"], "FAILED", None, message="Failed to set up runtime env")
    code, lines = _run(fake)
    out = json.loads(lines[-1])
    assert code == EXIT_ERROR and out["status"] == "error" and "runtime env" in out["error"]
    stopped = FakeJobs([], "STOPPED", None)
    code, lines = _run(stopped)
    assert code == 143 and json.loads(lines[-1])["status"] == "interrupted"


def test_a_job_that_cannot_be_submitted_is_an_error() -> None:
    class Unreachable(FakeJobs):
        def submit_job(self, **kwargs) -> str:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job")

    code, lines = _run(Unreachable([], "PENDING", None))
    out = json.loads(lines[-1])
    assert code == EXIT_ERROR and out["status"] == "error" and "No available agent" in out["error"]


def test_interrupting_the_wrapper_leaves_the_job_running_and_says_so() -> None:
    class CtrlC(FakeJobs):
        async def tail_job_logs(self, job_id: str):
            yield "[plan] 4 items\n"
            raise KeyboardInterrupt

    code, lines = _run(CtrlC([], "RUNNING", None))
    out = json.loads(lines[-1])
    assert code == 130 and out["status"] == "interrupted" and "ray job stop raysubmit_test" in out["error"]
