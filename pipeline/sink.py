"""Atomic Parquet output and the resume set.

Layout of an output location::

    <output>/part-<run_id>-00000.parquet   committed row files (one run writes several)
    <output>/_summary.json                 the latest run's accounting
    <output>/_runs/<run_id>.json           every run's accounting
    <output>/_tmp/<run_id>/                files being written, per run (local filesystems only)
    <output>/_lease.json                   the running run's lease (``pipeline.lease``)

A row file is either complete or absent:

- on a local (or any non-object-store) filesystem it is written under ``_tmp/<run_id>/`` and renamed
  into place;
- on S3/GCS/Azure it is written straight to its key: an object becomes visible only when its single PUT
  or multipart upload completes, so a killed writer leaves nothing behind.

Readers (the resume set, the evaluation) read only ``part-*.parquet`` files directly under the output,
so a leftover ``_tmp/`` file is never trusted. The resume set is the set of ids with an ``ok`` row.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline.schema import SCHEMA, STATUS_OK, conform
from pipeline.storage import StorageOptions, get_fs, is_object_store, join

PART_PREFIX = "part-"
SUMMARY_NAME = "_summary.json"
COMMIT_ATTEMPTS = 3  # tries per part file before the run fails (and says so in its summary)
COMMIT_BACKOFF = 1.0  # seconds before the first retry; doubles after each
log = logging.getLogger(__name__)


class ParquetSink:
    """Buffers result rows and commits them as whole Parquet files of ``rows_per_file`` rows."""

    def __init__(self, output: str, storage: StorageOptions, run_id: str, rows_per_file: int = 256) -> None:
        self.output, self.storage, self.run_id = output.rstrip("/"), storage, run_id
        self.rows_per_file = rows_per_file
        self.fs, self.root = get_fs(self.output, storage)
        self.files: list[str] = []
        self._buffer: list[pa.Table] = []
        self._buffered = 0

    def write(self, table: pa.Table) -> None:
        """Add rows; every full ``rows_per_file`` is committed at once."""
        self._buffer.append(conform(table))
        self._buffered += table.num_rows
        while self._buffered >= self.rows_per_file:
            merged = pa.concat_tables(self._buffer)
            self._commit(merged.slice(0, self.rows_per_file))
            rest = merged.slice(self.rows_per_file)
            self._buffer, self._buffered = [rest], rest.num_rows

    def close(self) -> None:
        """Commit what is buffered (call once, after the last batch)."""
        if self._buffered:
            self._commit(pa.concat_tables(self._buffer))
        self._buffer, self._buffered = [], 0
        for tmp in (f"{self.root}/_tmp/{self.run_id}", f"{self.root}/_tmp"):
            if not is_object_store(self.output) and self.fs.isdir(tmp) and not self.fs.ls(tmp):
                self.fs.rmdir(tmp)

    def _commit(self, table: pa.Table) -> None:
        """Write one part file whole; a failed write is retried (COMMIT_ATTEMPTS in all, backing off)."""
        name = f"{PART_PREFIX}{self.run_id}-{len(self.files):05d}.parquet"
        sink = io.BytesIO()
        pq.write_table(table, sink)
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            try:
                self._put(name, sink.getvalue())
                break
            except OSError as exc:
                if attempt == COMMIT_ATTEMPTS:
                    raise
                log.warning(
                    "[sink] writing %s failed (%s); retrying (%d/%d)", name, exc, attempt, COMMIT_ATTEMPTS
                )
                time.sleep(COMMIT_BACKOFF * 2 ** (attempt - 1))
        self.files.append(join(self.output, name))

    def _put(self, name: str, data: bytes) -> None:
        final = f"{self.root}/{name}"
        if is_object_store(self.output):
            self.fs.pipe_file(final, data)
            return
        tmp_dir = f"{self.root}/_tmp/{self.run_id}"
        self.fs.makedirs(tmp_dir, exist_ok=True)
        tmp = f"{tmp_dir}/{name}.{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)


def part_files(output: str, storage: StorageOptions, run_id: str | None = None) -> list[str]:
    """Committed row files directly under ``output`` (of ``run_id`` only, if given), as fsspec paths,
    sorted; [] if ``output`` does not exist."""
    fs, root = get_fs(output.rstrip("/"), storage)
    if not fs.isdir(root):
        return []
    prefix = f"{PART_PREFIX}{run_id}-" if run_id else PART_PREFIX
    names = fs.ls(root, detail=False, refresh=True)
    return sorted(p for p in names if p.rsplit("/", 1)[-1].startswith(prefix) and p.endswith(".parquet"))


def read_rows(output: str, storage: StorageOptions, columns: list[str] | None = None) -> pa.Table:
    """All committed rows under ``output`` (an empty table of :data:`SCHEMA` when there are none)."""
    files = part_files(output, storage)
    if not files:
        return SCHEMA.empty_table().select(columns or SCHEMA.names)
    fs, _ = get_fs(output, storage)
    dataset = pads.dataset(files, schema=SCHEMA, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))
    return dataset.to_table(columns=columns)


def ok_ids(output: str, storage: StorageOptions) -> set[str]:
    """Ids that already have an ``ok`` row: the work a resumed or scheduled run skips."""
    table = read_rows(output, storage, columns=["id", "status"])
    ids: set[str] = set()
    for chunk in table.filter(pc.equal(table["status"], STATUS_OK)).column("id").chunks:
        for start in range(0, len(chunk), 65_536):  # no list of every id on the way to the set
            ids.update(chunk.slice(start, 65_536).to_pylist())
    return ids


def remove_outputs(output: str, storage: StorageOptions) -> int:
    """Delete committed row files and summaries (``--if-exists overwrite``); returns files removed."""
    files = part_files(output, storage)
    fs, root = get_fs(output.rstrip("/"), storage)
    for path in files:
        fs.rm(path)
    for extra in (f"{root}/{SUMMARY_NAME}", f"{root}/_runs", f"{root}/_tmp"):
        if fs.exists(extra):
            fs.rm(extra, recursive=True)
    return len(files)


def write_json(uri: str, payload: dict, storage: StorageOptions) -> None:
    """Write a small JSON document whole (temp + rename locally; one PUT on object stores)."""
    fs, path = get_fs(uri, storage)
    data = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()
    if is_object_store(uri):
        fs.pipe_file(path, data)
        return
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)
