"""A bounded driver: planning hands each chunk of pending items to a store as it reads it (the plan keeps
a handle and two counts per chunk, never the items), the read stage finds a video's items from its index
alone, decode tasks stay within a batch however large the run, and a run over several chunks (with
--limit, resume and a dropped block) writes exactly one row per item.

The runs here are real (local Ray, Ray Data, the Parquet sink) with the stub stages of the planning
benchmark (``pipeline.bench.planning``: no video opened, no model), so they test the driver's wiring.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import pending, sources
from pipeline.config import PipelineConfig
from pipeline.pending import (
    MAX_READ_TASKS,
    CountingPending,
    PendingChunk,
    ReceivedItems,
    chunk_spans,
    item_offsets,
    lost_items,
    pack,
    read_video_rows,
    task_sizes,
    unpack,
    video_offsets,
)  # fmt: skip
from pipeline.run import LOST_ITEM_ERROR, dry_run_summary, plan_run
from pipeline.sources import items_table


def _manifest(path: Path, videos: int, questions: int = 3) -> str:
    rows = [
        {"id": f"v{i:02d}", "video_uri": f"/v/{i}.mp4", "questions": [f"q{q}?" for q in range(questions)]}
        for i in range(videos)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class RecordingStore:
    """Keeps the tables, and the largest one it was ever handed."""

    def __init__(self) -> None:
        self.largest = 0

    def put(self, items: pa.Table) -> object:
        self.largest = max(self.largest, items.num_rows)
        return items

    def get(self, handle: object) -> pa.Table:
        assert isinstance(handle, pa.Table)
        return handle


def test_planning_hands_each_chunk_to_the_store_and_keeps_counts_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "RECORD_CHUNK", 4)  # 4 videos (12 items) a chunk
    config = PipelineConfig(input=_manifest(tmp_path / "m.jsonl", 10), output=str(tmp_path / "out"), task="qa",
                            limit=25)  # fmt: skip
    store = RecordingStore()
    plan = plan_run(config, store=store)
    assert store.largest == 12  # one chunk's items at a time, never the run's 25
    assert [(c.items, c.videos) for c in plan.chunks] == [(12, 4), (12, 4), (1, 1)]
    assert (plan.to_run, plan.videos(), plan.deferred) == (25, 9, 5)
    ids = plan.pending_items().column("id").to_pylist()
    assert ids[:4] == ["v00:qa:0", "v00:qa:1", "v00:qa:2", "v01:qa:0"] and ids[-1] == "v08:qa:0"

    counted = plan_run(config, store=CountingPending())  # --dry-run: counts and the first ids, no items
    assert all(c.handle is None for c in counted.chunks) and counted.to_run == 25
    summary = dry_run_summary(config, counted)
    assert summary["first_items"] == ids[:10] and summary["videos_to_run"] == 9


def test_a_chunk_is_stored_in_pieces_cut_at_video_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = pa.table({"video_id": ["a", "a", "a", "b", "c", "c", "d", "e", "e", "e", "e"]})
    cut = [(p.column("video_id").to_pylist(), videos) for p, videos in pending.pieces(table, 4)]
    assert cut == [(["a", "a", "a", "b"], 2), (["c", "c", "d", "e", "e", "e", "e"], 3)]  # e stays whole
    assert [v for _, v in pending.pieces(table, 1)] == [1, 1, 1, 1, 1]
    monkeypatch.setattr(sources, "RECORD_CHUNK", 4)
    monkeypatch.setattr(pending, "PIECE_ITEMS", 5)  # a chunk of 4 videos × 3 items: pieces of 2 videos
    config = PipelineConfig(
        input=_manifest(tmp_path / "m.jsonl", 10), output=str(tmp_path / "out"), task="qa"
    )
    plan = plan_run(config)
    assert [(c.items, c.videos) for c in plan.chunks] == [(6, 2)] * 5
    assert plan.pending_items().column("id").to_pylist()[-1] == "v09:qa:2"


def test_chunk_spans_map_the_plan_s_videos_to_chunks() -> None:
    offsets = video_offsets([PendingChunk(None, 9, 3), PendingChunk(None, 2, 2), PendingChunk(None, 5, 5)])
    assert offsets.tolist() == [0, 3, 5, 10]
    assert list(chunk_spans(offsets, 0, 10)) == [(0, 0, 3), (1, 0, 2), (2, 0, 5)]
    assert list(chunk_spans(offsets, 2, 4)) == [(0, 2, 3), (1, 0, 1)]
    assert list(chunk_spans(offsets, 5, 6)) == [(2, 0, 1)]
    assert list(chunk_spans(offsets, 7, 7)) == []


def test_a_packed_chunk_reads_back_equal() -> None:
    items = sources.expand_items([{"id": "a", "video_uri": "s3://b/a.mp4?X-Amz-Signature=s", "questions": "x?|y?"}],
                                 "qa")  # fmt: skip
    table = items_table(items)
    assert unpack(pack(table)).equals(table) and unpack(pack(table).to_pybytes()).equals(table)


def test_decode_tasks_stay_within_a_batch_however_large_the_run() -> None:
    assert task_sizes(3000, 8) == pending.TaskSizes(1, 1, 3000)  # one video per decode task
    assert task_sizes(20_000, 8) == pending.TaskSizes(2, 2, 10_000)
    for videos in (1_000_000, 10_000_000, 100_000_000):
        sizes = task_sizes(videos, 8)
        assert sizes.decode_videos == 8 and sizes.read_videos % 8 == 0  # read tasks cut whole batches
        assert sizes.read_tasks <= MAX_READ_TASKS and sizes.read_tasks * sizes.read_videos >= videos


def test_lost_items_are_the_pending_items_that_did_not_come_back() -> None:
    store = RecordingStore()
    records = [{"id": f"v{i}", "video_uri": f"/{i}.mp4", "questions": "x?|y?"} for i in range(4)]
    tables = [items_table(sources.expand_items(records[i : i + 2], "qa")) for i in (0, 2)]  # 4 items each
    chunks = tuple(PendingChunk(store.put(t), 4, 2) for t in tables)
    every = ReceivedItems(8)
    every.add(np.arange(8))
    assert every.complete() and lost_items(store, chunks, every).num_rows == 0
    some = ReceivedItems(8)
    some.add(pa.chunked_array([[0, 0, 2, 3], [7, 4]]))  # ordinal 0 twice: it counts once
    assert not some.complete() and some.missing().tolist() == [1, 5, 6]
    lost = lost_items(store, chunks, some).column("id").to_pylist()
    assert lost == ["v0:qa:1", "v2:qa:1", "v3:qa:0"]  # ordinal 5 is the second chunk's second item
    assert lost_items(store, chunks, ReceivedItems(8)).num_rows == 8
    with pytest.raises(ValueError, match="outside the plan"):
        some.add(np.array([8]))


def test_received_items_keep_a_bit_per_item_at_every_offset() -> None:
    rng = np.random.default_rng(0)
    for items in (1, 7, 8, 9, 1000, 10_001):
        received, back = ReceivedItems(items), rng.random(items) < 0.5
        received.add(np.flatnonzero(back))
        assert received.missing().tolist() == np.flatnonzero(~back).tolist()
        for start, stop in (
            (0, items),
            (items // 3, items),
            (1, max(1, items - 1)),
            (items // 2, items // 2),
        ):
            expected = [i for i in np.flatnonzero(~back) if start <= i < stop]
            assert received.missing(start, stop).tolist() == expected
    assert ReceivedItems(10_000_000)._bits.nbytes == 1_250_000  # 10M items: 1.25 MB


def test_the_read_stage_numbers_items_by_their_place_in_the_plan(ray_local: str) -> None:
    import ray

    records = [{"id": f"v{i}", "video_uri": f"/{i}.mp4", "questions": "x?|y?"} for i in range(5)]
    tables = [
        items_table(sources.expand_items(records[:2], "qa")),
        items_table(sources.expand_items(records[2:], "qa")),
    ]
    chunks = [PendingChunk(t, t.num_rows, t.num_rows // 2) for t in tables]
    refs = [ray.put(pack(t)) for t in tables]
    kwargs = {"chunks": refs, "offsets": video_offsets(chunks), "item_offsets": item_offsets(chunks)}
    rows = read_video_rows({"id": np.array([1])}, per_task=2, **kwargs)  # videos 2 and 3: chunk 1's first two
    items = [item for text in rows.column("items").to_pylist() for item in sources.items_from_json(text)]
    assert [(i.id, i.ordinal) for i in items] == [
        ("v2:qa:0", 4),
        ("v2:qa:1", 5),
        ("v3:qa:0", 6),
        ("v3:qa:1", 7),
    ]


# --- runs on local Ray with stub stages ------------------------------------------------------------------


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out, columns=["id", "video_id", "status", "error", "run_id"]).to_pylist()


def _stub_config(manifest: str, out: Path, **overrides: object) -> PipelineConfig:
    return PipelineConfig(input=manifest, output=str(out), task="qa", batch_size=2, num_actors=1, num_gpus=0,
                          rows_per_file=7, **overrides)  # fmt: skip


def test_a_run_over_several_chunks_with_limit_and_resume_writes_one_row_per_item(
    ray_local: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.bench.planning import StubAnnotator, stub_decode
    from pipeline.run import run_pipeline

    monkeypatch.setattr(sources, "RECORD_CHUNK", 3)  # 9 items a chunk: every run spans chunks
    monkeypatch.setattr(pending, "MAX_READ_TASKS", 2)  # read tasks of several decode blocks of 2 videos
    monkeypatch.setattr(pending, "PIECE_ITEMS", 4)  # and stored pieces of one or two videos
    manifest, out = _manifest(tmp_path / "m.jsonl", 11), tmp_path / "out"
    first = run_pipeline(_stub_config(manifest, out, limit=13), StubAnnotator, stub_decode)
    assert (first["status"], first["rows"], first["items_deferred"], first["videos"]) == ("ok", 13, 20, 5)
    second = run_pipeline(_stub_config(manifest, out, if_exists="resume"), StubAnnotator, stub_decode)
    assert (second["status"], second["rows"], second["items_skipped"]) == ("ok", 20, 13)
    rows = _rows(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 33 and {r["status"] for r in rows} == {"ok"}
    assert sorted(ids) == sorted(f"v{i:02d}:qa:{q}" for i in range(11) for q in range(3))
    by_video = {}  # a video's items in one run (v04: the first run took one of its three)
    for r in rows:
        by_video.setdefault(r["video_id"], set()).add(r["run_id"])
    assert sum(len(runs) > 1 for runs in by_video.values()) == 1


def die_on_poison(batch: dict[str, np.ndarray], sampling: object, storage: object) -> dict:
    """The stub decode stage, except that its worker dies (as one killed for memory would) on "poison"."""
    from pipeline.bench.planning import stub_decode

    if any("poison" in str(uri) for uri in batch["video_uri"]):
        os._exit(1)
    return stub_decode(batch, sampling, storage)


def test_a_dropped_decode_block_of_a_large_run_becomes_error_rows_for_its_videos_only(
    ray_local: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray import cloudpickle

    from pipeline.bench.planning import StubAnnotator
    from pipeline.run import run_pipeline

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(sources, "RECORD_CHUNK", 3)
    monkeypatch.setattr(pending, "MAX_READ_TASKS", 2)  # 8 videos: read tasks of 4, decode blocks of 2
    rows = [
        {"id": f"v{i}", "video_uri": f"/v/{'poison' if i == 4 else i}.mp4", "question": "q?"}
        for i in range(8)
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_pipeline(
        _stub_config(str(tmp_path / "m.jsonl"), tmp_path / "out"), StubAnnotator, die_on_poison
    )
    written = {r["video_id"]: r for r in _rows(tmp_path / "out")}
    assert sorted(written) == [f"v{i}" for i in range(8)] and summary["rows"] == 8  # no item lost
    lost = sorted(v for v, r in written.items() if r["status"] == "error")
    assert lost == ["v4", "v5"]  # the poisoned video's decode block (2 videos, the batch), nothing more
    assert all(written[v]["error"] == LOST_ITEM_ERROR for v in lost)
    assert summary["status"] == "ok" and summary["rows_error"] == 2


def test_a_run_in_segments_writes_one_row_per_item_and_loses_only_a_dropped_block(
    ray_local: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ray import cloudpickle

    from pipeline.bench.planning import StubAnnotator
    from pipeline.run import run_pipeline

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(sources, "RECORD_CHUNK", 3)  # chunks of 3 videos (6 items)
    monkeypatch.setattr(pending, "MAX_READ_TASKS", 2)  # a segment's 3 videos: decode blocks of 2 and 1
    rows = [
        {"id": f"v{i}", "video_uri": f"/v/{'poison' if i == 4 else i}.mp4", "questions": ["q0?", "q1?"]}
        for i in range(8)
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("INFO", logger="pipeline.run"):
        summary = run_pipeline(
            _stub_config(str(tmp_path / "m.jsonl"), tmp_path / "out", segment_videos=3),  # 3 Ray Datasets
            StubAnnotator,
            die_on_poison,
        )
    assert "3 segments" in caplog.text
    written = _rows(tmp_path / "out")
    ids = [r["id"] for r in written]
    assert sorted(ids) == sorted(f"v{i}:qa:{q}" for i in range(8) for q in (0, 1))  # each item once
    lost = sorted({r["video_id"] for r in written if r["status"] == "error"})
    assert lost == ["v3", "v4"]  # the second segment's block of the poisoned video, nothing more
    assert summary["status"] == "ok" and summary["rows"] == 16 and summary["rows_error"] == 4


def test_segments_cut_whole_chunks_of_about_the_given_videos() -> None:
    chunks = tuple(PendingChunk(None, items=2 * v, videos=v) for v in (3, 3, 1, 5, 2))
    cut = pending.segments(chunks, videos=4)
    assert [[c.videos for c in part] for part in cut] == [[3, 3], [1, 5], [2]]
    assert pending.segments(chunks, videos=100) == [chunks] and pending.segments((), videos=4) == []
