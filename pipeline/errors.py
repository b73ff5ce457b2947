"""The one exception type a user is meant to read.

Per-video problems never raise: they become rows with ``status="error"``. A :class:`PipelineError` is a
fault of the whole run (unreachable storage, a missing bucket, a malformed manifest) found before any
model loads; its message says what to fix.
"""

from __future__ import annotations


class PipelineError(RuntimeError):
    """A run-level fault, raised before work starts, with a message that says what to fix."""
