"""Submit a job to a Ray cluster, follow its log, and end as the job itself ends: its final JSON line last
on stdout, and its exit code.

``ray job submit`` prints lines of its own after the job's output and exits 1 for every kind of failure,
so a scheduler's log does not end with the job's summary, and exit codes 2 (could not start), 3 (failed)
and 128 + signal (interrupted) all come back as 1. This wrapper, run where ``ray job submit`` would be:

1. submits the command after ``--`` with the working directory and runtime env given (what ``ray job
   submit`` does; ``.rayignore`` and ``.gitignore`` apply to the working directory the same way);
2. streams the job's log to stderr until the job ends;
3. prints the job's final JSON line (the last line of its log that is a JSON object with a ``status``)
   as the last stdout line, and exits with the driver's exit code (``jobs/_cli.py``: 0 ok or planned,
   1 incomplete, 2 error, 3 failed, 128 + signal interrupted).

A job that was not submitted (no cluster, no jobs agent yet) or never ran its driver (its runtime env
failed to set up, say) ends with ``{"status": "error"}`` and exit 2; one stopped before its driver
started (``ray job stop``) with ``"interrupted"`` and 143. If this wrapper is interrupted (Ctrl-C), it
stops following, says so and exits 130; the job keeps running.

    .venv/bin/python scripts/submit.py --address http://head:8265 --working-dir . -- \\
        python -m jobs.annotate --input s3://bucket/incoming/ --output s3://bucket/annotations/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from jobs._cli import EXIT_ERROR, EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK

STATUS_BY_CODE = {EXIT_OK: "ok", EXIT_INCOMPLETE: "incomplete", EXIT_ERROR: "error", EXIT_FAILED: "failed"}
POLL_SECONDS = 2.0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The wrapper's own flags, and the job's command (everything after ``--``, which is required)."""
    parser = argparse.ArgumentParser(
        prog="submit.py", usage="%(prog)s [flags] -- <command>", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--address", help="The jobs API, e.g. http://head:8265 (default: RAY_ADDRESS).")
    parser.add_argument("--working-dir", help="Local directory (or .zip URI) shipped to the job.")
    parser.add_argument(
        "--runtime-env-json",
        type=json.loads,
        default={},
        help='Runtime env as JSON, e.g. \'{"excludes": ["/pipeline/demo/model/"]}\'.',
    )
    parser.add_argument("--submission-id", help="The job's id (default: one Ray generates).")
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    if not command:
        parser.error("put the job's command after --, e.g. -- python -m jobs.annotate --input ...")
    if not isinstance(args.runtime_env_json, dict):
        parser.error("--runtime-env-json must be a JSON object")
    return args, command


def runtime_env(args: argparse.Namespace) -> dict[str, Any]:
    """``--runtime-env-json`` with ``--working-dir`` in it (the flag wins, as in ``ray job submit``)."""
    env = dict(args.runtime_env_json)
    if args.working_dir:
        env["working_dir"] = args.working_dir
    return env


def exit_code(ray_status: str, driver_exit_code: int | None) -> int:
    """The job's exit code: the driver's (a negative code, killed by signal n, is 128 + n), or, where no
    driver ran, 0 for a success, 143 for a stopped job and 2 for a job that could not start."""
    if driver_exit_code is not None:
        return 128 - driver_exit_code if driver_exit_code < 0 else driver_exit_code
    return {"SUCCEEDED": 0, "STOPPED": 128 + signal.SIGTERM}.get(ray_status, EXIT_ERROR)


def final_json(lines: Iterable[str]) -> str | None:
    """The last line that is a JSON object with a ``status``: the job's summary (``jobs/_cli.py``)."""
    found = None
    for line in lines:
        text = line.strip()
        if not text.startswith("{"):
            continue
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and "status" in value:
            found = text
    return found


def fallback_json(submission_id: str, ray_status: str, code: int, message: str | None) -> str:
    """What to print where the job printed no JSON line (its driver never ran, or died abruptly)."""
    status = "interrupted" if code >= 128 else STATUS_BY_CODE.get(code, "failed")
    result = {"status": status, "submission_id": submission_id, "ray_job_status": ray_status}
    if code >= 128:
        result["signal"] = signal.Signals(code - 128).name
    if message and code:
        result["error"] = message
    return json.dumps(result)


class _Lines:
    """Log chunks → whole lines, keeping only the last JSON summary seen (a log can be long)."""

    def __init__(self) -> None:
        self.partial = ""
        self.summary: str | None = None

    def feed(self, chunk: str) -> None:
        *lines, self.partial = (self.partial + chunk).split("\n")
        self.summary = final_json(lines) or self.summary

    def close(self) -> str | None:
        self.summary = final_json([self.partial]) or self.summary
        return self.summary


def follow(client: Any, submission_id: str, log: TextIO) -> str | None:
    """Stream the job's log to ``log`` until it ends; return its final JSON line (None if none). If the
    log stream breaks, wait for the end by polling and read the whole log once."""
    lines = _Lines()

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            log.write(chunk)
            log.flush()
            lines.feed(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # the stream broke (Ray raises RuntimeError, aiohttp its own errors)
        print(f"submit.py: log stream ended ({exc}); waiting for the job", file=sys.stderr)
        while not client.get_job_status(submission_id).is_terminal():
            time.sleep(POLL_SECONDS)
        return final_json(client.get_job_logs(submission_id).splitlines())
    while not client.get_job_status(submission_id).is_terminal():  # the stream can end a moment early
        time.sleep(POLL_SECONDS)
    return lines.close()


def run(client: Any, args: argparse.Namespace, command: list[str], out: TextIO = sys.stdout) -> int:
    """Submit, follow, print the final JSON line on ``out``; return the exit code."""
    try:
        submission_id = client.submit_job(
            entrypoint=shlex.join(command), runtime_env=runtime_env(args), submission_id=args.submission_id
        )
    except Exception as exc:  # the cluster refused or could not be reached: the job never started
        print(f"submit.py: the job was not submitted: {exc}", file=sys.stderr)
        print(json.dumps({"status": "error", "error": f"not submitted: {type(exc).__name__}: {exc}"}),
              file=out, flush=True)  # fmt: skip
        return EXIT_ERROR
    print(f"submit.py: submitted {submission_id}", file=sys.stderr, flush=True)
    try:
        summary = follow(client, submission_id, sys.stderr)
    except KeyboardInterrupt:
        note = f"stopped following; the job keeps running (ray job stop {submission_id})"
        result = {"status": "interrupted", "signal": "SIGINT", "submission_id": submission_id, "error": note}
        print(json.dumps(result), file=out, flush=True)
        return 128 + signal.SIGINT
    info = client.get_job_info(submission_id)
    ray_status = str(info.status)
    code = exit_code(ray_status, info.driver_exit_code)
    print(summary or fallback_json(submission_id, ray_status, code, info.message), file=out, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    from ray.job_submission import JobSubmissionClient

    return run(JobSubmissionClient(args.address), args, command)


if __name__ == "__main__":
    sys.exit(main())
