"""How a job ends: the exit code of every status, one JSON line on stdout, everything else on stderr."""

from __future__ import annotations

import json

import pytest

from jobs._cli import run_main
from pipeline.errors import PipelineError, RunInterrupted


def _ran(capsys: pytest.CaptureFixture, body) -> tuple[int, list[str], str]:
    code = run_main(body)
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


@pytest.mark.parametrize(
    ("result", "code"),
    [
        ({"status": "ok"}, 0),
        ({"status": "planned"}, 0),
        ({"status": "incomplete"}, 1),
        ({"status": "failed", "error": "OSError: disk"}, 3),
        ({"status": "interrupted", "signal": "SIGINT"}, 130),
        ({"status": "interrupted", "signal": "SIGTERM"}, 143),
    ],
)
def test_each_status_has_its_exit_code(result: dict, code: int, capsys) -> None:
    got, lines, _ = _ran(capsys, lambda: result)
    assert got == code and [json.loads(line) for line in lines] == [result]


def test_a_run_level_fault_a_bug_and_an_interrupt_each_end_with_one_json_line(capsys) -> None:
    def fault() -> dict:
        raise PipelineError("--output x is a file, not a folder")

    def bug() -> dict:
        raise RuntimeError("boom")

    def interrupted() -> dict:
        raise RunInterrupted("SIGTERM")

    errors = {}
    for body, code, status in ((fault, 2, "error"), (bug, 3, "failed"), (interrupted, 143, "interrupted")):
        got, lines, errors[status] = _ran(capsys, body)
        assert got == code and len(lines) == 1 and json.loads(lines[0])["status"] == status, (body, lines)
    assert "RuntimeError: boom" in errors["failed"]  # the bug's traceback goes to stderr, for the log


def test_what_a_job_prints_goes_to_stderr_and_stdout_keeps_the_json_line(capsys) -> None:
    def chatty() -> dict:
        print("Ray: some message of its own")
        return {"status": "ok"}

    code, lines, err = _ran(capsys, chatty)
    assert code == 0 and lines == ['{"status": "ok"}'] and "some message of its own" in err
