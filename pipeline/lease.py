"""One run per output at a time: a lease object beside the output's rows.

``<output>/_lease.json`` names its holder (run id, host, pid), when it started and when it expires. A
run creates it with an exclusive create (a hard link of a complete file locally, which fails if the
lease exists; ``PutObject`` with ``If-None-Match: *`` on S3), renews it from a background thread every third of its time to live, and deletes it when the
run ends. A second run on the same output finds it and refuses at once, naming the holder, or waits for
it with ``--wait-for-lease``. A lease whose holder was killed stops being renewed and expires; the next
run takes it over with a conditional replace (``If-Match`` on the stale lease's ETag on S3, an atomic
rename of the stale file locally), so of two runs that find the same stale lease exactly one wins.

A run that loses its lease (it could not renew it in time and another run took over) is told so by
:meth:`OutputLease.lost`; the pipeline then stops and reports it, rather than writing beside a new holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from fsspec.asyn import sync

from pipeline.errors import PipelineError
from pipeline.storage import StorageOptions, get_fs, is_object_store

LEASE_NAME = "_lease.json"
DEFAULT_TTL = 60.0  # seconds a lease lives without renewal; renewed every TTL / 3
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object says."""

    run_id: str
    host: str
    pid: int
    token: str  # unique per acquisition: tells this holder's lease from a successor's
    started: float  # unix seconds
    expires: float

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.started, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        left = max(0.0, self.expires - time.time())
        return (
            f"run {self.run_id} on {self.host} (pid {self.pid}), started {started}, expires in {left:.0f} s"
        )

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # a torn or foreign file: treated as expired


class OutputLease:
    """The lease of one run on one output (a context manager: acquire on enter, release on exit)."""

    def __init__(
        self, output: str, storage: StorageOptions, run_id: str, ttl: float = DEFAULT_TTL, wait: bool = False
    ) -> None:
        self.output, self.storage, self.ttl, self.wait = output, storage, ttl, wait
        self.fs, root = get_fs(output.rstrip("/"), storage)
        self.path = f"{root}/{LEASE_NAME}"
        self.object_store = is_object_store(output)
        now = time.time()
        self.record = LeaseRecord(run_id, socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now + ttl)
        self._etag: str | None = None
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._created: list[str] = []  # local folders acquire made, innermost first

    # ------------------------------------------------------------------------------------ acquire
    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or raise PipelineError naming its holder (unless ``wait``: then poll)."""
        if not self.object_store:
            folder = self.path.rsplit("/", 1)[0]
            while not self.fs.exists(folder):  # the folders this run creates: removed again if left empty
                self._created.append(folder)
                folder = folder.rsplit("/", 1)[0]
        waited = False
        while True:
            if not self.object_store:  # each time: a holder that created the folder removes it when done
                self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
            if self._try_create():
                break
            holder, etag = self._read()
            if holder is None or holder.expires < time.time():
                if self._take_over(holder, etag):
                    log.warning(
                        "[lease] took over the expired lease of %s", holder.describe() if holder else "?"
                    )
                    break
                continue
            if not self.wait:
                raise PipelineError(
                    f"output {self.output} is in use by {holder.describe()}: wait for it to finish, pass "
                    "--wait-for-lease to wait, or write to another --output"
                )
            if not waited:
                log.info("[lease] waiting for %s", holder.describe())
                waited = True
            time.sleep(min(5.0, self.ttl / 4))
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewer", daemon=True)
        self._renewer.start()

    def lost(self) -> bool:
        """True once another run holds this output's lease (this run must stop writing)."""
        return self._lost.is_set()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this run's."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=10)
        holder, _ = self._read()
        if holder is not None and holder.token == self.record.token:
            self.fs.rm(self.path)
        for folder in self._created:  # a run that wrote nothing (a bad input, say) leaves nothing behind
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty: the run wrote there

    # ------------------------------------------------------------------------------------ storage
    def _fresh(self) -> LeaseRecord:
        now = time.time()
        return LeaseRecord(**{**self.record.__dict__, "expires": now + self.ttl})

    def _try_create(self) -> bool:
        """Exclusive create of the lease object; False if it exists."""
        record = self._fresh()
        try:
            if self.object_store:
                out = self.fs.call_s3("put_object", **self._key(), Body=record.encode(), IfNoneMatch="*")
                self._etag = out.get("ETag")
            else:  # written aside, then linked into place: the lease appears whole or not at all
                tmp = f"{self.path}.new-{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(record.encode())
                try:
                    os.link(tmp, self.path)
                finally:
                    os.remove(tmp)
        except FileExistsError:
            return False
        except OSError as exc:
            if self.object_store and "pre-conditions" in str(exc):  # 412 Precondition Failed
                return False
            raise
        self.record = record
        return True

    def _read(self) -> tuple[LeaseRecord | None, str | None]:
        try:
            if self.object_store:
                body, etag = sync(self.fs.loop, self._get_object)
                return LeaseRecord.decode(body), etag
            with open(self.path, "rb") as f:
                return LeaseRecord.decode(f.read()), None
        except FileNotFoundError:
            return None, None

    def _take_over(self, stale: LeaseRecord | None, etag: str | None) -> bool:
        """Replace an expired (or unreadable) lease; exactly one of several contenders succeeds."""
        record = self._fresh()
        if self.object_store:
            try:
                out = self.fs.call_s3("put_object", **self._key(), Body=record.encode(), IfMatch=etag or "*")
            except (OSError, FileNotFoundError):
                return False  # another run replaced it first (412), or it vanished: try again
            self._etag, self.record = out.get("ETag"), record
            return True
        aside = f"{self.path}.expired-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)  # atomic: of two contenders, one renames, the other finds nothing
        except FileNotFoundError:
            return False
        os.remove(aside)
        return self._try_create()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if not self._renew():
                self._lost.set()
                log.error("[lease] lost the lease of %s to another run: stopping", self.output)
                return

    def _renew(self) -> bool:
        """Extend this run's lease; False if another run holds it now."""
        holder, etag = self._read()
        if holder is None or holder.token != self.record.token:
            return False
        record = self._fresh()
        if self.object_store:
            try:
                out = self.fs.call_s3("put_object", **self._key(), Body=record.encode(), IfMatch=etag)
            except OSError:
                return False
            self._etag = out.get("ETag")
        else:
            tmp = f"{self.path}.renew-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(record.encode())
            os.replace(tmp, self.path)
        self.record = record
        return True

    async def _get_object(self) -> tuple[bytes, str]:
        """The lease's bytes and the ETag of exactly those bytes (one GET)."""
        out = await self.fs._call_s3("get_object", **self._key())
        async with out["Body"] as body:
            return await body.read(), out["ETag"]

    def _key(self) -> dict:
        bucket, _, key = self.path.partition("/")
        return {"Bucket": bucket, "Key": key}
