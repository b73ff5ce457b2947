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


class RunInterrupted(BaseException):
    """The job received ``signal_name`` (``"SIGINT"`` or ``"SIGTERM"``). A ``BaseException``, like
    ``KeyboardInterrupt``, so that no library's ``except Exception`` (Ray Data's iterator has some)
    swallows it and lets the run go on."""

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


class SignalGuard:
    """While entered (main thread), SIGINT and SIGTERM raise :class:`RunInterrupted`, except inside
    :meth:`critical`, where the signal is remembered and raised as the section ends without an error:
    so a block of rows is written and counted together, or not at all. ``pending`` holds a signal that
    came in a section whose end did not raise it (``critical(raise_pending=False)``)."""

    def __init__(self) -> None:
        self.pending: str | None = None
        self._depth = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handler(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._depth:
            self.pending = self.pending or name
            return
        raise RunInterrupted(name)

    @contextlib.contextmanager
    def critical(self, raise_pending: bool = True) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if raise_pending and not self._depth and self.pending:
            name, self.pending = self.pending, None
            raise RunInterrupted(name)
