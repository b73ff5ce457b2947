"""Planning reads the input in chunks: the column-wise path agrees with the row-by-row one, a fault
found late in the input still fails the run before it starts, and a million-item manifest is planned
in bounded driver memory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import sources
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.pending import video_starts
from pipeline.run import plan_run
from pipeline.schema import to_table
from pipeline.sink import ParquetSink
from pipeline.sources import items_from_table, iter_items, iter_records
from pipeline.storage import StorageOptions

LOCAL = StorageOptions()
CAPTION_COLUMNS = ("id", "video_uri", "caption")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _items(uri: str, task: str, columns: tuple[str, ...] | None) -> list:
    return [item for t in iter_items(iter_records(uri, LOCAL, columns), task) for item in items_from_table(t)]


ROWS = [
    {"id": "a", "video_uri": "clips/a.mp4", "caption": "A red square."},  # relative: resolved
    {"video_uri": "https://cdn.example/v/b.mp4?X-Amz-Signature=s3cr3t"},  # no id, a signed URL
    {"id": "", "video_uri": "  /abs/c.mp4 ", "caption": ""},  # empty id, spaces, empty caption
    {"id": "d", "video_uri": "s3://bucket/d.mp4", "extra": {"nested": [1, 2]}},
    {"video_uri": ""},  # no id, no video: an error row later, a positional id here
]


@pytest.mark.parametrize("chunk", [2, 65_536])
def test_the_column_wise_caption_path_agrees_with_the_row_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(sources, "RECORD_CHUNK", chunk)
    manifest = str(_jsonl(tmp_path / "m.jsonl", ROWS))
    chunks = list(iter_records(manifest, LOCAL, CAPTION_COLUMNS))
    assert all(isinstance(c, pa.Table) for c in chunks)  # Arrow read it: the fast path is what ran
    fast, rows = _items(manifest, "caption", CAPTION_COLUMNS), _items(manifest, "caption", None)
    assert fast == rows and len(fast) == 5
    assert [i.id for i in fast] == ["a:caption", "https://cdn.example/v/b.mp4:caption", "/abs/c.mp4:caption",
                                    "d:caption", "row4:caption"]  # fmt: skip
    assert fast[0].video_uri == str(tmp_path / "clips/a.mp4") and fast[0].answer == "A red square."
    assert fast[1].video_uri == "https://cdn.example/v/b.mp4" and "s3cr3t" in fast[1].readable_uri
    assert fast[2].answer is None and fast[2].video_uri == "/abs/c.mp4"


def test_a_line_arrow_cannot_type_hands_the_rest_to_the_line_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "ARROW_JSON_BLOCK", 256)  # Arrow yields batches before it meets line 40
    monkeypatch.setattr(sources, "RECORD_CHUNK", 7)
    rows = [{"id": f"v{i}", "video_uri": f"/v/{i}.mp4"} for i in range(60)]
    rows[40]["id"] = 40  # a number where Arrow typed strings
    manifest = str(_jsonl(tmp_path / "m.jsonl", rows))
    chunks = list(iter_records(manifest, LOCAL, CAPTION_COLUMNS))
    assert isinstance(chunks[0], pa.Table) and isinstance(chunks[-1], list)  # both paths ran
    items = _items(manifest, "caption", CAPTION_COLUMNS)
    assert [i.id for i in items] == [f"v{i}:caption" if i != 40 else "40:caption" for i in range(60)]
    assert items == _items(manifest, "caption", None)


def test_an_id_repeated_in_a_later_chunk_fails_the_plan_naming_both_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "RECORD_CHUNK", 3)
    rows = [{"id": f"v{i}", "video_uri": f"/v/{i}.mp4"} for i in range(10)]
    rows[8]["id"] = "v1"
    config = PipelineConfig(input=str(_jsonl(tmp_path / "m.jsonl", rows)), output=str(tmp_path / "out"))
    with pytest.raises(PipelineError, match=r"the id 'v1' appears twice \(rows 2 and 9\)"):
        plan_run(config)


def test_qa_without_any_question_fails_after_reading_every_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "RECORD_CHUNK", 2)
    rows = [{"id": f"v{i}", "video_uri": f"/v/{i}.mp4"} for i in range(5)]
    config = PipelineConfig(
        input=str(_jsonl(tmp_path / "m.jsonl", rows)), output=str(tmp_path / "out"), task="qa"
    )
    with pytest.raises(PipelineError, match="task qa needs questions"):
        plan_run(config)
    rows[4]["question"] = "What moves?"  # one question anywhere is enough; the others are error rows
    _jsonl(tmp_path / "m.jsonl", rows)
    plan = plan_run(config)
    assert (
        plan.total == 5 and [i.error is None for i in items_from_table(plan.pending_items())].count(True) == 1
    )


def test_the_plan_counts_done_and_deferred_items_and_keeps_only_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "RECORD_CHUNK", 4)
    rows = [
        {"id": f"v{i}", "video_uri": f"/v/{i}.mp4", "questions": ["q1?", "q2?", "q3?"]} for i in range(10)
    ]
    out = tmp_path / "out"
    sink = ParquetSink(str(out), LOCAL, "earlier", rows_per_file=100)
    done = ["v0:qa:0", "v0:qa:1", "v0:qa:2", "v3:qa:1", "v9:qa:2"]
    sink.write(to_table([{"id": i, "status": "ok" if n < 4 else "error"} for n, i in enumerate(done)]))
    sink.close()
    config = PipelineConfig(input=str(_jsonl(tmp_path / "m.jsonl", rows)), output=str(out), task="qa", limit=7,
                            if_exists="resume")  # fmt: skip
    plan = plan_run(config)
    ids = plan.pending_items().column("id").to_pylist()
    assert ids == ["v1:qa:0", "v1:qa:1", "v1:qa:2", "v2:qa:0", "v2:qa:1", "v2:qa:2", "v3:qa:0"]
    assert (plan.total, plan.done, plan.deferred, plan.to_run, plan.videos()) == (30, 4, 19, 7, 3)


def test_video_starts_marks_each_videos_first_item() -> None:
    table = pa.table({"video_id": ["a", "a", "b", "c", "c", "c"]})
    assert video_starts(table).tolist() == [0, 2, 3, 6]
    assert video_starts(pa.table({"video_id": pa.array([], pa.string())})).tolist() == [0]
    assert video_starts(pa.table({"video_id": ["a"]})).tolist() == [0, 1]


@pytest.mark.slow
def test_a_million_item_manifest_plans_in_bounded_driver_memory(tmp_path: Path) -> None:
    """The issue's bound: 1M items with --limit 4 under 500 MB of driver memory (the whole process:
    interpreter, pyarrow, fsspec and the plan). Time is the benchmark's to report, not a test's."""
    from pipeline.bench.planning import PlanningBenchConfig, run_planning_benchmark

    result = run_planning_benchmark(PlanningBenchConfig(items=(1_000_000,), limit=4, out=str(tmp_path)))
    case = result["cases"][0]
    assert (case["items_total"], case["items_to_run"], case["items_deferred"]) == (1_000_000, 4, 999_996)
    assert case["driver_max_rss_mb"] < 500


@pytest.mark.slow
def test_the_first_rows_benchmark_stops_a_stub_run_after_its_first_committed_rows(tmp_path: Path) -> None:
    from pipeline.bench.planning import PlanningBenchConfig, run_planning_benchmark

    config = PlanningBenchConfig(items=(300,), limit=-1, run=True, first_rows=True, out=str(tmp_path))
    case = run_planning_benchmark(config)["cases"][0]
    assert case["status"] == "interrupted" and 1 <= case["rows"] < 300 and case["rows_expected"] == 300
    assert 0 < case["first_rows_committed_seconds"] <= case["run_seconds"]
    assert 0 < case["driver_max_private_mb"] <= case["driver_max_rss_mb"]


def test_the_planning_benchmark_passes_its_segment_size_to_the_measured_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole 10M-item run of BENCHMARKS §8 is measured with larger segments than the default."""
    from pipeline.bench import planning
    from pipeline.bench.planning import run_config

    spec = {"input": "m.jsonl", "output": str(tmp_path), "limit": -1, "task": "caption", "run": True,
            "batch_size": 256}  # fmt: skip
    assert run_config(spec).segment_videos == PipelineConfig.segment_videos
    assert run_config(spec | {"segment_videos": 2_500_000}).segment_videos == 2_500_000
    assert run_config(spec | {"limit": 4}).limit == 4 and run_config(spec).limit is None
    handed: list[dict] = []

    def fake_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        handed.append(json.loads(argv[-1]))
        return subprocess.CompletedProcess(argv, 0, stdout='{"status": "ok"}\n', stderr="")

    monkeypatch.setattr(planning.subprocess, "run", fake_run)
    config = planning.PlanningBenchConfig(items=(10,), run=True, segment_videos=7, out=str(tmp_path))
    assert planning._child(config, tmp_path / "m.jsonl", tmp_path / "out") == {"status": "ok"}
    assert run_config(handed[0]).segment_videos == 7 and run_config(handed[0]).dry_run is False


def test_sample_clips_are_cached_per_world_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache written by an older demo world is never fed to a model trained on the current one."""
    from pipeline.demo import world
    from pipeline.models import CACHE_ENV
    from pipeline.run import _sample_input

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    config = PipelineConfig(output=str(tmp_path / "out"), num_samples=1)
    current = Path(_sample_input(config))
    assert current.is_file() and f"world{world.WORLD_VERSION}" in current.parts
    monkeypatch.setattr(world, "WORLD_VERSION", world.WORLD_VERSION + 1)
    newer = Path(_sample_input(config))
    assert newer != current and newer.is_file() and current.is_file()
