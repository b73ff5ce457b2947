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

from pipeline import sources
from pipeline.errors import PipelineError
from pipeline.prompts import format_mcq_prompt
from pipeline.sources import expand_items, items_from_json, read_records, unique_ids, video_rows
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


# --- every input fails safe -------------------------------------------------------------------------------


def test_videos_sharing_a_stem_keep_their_suffix_and_the_others_keep_their_ids(tmp_path: Path) -> None:
    _touch(tmp_path, "clip.mp4", "clip.webm", "solo.mp4", "sub/clip.mkv")
    records = read_records(str(tmp_path), LOCAL)
    assert [(r["id"], r["video_uri"]) for r in records] == [
        ("clip.mp4", str(tmp_path / "clip.mp4")),
        ("clip.webm", str(tmp_path / "clip.webm")),
        ("solo", str(tmp_path / "solo.mp4")),
        ("sub/clip", str(tmp_path / "sub/clip.mkv")),  # another folder: no clash
    ]


def test_disambiguated_ids_never_collide_with_another_file_s_stem() -> None:
    # "a.mp4" (from a.mp4 beside a.webm) would meet the stem of "a.mp4.mkv": that one keeps its path too
    assert unique_ids(["a.mp4", "a.webm", "a.mp4.mkv", "b.mp4"]) == ["a.mp4", "a.webm", "a.mp4.mkv", "b"]


def test_explicit_manifest_ids_that_collide_are_a_run_level_error(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"id": "x", "video_uri": f"{n}.mp4"}) + "\n" for n in "abc"))
    with pytest.raises(PipelineError, match=r"'x' appears twice \(rows 1 and 2\).*give each row its own id"):
        read_records(str(path), LOCAL)


def test_an_existing_path_with_glob_characters_is_a_path(tmp_path: Path) -> None:
    _touch(tmp_path, "take[1].mp4", "take1.mp4", "set[a]/x.mp4", "a.mp4")
    one = read_records(str(tmp_path / "take[1].mp4"), LOCAL)
    assert [(r["id"], r["video_uri"]) for r in one] == [("take[1]", str(tmp_path / "take[1].mp4"))]
    folder = read_records(str(tmp_path / "set[a]"), LOCAL)
    assert [r["video_uri"] for r in folder] == [str(tmp_path / "set[a]/x.mp4")]
    # a path that does not exist is still a glob
    assert [r["id"] for r in read_records(str(tmp_path / "take[0-9].mp4"), LOCAL)] == ["take1"]


@pytest.mark.parametrize("layout", ["array", "one-line array", "jsonl"])
def test_json_manifests_are_arrays_or_json_lines(tmp_path: Path, layout: str) -> None:
    rows = [{"id": "v1", "video_uri": "a.mp4"}, {"id": "v2", "video_uri": "b.mp4"}]
    text = {
        "array": json.dumps(rows, indent=2),
        "one-line array": json.dumps(rows),
        "jsonl": "".join(json.dumps(r) + "\n" for r in rows),
    }[layout]
    path = tmp_path / "m.json"
    path.write_text("\n  " + text)
    assert [(r["id"], r["video_uri"]) for r in read_records(str(path), LOCAL)] == [
        ("v1", str(tmp_path / "a.mp4")),
        ("v2", str(tmp_path / "b.mp4")),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("m.json", '{"video_uri": "a.mp4"}\n\n\n{"video_uri": oops}\n', r"m.json, line 4: not valid JSON"),
        ("m.jsonl", '{"video_uri": "a.mp4"}\n["b.mp4"]\n', r"m.jsonl, line 2: an array, not an object"),
        ("m.jsonl", '{"video_uri": "a.mp4"}\r\n\r\nnull\r\n', r"m.jsonl, line 3: null, not an object"),
        ("m.json", '[{"video_uri": "a.mp4"}, "b.mp4"]', r"m.json: element 2 of the JSON array is a string"),
        (
            "m.json",
            '[\n{"video_uri": "a.mp4"},\n{"video_uri": }\n]',
            r"m.json, line 3: not a valid JSON array",
        ),
        ("m.json", '"a.mp4"', r"m.json: expected a JSON array of objects, or JSON Lines.*starts with '\"'"),
        ("m.json", "  \n", r"m.json: expected a JSON array of objects, or JSON Lines.*it is empty"),
        ("m.jsonl", "[]", r"m.jsonl has no rows"),
        ("m.csv", "video_uri\na.mp4,extra\n", r"m.csv, line 2: more fields than the header's 1 columns"),
        ("m.parquet", "not parquet", r"m.parquet: not a readable Parquet file"),
    ],
)
def test_malformed_manifests_name_the_file_and_line(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode())
    with pytest.raises(PipelineError, match=message):
        read_records(str(path), LOCAL)


def test_non_utf8_manifests_say_so(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("video_uri\ncaf\u00e9.mp4\n".encode("latin-1"))
    with pytest.raises(PipelineError, match="m.csv is not UTF-8 text .*save it as UTF-8"):
        read_records(str(path), LOCAL)


@pytest.mark.parametrize("name", ["m.csv", "m.jsonl", "m.json"])
def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path, name: str) -> None:
    text = {
        "m.csv": "video_uri,id\na.mp4,v1\n",
        "m.jsonl": '{"video_uri": "a.mp4", "id": "v1"}\n',
        "m.json": '[{"video_uri": "a.mp4", "id": "v1"}]',
    }[name]
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8-sig"))  # as Excel and Notepad save it
    assert [(r["id"], r["video_uri"]) for r in read_records(str(path), LOCAL)] == [
        ("v1", str(tmp_path / "a.mp4"))
    ]


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path, "data/clips/a.mp4", "data/b.mp4")
    (tmp_path / "data/m.jsonl").write_text(
        "".join(
            json.dumps({"video_uri": v}) + "\n" for v in ["clips/a.mp4", "./clips/../b.mp4", "s3://b/c.mp4"]
        )
    )
    monkeypatch.chdir(tmp_path)
    manifest = read_records("data/m.jsonl", LOCAL)  # a relative manifest path: resolved against its folder
    expected = [str(tmp_path / "data/clips/a.mp4"), str(tmp_path / "data/b.mp4"), "s3://b/c.mp4"]
    assert [r["video_uri"] for r in manifest] == [r["id"] for r in manifest] == expected
    for prefix in ("data", "data/*.mp4"):  # a relative --input prefix or glob
        assert str(tmp_path / "data/b.mp4") in [r["video_uri"] for r in read_records(prefix, LOCAL)]
    items = expand_items(manifest, "caption")
    assert [i.video_uri for i in items] == expected and all(
        i.video_uri.startswith(("/", "s3://")) for i in items
    )


SIGNED = "https://videos.example.com/clips/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=deadbeef"


def test_signed_urls_are_read_in_full_but_written_without_their_signature(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"video_uri": SIGNED, "question": "Which colour?", "options": ["red", "blue"]}) + "\n"
        + json.dumps({"id": "own", "video_uri": SIGNED.replace("a.mp4", "b.mp4")}) + "\n"
    )  # fmt: skip
    records = read_records(str(path), LOCAL)
    assert records[0]["video_uri"] == SIGNED  # the decode stage needs the signature
    items = expand_items(records, "mcq")
    bare = "https://videos.example.com/clips/a.mp4"
    assert (items[0].id, items[0].video_id, items[0].video_uri) == (f"{bare}:mcq:0", bare, bare)
    assert items[0].readable_uri == SIGNED and items[1].error == "no question for task mcq"
    rows = video_rows(items)
    assert [r["video_uri"] for r in rows] == [
        SIGNED,
        SIGNED.replace("a.mp4", "b.mp4"),
    ]  # what the decoder opens
    assert all("Signature" not in r["items"] and "Signature" not in r["video_id"] for r in rows)
    assert [i.video_uri for i in items_from_json(rows[0]["items"])] == [bare]  # what rows show
    assert items_from_json(rows[0]["items"])[0].readable_uri == bare


def test_signed_urls_stay_out_of_run_level_errors(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text((json.dumps({"video_uri": SIGNED}) + "\n") * 2)  # the same video twice
    with pytest.raises(PipelineError, match="appears twice") as info:
        read_records(str(path), LOCAL)
    assert "Signature" not in str(info.value)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"options": "[red, blue"}, "options: not a JSON list: '[red, blue'"),
        ({"options": 5}, "an MCQ item needs 2 to 10 options, got 1"),
        ({"options": ["red", "blue"], "answer": 1.0}, None),  # a Parquet int column with nulls: an index
        ({"options": ["red", "blue"], "answer": 1}, None),  # a 0-based index, not the text "1"
    ],
)
def test_odd_fields_of_one_row_become_an_error_item_not_a_crash(fields: dict, expected: str | None) -> None:
    items = expand_items([{"id": "v", "video_uri": "a.mp4", "question": "Q?", **fields}], "mcq")
    if expected is None:
        assert items[0].error is None and items[0].answer == "B"
    else:
        assert len(items) == 1 and items[0].error.startswith(expected)


def test_bad_questions_field_is_an_error_item() -> None:
    items = expand_items([{"id": "v", "video_uri": "a.mp4", "questions": "[oops"}], "qa")
    assert items[0].id == "v:qa" and items[0].error.startswith("questions: not a JSON list")


def test_s3_collisions_json_arrays_and_boms_through_the_endpoint(s3_endpoint: str, s3_bucket: str) -> None:
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.pipe(
        {f"{s3_bucket}/v/clip.mp4": b"x", f"{s3_bucket}/v/clip.webm": b"x", f"{s3_bucket}/v/[1].mp4": b"x"}
    )
    array = json.dumps([{"video_uri": "v/clip.mp4"}, {"video_uri": "v/[1].mp4", "id": "one"}])
    fs.pipe(f"{s3_bucket}/m.json", array.encode("utf-8-sig"))
    fs.pipe(f"{s3_bucket}/bad.jsonl", b'{"video_uri": "v/clip.mp4"}\n\n{"video_uri": 1,}\n')
    records = read_records(f"s3://{s3_bucket}/v/", StorageOptions())
    assert [r["id"] for r in records] == ["[1]", "clip.mp4", "clip.webm"]
    assert [r["id"] for r in read_records(f"s3://{s3_bucket}/v/*.webm", StorageOptions())] == ["clip"]
    one = read_records(f"s3://{s3_bucket}/v/[1].mp4", StorageOptions())  # exists: not a glob
    assert [r["video_uri"] for r in one] == [f"s3://{s3_bucket}/v/[1].mp4"]
    manifest = read_records(f"s3://{s3_bucket}/m.json", StorageOptions())
    assert [(r["id"], r["video_uri"]) for r in manifest] == [
        (f"s3://{s3_bucket}/v/clip.mp4", f"s3://{s3_bucket}/v/clip.mp4"),
        ("one", f"s3://{s3_bucket}/v/[1].mp4"),
    ]
    with pytest.raises(PipelineError, match=f"manifest s3://{s3_bucket}/bad.jsonl, line 3: not valid JSON"):
        read_records(f"s3://{s3_bucket}/bad.jsonl", StorageOptions())


def test_plain_qa_questions_take_the_fast_path_and_make_the_same_items() -> None:
    records = [
        {
            "id": "a",
            "video_uri": "https://h/a.mp4?X-Amz-Signature=s",
            "questions": [" what? ", "", "  ", "why?"],
        },
        {"id": "b", "video_uri": "/v/b.mp4", "questions": ["how?"], "answers": []},
        {"id": "c", "video_uri": "/v/c.mp4", "questions": ["how?"], "question": "ignored for qa?"},
    ]
    assert all(sources._plain_questions(r) for r in records)
    assert not sources._plain_questions({"id": "d", "video_uri": "/d", "questions": ["q?"], "answers": ["x"]})
    assert not sources._plain_questions({"id": "d", "video_uri": "/d", "questions": [{"question": "q?"}]})
    assert not sources._plain_questions({"id": "d", "video_uri": "/d", "questions": "q1?|q2?"})
    fast = sources._expand_rows(records, "qa", None)
    general = []
    for record in records:
        shown = sources.redact(record["video_uri"])
        video = {"video_id": record["id"], "video_uri": shown,
                 "source_uri": record["video_uri"] if record["video_uri"] != shown else None}  # fmt: skip
        general += [
            sources._question_item(f"{record['id']}:qa:{q.get('id', i)}", "qa", q, video)
            for i, q in enumerate(sources._questions(record, "qa"))
        ]
    assert fast == general and len(fast) == 6
    assert [item.get("error") for item in fast] == [
        None,
        "empty question",
        "empty question",
        None,
        None,
        None,
    ]
    assert fast[0]["source_uri"].endswith("Signature=s") and "Signature" not in fast[0]["video_uri"]
