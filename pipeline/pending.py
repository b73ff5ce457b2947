"""A run's pending items, chunk by chunk: where planning leaves them and how the read stage finds them.

Planning (``pipeline.run.plan_run``) reads the input in chunks of records; each chunk's pending items
(the resume set and ``--limit`` applied, as a table of ``ITEM_SCHEMA``) go to a :class:`PendingStore`
as soon as they are read; in a run the store is the object store, so the driver holds one chunk at a
time, never the whole plan:

- :class:`ObjectStorePending` (a run): each chunk goes to Ray's object store as zstd-compressed Arrow
  IPC. The driver owns the objects and every node can read them; the driver keeps one small handle
  per chunk (an ``ObjectRef`` and two counts). Compressed, because the driver process maps the object
  store pages it writes: they count in its resident memory for as long as the run holds the objects.
- :class:`InDriverPending` (tests, the stage benchmark, ``plan_run``'s default): the tables themselves.
- :class:`CountingPending` (``--dry-run``): nothing kept, only the counts.

A video's items are adjacent and lie in one chunk (they come from one input record), so video ``v`` of
the plan is the video ``v - video_offsets[c]`` of chunk ``c``, where ``video_offsets`` is the running
count of videos over the chunks (:func:`chunk_spans`). The read stage (:func:`read_video_rows`, Ray
tasks) cuts its videos' rows from the chunks it needs; :func:`task_sizes` decides how many videos a read
task and a decode task take. Each item travels with its *ordinal*, its place in the plan; the annotate
stage (:class:`Annotate`) tags every result row with it, the driver keeps one bit per item
(:class:`ReceivedItems`), and :func:`lost_items` finds the items no result row came back for.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from pipeline.sources import ITEM_SCHEMA, items_from_json, items_from_table, video_rows

PACK_CODEC = "zstd"  # ~10x on synthetic manifests (ids and URIs repeat their prefixes); 10 ms a chunk to read
MAX_READ_TASKS = 10_000  # read tasks of a run; one video per decode task up to this many (task_sizes)
ORDINAL = "_ordinal"  # the annotate stage's extra column: each result row's item ordinal (Annotate)
ACTOR = "_actor"  # ... the id of the actor that made the row (Annotate)
ACTOR_SECONDS = "_actor_seconds"  # ... and how long that actor had lived when it returned the row's batch
STAGE_COLUMNS = (ORDINAL, ACTOR, ACTOR_SECONDS)  # what the driver reads and drops before writing
PIECE_ITEMS = 8_192  # items per stored chunk (cut at video boundaries): what a read task unpacks per chunk


@dataclass(frozen=True)
class PendingChunk:
    """One chunk of pending items as the driver keeps it: the store's handle and two counts."""

    handle: object  # what PendingStore.put returned: an ObjectRef, a table, or None
    items: int
    videos: int


class PendingStore(Protocol):
    """Where planning puts each chunk of pending items (``put``) and whence they are read (``get``)."""

    def put(self, items: pa.Table) -> object: ...

    def get(self, handle: object) -> pa.Table: ...


class InDriverPending:
    """Keeps the tables in the driver (small plans: tests, the stage benchmark)."""

    def put(self, items: pa.Table) -> object:
        return items

    def get(self, handle: object) -> pa.Table:
        assert isinstance(handle, pa.Table)
        return handle


class CountingPending:
    """Keeps nothing (``--dry-run`` reports counts and the first ids only)."""

    def put(self, items: pa.Table) -> object:
        return None

    def get(self, handle: object) -> pa.Table:
        raise RuntimeError("a counted plan (--dry-run) keeps no items")


class ObjectStorePending:
    """Each chunk in Ray's object store, compressed (see the module docstring). Starts Ray (or joins the
    cluster of ``RAY_ADDRESS``) on the first chunk, so a run with nothing to do never starts it."""

    def put(self, items: pa.Table) -> object:
        import ray

        from pipeline.run import init_ray

        init_ray()
        return ray.put(pack(items))

    def get(self, handle: object) -> pa.Table:
        import ray

        return unpack(ray.get(handle))


def pieces(items: pa.Table, size: int | None = None) -> Iterator[tuple[pa.Table, int]]:
    """``items`` cut into pieces of about ``size`` (default :data:`PIECE_ITEMS`) items at video
    boundaries (a video longer than ``size`` stays whole), each with its number of videos."""
    size = size or PIECE_ITEMS
    starts = video_starts(items)
    cuts = np.unique(np.searchsorted(starts, np.arange(size, items.num_rows, size), side="left"))
    bounds = [0, *(int(c) for c in cuts if 0 < c < len(starts) - 1), len(starts) - 1]  # video indices
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        yield items.slice(starts[lo], starts[hi] - starts[lo]), hi - lo


def pack(items: pa.Table) -> pa.Buffer:
    """``items`` as one compressed Arrow IPC stream (one record batch: one dictionary per column)."""
    sink = pa.BufferOutputStream()
    options = ipc.IpcWriteOptions(compression=PACK_CODEC)
    with ipc.new_stream(sink, ITEM_SCHEMA, options=options) as writer:
        writer.write_table(items.combine_chunks())
    return sink.getvalue()


def unpack(data: pa.Buffer | bytes) -> pa.Table:
    return ipc.open_stream(pa.py_buffer(data) if isinstance(data, bytes) else data).read_all()


def video_starts(items: pa.Table) -> np.ndarray:
    """Where each video's items start in ``items`` (a video's items are adjacent), and the end."""
    ids = items.column("video_id")
    n = len(ids)
    if n < 2:
        return np.arange(n + 1, dtype=np.int64)
    change = pc.not_equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(change) + 1, [n]]).astype(np.int64)


def _starts(counts: list[int]) -> np.ndarray:
    """Running starts of consecutive spans of ``counts``, then their total: [len(counts) + 1] int64."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


def video_offsets(chunks: tuple[PendingChunk, ...] | list[PendingChunk]) -> np.ndarray:
    """The plan's index of each chunk's first video, and the plan's video count: [len(chunks) + 1]."""
    return _starts([c.videos for c in chunks])


def item_offsets(chunks: tuple[PendingChunk, ...] | list[PendingChunk]) -> np.ndarray:
    """The ordinal of each chunk's first item (its place in the plan), and the plan's item count."""
    return _starts([c.items for c in chunks])


def segments(chunks: tuple[PendingChunk, ...], videos: int) -> list[tuple[PendingChunk, ...]]:
    """The plan's chunks cut into runs of whole chunks of about ``videos`` videos (``--segment-videos``):
    a run executes one Ray Dataset per segment, one after the other.
    Ray Data keeps a record per output block of each stage until its dataset ends (~2.2 KB a block,
    ray-project/ray#66016), so one dataset for a whole 10M-video run would grow the driver by ~1 GB;
    a segment's records go when it ends. The cost: each segment starts its own actor pool (the model is
    loaded again) and drains before the next starts."""
    cut: list[tuple[PendingChunk, ...]] = []
    current: list[PendingChunk] = []
    count = 0
    for chunk in chunks:
        current.append(chunk)
        count += chunk.videos
        if count >= videos:
            cut.append(tuple(current))
            current, count = [], 0
    return [*cut, tuple(current)] if current else cut


def chunk_spans(offsets: np.ndarray, first: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The chunks that hold the plan's videos ``[first, end)``: (chunk, first video in it, end in it)."""
    assert 0 <= first <= end <= offsets[-1], (first, end, offsets[-1])
    c = int(np.searchsorted(offsets, first, side="right")) - 1
    while first < end:
        stop = min(end, int(offsets[c + 1]))
        if stop > first:
            yield c, first - int(offsets[c]), stop - int(offsets[c])
        first, c = stop, c + 1


# --- the read stage -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSizes:
    """How the plan's videos split into Ray tasks (:func:`task_sizes`)."""

    decode_videos: int  # videos per decode task (and per block after the read stage)
    read_videos: int  # videos per read task: a whole number of decode blocks
    read_tasks: int


def task_sizes(videos: int, batch_size: int) -> TaskSizes:
    """One video per decode task up to MAX_READ_TASKS videos; beyond, ``videos / MAX_READ_TASKS`` but at
    most ``batch_size`` (a batch per decode task); a read task cuts as many decode blocks as keeps the
    read tasks within MAX_READ_TASKS (Ray Data holds every read task's description from the start)."""
    decode = min(max(batch_size, 1), max(1, math.ceil(videos / MAX_READ_TASKS)))
    read = decode * max(1, math.ceil(videos / (MAX_READ_TASKS * decode)))
    return TaskSizes(decode, read, math.ceil(videos / read))


def chunk_refs(store: PendingStore, chunks: Iterable[PendingChunk]) -> list:
    """The object refs of ``chunks`` (chunks kept in the driver are put into the object store here)."""
    if isinstance(store, ObjectStorePending):
        return [chunk.handle for chunk in chunks]
    to_ray = ObjectStorePending()
    return [to_ray.put(store.get(chunk.handle)) for chunk in chunks]


def read_video_rows(
    batch: dict[str, np.ndarray], chunks: list, offsets: np.ndarray, per_task: int, item_offsets: np.ndarray
) -> pa.Table:
    """Read stage (Ray tasks): the video rows (:func:`pipeline.sources.video_rows`) of read task
    ``batch["id"]``'s videos (``per_task`` of them from ``id * per_task``), cut from the chunks of
    pending items in the object store (``chunks``: their refs; ``offsets``: :func:`video_offsets`).
    Each item carries its ordinal, its place in the plan (``item_offsets``: :func:`item_offsets`)."""
    import ray

    rows: list[dict] = []
    for task in batch["id"]:
        first, end = int(task) * per_task, min((int(task) + 1) * per_task, int(offsets[-1]))
        for c, lo, hi in chunk_spans(offsets, first, end):
            items = unpack(ray.get(chunks[c]))
            starts = video_starts(items)
            span = items.slice(starts[lo], starts[hi] - starts[lo])
            rows += video_rows(items_from_table(span, first_ordinal=int(item_offsets[c] + starts[lo])))
    return pa.Table.from_pylist(rows)


class Annotate:
    """The annotate stage (a Ray actor): ``annotator_cls(settings)`` on each batch of video rows, its
    result rows (one per item, by id) tagged with their item's ordinal in :data:`ORDINAL`, which the
    driver reads into :class:`ReceivedItems`, and with this actor's id and age (:data:`ACTOR`,
    :data:`ACTOR_SECONDS`: seconds since it started, model load included), from which the driver counts
    the accelerator time the actors really held. The driver drops them before writing. An annotator's
    contract stays "one row per item, with the item's id"."""

    def __init__(self, annotator_cls: type, settings: object) -> None:
        self.started = time.monotonic()  # the actor holds its GPU from here, while the model loads too
        self.actor_id = uuid.uuid4().hex[:16]
        self.annotator = annotator_cls(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        table = self.annotator(batch)
        ordinals = {item.id: item.ordinal for text in batch["items"] for item in items_from_json(str(text))}
        ids = table.column("id").to_pylist()
        table = table.append_column(ORDINAL, pa.array([ordinals[i] for i in ids], pa.int64()))
        age = time.monotonic() - self.started
        table = table.append_column(ACTOR, pa.array([self.actor_id] * len(ids), pa.string()))
        return table.append_column(ACTOR_SECONDS, pa.array([age] * len(ids), pa.float64()))


class ReceivedItems:
    """Which of a plan's items a result row came back for: one bit per item, by ordinal (10M items:
    1.25 MB, where their ids took ~26 bytes each). A row that comes back twice sets its bit once."""

    def __init__(self, items: int) -> None:
        self.items = items
        self._bits = np.zeros((items + 7) // 8, dtype=np.uint8)

    def add(self, ordinals: pa.Array | pa.ChunkedArray | np.ndarray) -> None:
        at = np.asarray(ordinals, dtype=np.int64)
        if at.size and (at.min() < 0 or at.max() >= self.items):
            raise ValueError(f"item ordinals outside the plan's {self.items} items")
        np.bitwise_or.at(self._bits, at >> 3, np.left_shift(1, at & 7).astype(np.uint8))

    def missing(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The ordinals in ``[start, stop)`` that no row came back for."""
        stop = self.items if stop is None else stop
        lo, hi = start >> 3, (stop + 7) >> 3
        got = np.unpackbits(self._bits[lo:hi], bitorder="little")[start - 8 * lo : stop - 8 * lo]
        return np.flatnonzero(got == 0) + start

    def complete(self) -> bool:
        return self.missing().size == 0


def lost_items(store: PendingStore, chunks: tuple[PendingChunk, ...], received: ReceivedItems) -> pa.Table:
    """The pending items no result row came back for (``received``). Only the chunks that miss some are
    read back from the store."""
    lost = []
    starts = item_offsets(chunks)
    for c, chunk in enumerate(chunks):
        missing = received.missing(int(starts[c]), int(starts[c + 1]))
        if missing.size:
            lost.append(store.get(chunk.handle).take(pa.array(missing - starts[c])))
    return pa.concat_tables(lost).unify_dictionaries() if lost else ITEM_SCHEMA.empty_table()
