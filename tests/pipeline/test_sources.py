"""Inputs: prefixes, globs and manifests (Parquet, JSONL, CSV) on local disk and on a real S3 endpoint;
task items and their ids; and the run-level faults that must fail fast with a message saying what to fix.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from pipeline.errors import PipelineError
from pipeline.prompts import format_mcq_prompt
from pipeline.sources import expand_items, items_from_json, read_records, video_rows
from pipeline.storage import StorageOptions, check_reachable

LOCAL = StorageOptions()


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_prefix_lists_videos_recursively_with_relative_ids(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4", "sub/b.MKV", "notes.txt", "_tmp/c.mp4", ".hidden/d.mp4")
    records = read_records(str(tmp_path), LOCAL)
    assert [(r["id"], r["video_uri"]) for r in records] == [
        ("a", str(tmp_path / "a.mp4")),
        ("sub/b", str(tmp_path / "sub/b.MKV")),
    ]


def test_glob_is_taken_as_given(tmp_path: Path) -> None:
    _touch(tmp_path, "a.mp4", "b.bin", "c.mp4")
    records = read_records(str(tmp_path / "*.bin"), LOCAL)
    assert [r["id"] for r in records] == ["b"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_formats_agree(tmp_path: Path, fmt: str) -> None:
    rows = [
        {"id": "v1", "video_uri": "clips/one.mp4", "question": "What colour?", "options": '["red", "blue"]'},
        {"id": "v2", "video_uri": "s3://bucket/two.mp4", "question": "", "options": ""},
    ]
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    records = read_records(str(path), LOCAL)
    # relative URIs resolve against the manifest's folder; absolute URIs stay as written
    assert [r["video_uri"] for r in records] == [str(tmp_path / "clips/one.mp4"), "s3://bucket/two.mp4"]
    items = expand_items(records, "mcq")
    assert items[0].options == ["red", "blue"] and items[0].prompt == format_mcq_prompt(
        "What colour?", ["red", "blue"]
    )
    assert items[1].error == "no question for task mcq"


def test_manifest_without_video_uri_fails_fast(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "path": "a.mp4"}) + "\n")
    with pytest.raises(
        PipelineError, match="no 'video_uri' column .*columns: id, path.*Add a video_uri column"
    ):
        read_records(str(path), LOCAL)


def test_duplicate_ids_and_empty_inputs_fail_fast(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": "a", "video_uri": f"{i}.mp4"}) + "\n" for i in range(2)))
    with pytest.raises(PipelineError, match="'a' appears twice"):
        read_records(str(path), LOCAL)
    with pytest.raises(PipelineError, match="no videos found"):
        read_records(str(tmp_path), LOCAL)
    with pytest.raises(PipelineError, match="does not exist"):
        read_records(str(tmp_path / "nowhere"), LOCAL)


def test_items_one_per_caption_and_one_per_question() -> None:
    records = [
        {"id": "v1", "video_uri": "a.mp4", "questions": ["Which shape?", "How many?"], "answers": ["circle", "two"],
         "question": "What colour?", "options": ["red", "green"], "answer": "green", "caption": "a red circle"},
        {"id": "v2", "video_uri": "b.mp4"},
    ]  # fmt: skip
    captions = expand_items(records, "caption", prompt="Say it.")
    assert [(i.id, i.prompt, i.answer) for i in captions] == [("v1:caption", "Say it.", "a red circle"),
                                                            ("v2:caption", "Say it.", None)]  # fmt: skip
    qa = expand_items(records, "qa")
    assert [(i.id, i.question, i.answer) for i in qa if not i.error] == [
        ("v1:qa:0", "Which shape?", "circle"),
        ("v1:qa:1", "How many?", "two"),
    ]
    mcq = expand_items(records, "mcq")
    assert (mcq[0].id, mcq[0].answer, mcq[0].options) == ("v1:mcq:0", "B", ["red", "green"])  # text → letter
    assert [i.error for i in qa + mcq if i.video_id == "v2"] == [
        "no question for task qa",
        "no question for task mcq",
    ]


def test_an_mcq_with_one_option_is_an_error_item_not_a_crash() -> None:
    items = expand_items([{"id": "v", "video_uri": "a.mp4", "question": "Q?", "options": ["only"]}], "mcq")
    assert "2 to 10 options" in items[0].error


def test_qa_without_any_question_column_fails_fast() -> None:
    with pytest.raises(PipelineError, match="task qa needs questions"):
        expand_items([{"id": "v", "video_uri": "a.mp4"}], "qa")


def test_video_rows_group_items_so_each_video_is_decoded_once() -> None:
    records = [{"id": "v1", "video_uri": "a.mp4", "questions": ["q1?", "q2?"]}]
    rows = video_rows(expand_items(records, "qa"))
    assert len(rows) == 1 and [i.question for i in items_from_json(rows[0]["items"])] == ["q1?", "q2?"]


def test_s3_prefix_and_manifest_through_aws_endpoint_url(s3_endpoint: str, s3_bucket: str) -> None:
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.pipe(
        {
            f"{s3_bucket}/clips/a.mp4": b"x",
            f"{s3_bucket}/clips/deep/b.webm": b"x",
            f"{s3_bucket}/clips/c.txt": b"x",
        }
    )
    fs.pipe(f"{s3_bucket}/m.jsonl", (json.dumps({"video_uri": "clips/a.mp4"}) + "\n").encode())
    records = read_records(f"s3://{s3_bucket}/clips/", StorageOptions())
    assert [(r["id"], r["video_uri"]) for r in records] == [
        ("a", f"s3://{s3_bucket}/clips/a.mp4"),
        ("deep/b", f"s3://{s3_bucket}/clips/deep/b.webm"),
    ]
    manifest = read_records(f"s3://{s3_bucket}/m.jsonl", StorageOptions(endpoint_url=s3_endpoint))
    assert manifest[0]["video_uri"] == manifest[0]["id"] == f"s3://{s3_bucket}/clips/a.mp4"


def test_missing_bucket_fails_fast_naming_the_bucket(s3_endpoint: str) -> None:
    with pytest.raises(
        PipelineError, match="--input: bucket 'no-such-bucket' does not exist.*Create the bucket"
    ):
        check_reachable("s3://no-such-bucket/clips/", StorageOptions(), "--input")


def test_unreachable_endpoint_fails_fast_in_seconds(s3_endpoint: str) -> None:
    start = time.perf_counter()
    with pytest.raises(
        PipelineError, match="cannot reach the object store at http://127.0.0.1:9.*--endpoint-url"
    ):
        check_reachable("s3://bucket/clips/", StorageOptions(endpoint_url="http://127.0.0.1:9"), "--input")
    assert time.perf_counter() - start < 20


def test_an_existing_bucket_passes_where_a_missing_one_beside_it_fails(s3_bucket: str) -> None:
    # an output prefix that does not exist yet is fine: the bucket is what must exist
    assert check_reachable(f"s3://{s3_bucket}/not-yet/", StorageOptions(), "--output") is None
    with pytest.raises(PipelineError, match=f"bucket '{s3_bucket}-missing' does not exist"):
        check_reachable(f"s3://{s3_bucket}-missing/not-yet/", StorageOptions(), "--output")
