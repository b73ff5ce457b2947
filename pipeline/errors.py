"""The exceptions a job's edge handles.

Per-video problems never raise: they become rows with ``status="error"``. A :class:`PipelineError` is a
fault of the whole run (unreachable storage, a missing bucket, a malformed manifest) found before any
model loads; its message says what to fix. :class:`RunInterrupted` is SIGTERM turned into an exception
(as Python turns SIGINT into ``KeyboardInterrupt``), so a job stops cleanly and says so.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class PipelineError(RuntimeError):
    """A run-level fault, raised before work starts, with a message that says what to fix."""


class RunInterrupted(Exception):
    """The job received ``signal_name`` (``"SIGTERM"``; SIGINT arrives as ``KeyboardInterrupt``)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"interrupted by {signal_name}")
        self.signal_name = signal_name


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`RunInterrupted` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise RunInterrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
