"""Benchmarks as users hold them → the normalised manifest, and the report's groups and headline.

The fixtures are benchmark-shaped tables (Video-MME, MLVU original and MLVU_dev, LongVideoBench-,
EgoSchema- and NExT-QA-shaped rows) whose questions are the demo world's MCQ items, with known answers;
their videos are demo-world clips where a run decodes them (the end-to-end run, on the session's local
Ray with a tiny random model: its accuracies mean nothing, but every count, group and the headline must
agree with the rows it wrote), and placeholders where only paths matter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from jobs import evaluate
from pipeline.benchmark_rows import Question, answer_slot, normalise_question, strip_option_prefix
from pipeline.benchmarks import BenchmarkConfig, PreparedBenchmark, parse_column_map, prepare_benchmark
from pipeline.demo import world
from pipeline.errors import PipelineError
from pipeline.evaluation import benchmark_report
from pipeline.prompts import LETTERS, format_mcq_prompt, lmms_eval_question, parse_lmms_eval_answer
from pipeline.schema import to_table
from pipeline.sources import expand_items, read_records
from pipeline.storage import StorageOptions

LOCAL = StorageOptions()
SEEDS = (world.HELDOUT_SEED_BASE + 11, world.HELDOUT_SEED_BASE + 12)
VIDEOMME_GROUPS = {"duration": ("short", "medium"), "domain": ("Knowledge", "Sports")}


def _mcq(seed: int, count: int = 3) -> list[world.MCQItem]:
    return world.mcq_items(world.make_clip(seed, num_frames=32))[:count]


def write_videomme(root: Path, real_videos: bool = False) -> tuple[Path, list[dict]]:
    """A Video-MME-shaped Parquet under ``root`` (2 videos × 3 questions, options "A. ...", the second
    video as ``.MP4``; question 002-3's answer is "E", which names no option) and ``root/data/``."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    rows = []
    for v, seed in enumerate(SEEDS):
        video_id = f"{v + 1:03d}"
        path = root / "data" / (video_id + (".mp4" if v == 0 else ".MP4"))
        if real_videos:
            world.encode_video(world.render_frames(world.make_clip(seed, num_frames=32)), path)
        else:
            path.write_bytes(b"x")
        for q, item in enumerate(_mcq(seed)):
            rows.append({
                "video_id": video_id, "videoID": video_id, "question_id": f"{video_id}-{q + 1}",
                "duration": VIDEOMME_GROUPS["duration"][v], "domain": VIDEOMME_GROUPS["domain"][v],
                "sub_category": "Demo", "task_type": ("Counting", "Object Recognition", "Temporal")[q],
                "question": item.question, "url": "https://example.invalid",
                "options": [f"{LETTERS[i]}. {o}" for i, o in enumerate(item.options)],
                "answer": "E" if (v, q) == (1, 2) else item.answer,
            })  # fmt: skip
    parquet = root / "videomme" / "test-00000-of-00001.parquet"
    parquet.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    return parquet, rows


# --- normalising -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "position", "expected"),
    [("A. red", 0, "red"), ("(B) a blue square", 1, "a blue square"), ("C) up", 2, "up"), ("D:left", 3, "left"),
     ("A dog runs", 0, "A dog runs"), ("B. red", 0, "B. red"), ("A.I. systems", 0, "A.I. systems"),
     ("  plain  ", 4, "plain")],
)  # fmt: skip
def test_an_option_loses_only_its_own_letter_prefix(option: str, position: int, expected: str) -> None:
    assert strip_option_prefix(option, position) == expected


@pytest.mark.parametrize(
    ("answer", "slot"),
    [("b", 1), ("(C)", 2), ("D.", 3), ("blue", 1), ("B. blue", 1), (2, 2), (2.0, 2), ("0", 0),
     (7, None), ("purple", None), (True, None), (None, None)],
)  # fmt: skip
def test_an_answer_is_a_letter_an_option_text_or_an_index(answer: object, slot: int | None) -> None:
    assert answer_slot(answer, ["A. red", "B. blue", "C. green", "D. white"]) == slot


def test_placeholders_are_dropped_and_the_answer_follows_its_option() -> None:
    q = normalise_question("v", "/v.mp4", "1", " Which? ", ["red", "N/A", "blue", "", None], 2)
    assert (q.options, q.answer, q.error, q.question) == (["red", "blue"], "B", None, "Which?")
    assert normalise_question("v", "/v.mp4", "1", "Q", ["red", "N/A", "blue"], 1).error.startswith(
        "answer names an empty (N/A) option"
    )
    assert normalise_question("v", "/v.mp4", "1", "Q", ["red", "N/A"], 0).error == "not 2 to 10 options: 1"
    assert normalise_question("v", "/v.mp4", "1", "", ["a", "b"], 0).error == "empty question"
    assert normalise_question("v", "/v.mp4", "1", "Q", ["a", "b"], None).error == "no answer"
    assert normalise_question("v", "/v.mp4", "1", "Q", ["a", "b"], None, has_answers=False).error is None


def test_column_map_reads_lists_of_columns_and_refuses_mistakes() -> None:
    columns = parse_column_map(
        "id=qid, video=video_path,question=q,options=option0,option1,answer=ans,group=a,b"
    )
    assert columns == {"id": ["qid"], "video": ["video_path"], "question": ["q"],
                       "options": ["option0", "option1"], "answer": ["ans"], "group": ["a", "b"]}  # fmt: skip
    for text, message in [
        ("question=q,options=o,colour=c", "key 'colour' unknown"),
        ("question=q,options=o,question=r", "key 'question' repeated"),
        ("question=q,extra,options=o", "'extra' follows question"),
        ("video=v,options=o", "needs question=<column>"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_column_map(text)


def test_benchmark_flags_need_a_benchmark_and_generic_needs_its_columns() -> None:
    with pytest.raises(ValueError, match="--video-root, --prompt-preset only apply to a benchmark"):
        BenchmarkConfig(video_root="/v", prompt_preset="lmms-eval")
    with pytest.raises(ValueError, match="generic needs a --column-map"):
        BenchmarkConfig(benchmark="generic")
    with pytest.raises(ValueError, match="needs a video=<column>, or pass a --video-template"):
        BenchmarkConfig(benchmark="generic", column_map="question=q,options=o")
    assert BenchmarkConfig(benchmark="mlvu").group_columns == ("task_type",)
    assert BenchmarkConfig(benchmark="videomme", group_by="duration, task_type").group_columns == (
        "duration",
        "task_type",
    )
    assert BenchmarkConfig(benchmark="mlvu", group_by="duration").carried_columns == ("duration", "task_type")


def test_the_lmms_eval_preset_prompt_and_parser() -> None:
    text = format_mcq_prompt(lmms_eval_question("What colour?", 4), ["red", "blue", "green", "white"])
    assert text == (
        "Select the best answer to the following multiple-choice question based on the video. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "What colour?\nA. red\nB. blue\nC. green\nD. white\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert parse_lmms_eval_answer("The best answer is: (C) green", 4) == "C"
    assert parse_lmms_eval_answer("Best option: D", 4) == "D"
    assert parse_lmms_eval_answer("the shape is red", 4) is None  # nothing parses: wrong, never a guess
    assert parse_lmms_eval_answer("E", 4) is None  # only the options' letters


# --- Video-MME ---------------------------------------------------------------------------------------


def test_videomme_parquet_becomes_one_manifest_row_per_video(tmp_path: Path) -> None:
    parquet, rows = write_videomme(tmp_path / "vmme")
    config = BenchmarkConfig(benchmark="videomme", video_root=str(tmp_path / "vmme"))
    prepared = prepare_benchmark(config, str(parquet.parent), str(tmp_path / "out"), LOCAL)
    manifest = [json.loads(line) for line in Path(prepared.manifest).read_text().splitlines()]
    assert [(r["id"], r["video_uri"]) for r in manifest] == [
        ("001", str(tmp_path / "vmme/data/001.mp4")),
        ("002", str(tmp_path / "vmme/data/002.MP4")),  # the suffix that exists
    ]
    assert [len(r["questions"]) for r in manifest] == [3, 2]  # 002-3's answer "E" names no option
    first = manifest[0]["questions"][0]
    assert first["options"] == list(_mcq(SEEDS[0])[0].options)  # "A. " prefixes gone
    assert first["answer"] == rows[0]["answer"] and first["id"] == "001-1"
    assert first["groups"] == {"duration": "short", "domain": "Knowledge", "sub_category": "Demo",
                               "task_type": "Counting"}  # fmt: skip
    assert [(q.row_id, q.error) for q in prepared.rejected] == [
        ("002:mcq:002-3", "answer names no option: 'E'")
    ]
    rejected = (tmp_path / "out/_benchmark/rejected.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in rejected] == ["002:mcq:002-3"]
    # the pipeline reads the manifest as it is, and its row ids are the side table's keys
    items = expand_items(read_records(prepared.manifest, LOCAL), "mcq")
    assert [i.id for i in items] == list(prepared.groups) and not any(i.error for i in items)
    assert [i.answer for i in items] == [r["answer"] for r in rows[:5]]


def test_videomme_without_its_videos_says_which_root_to_pass(tmp_path: Path) -> None:
    parquet, _ = write_videomme(tmp_path / "vmme")
    with pytest.raises(PipelineError, match="no videos in .*/elsewhere/data: pass the --video-root"):
        prepare_benchmark(
            BenchmarkConfig(benchmark="videomme", video_root=str(tmp_path / "elsewhere")),
            str(parquet), str(tmp_path / "out"), LOCAL,
        )  # fmt: skip


def test_videomme_on_object_storage(s3_bucket: str, s3_endpoint: str, tmp_path: Path) -> None:
    parquet, _ = write_videomme(tmp_path / "vmme")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.put(str(tmp_path / "vmme"), f"{s3_bucket}/vmme", recursive=True)
    config = BenchmarkConfig(benchmark="videomme", video_root=f"s3://{s3_bucket}/vmme")
    source = f"s3://{s3_bucket}/vmme/videomme/"
    prepared = prepare_benchmark(config, source, f"s3://{s3_bucket}/out", LOCAL)
    assert prepared.manifest == f"s3://{s3_bucket}/out/_benchmark/manifest.jsonl"
    records = read_records(prepared.manifest, LOCAL)
    assert [r["video_uri"] for r in records] == [
        f"s3://{s3_bucket}/vmme/data/001.mp4",
        f"s3://{s3_bucket}/vmme/data/002.MP4",
    ]
    assert len(expand_items(records, "mcq")) == 5


# --- MLVU --------------------------------------------------------------------------------------------


def _mlvu_entries(seed: int, video: str, question_type: str | None) -> list[dict]:
    out = []
    for item in _mcq(seed, 2):
        entry = {"video": video, "duration": 120.5, "question": item.question, "candidates": list(item.options),
                 "answer": item.options[LETTERS.index(item.answer)]}  # fmt: skip
        out.append(entry | ({"question_type": question_type} if question_type else {}))
    return out


def test_mlvu_original_folder_answers_as_option_text(tmp_path: Path) -> None:
    root = tmp_path / "MLVU"
    (root / "json").mkdir(parents=True)
    (root / "json/1_plotQA.json").write_text(json.dumps(_mlvu_entries(SEEDS[0], "movie_1.mp4", "plotQA")))
    (root / "json/4_count.json").write_text(json.dumps(_mlvu_entries(SEEDS[1], "movie_1.mp4", None)))
    prepared = prepare_benchmark(BenchmarkConfig(benchmark="mlvu"), str(root), str(tmp_path / "out"), LOCAL)
    records = read_records(prepared.manifest, LOCAL)
    assert [(r["id"], r["video_uri"]) for r in records] == [
        ("video/1_plotQA/movie_1", str(root / "video/1_plotQA/movie_1.mp4")),
        ("video/4_count/movie_1", str(root / "video/4_count/movie_1.mp4")),  # same name, other task
    ]
    items = expand_items(records, "mcq")
    assert [i.answer for i in items] == [m.answer for s in SEEDS for m in _mcq(s, 2)]  # text → letter
    assert [i.id.rsplit(":", 1)[1] for i in items] == ["1_plotQA_0", "1_plotQA_1", "4_count_0", "4_count_1"]
    assert {g["task_type"] for g in prepared.groups.values()} == {"plotQA", "count"}  # file stem: "count"
    # one task's file names the same layout's videos from the json folder itself
    single = prepare_benchmark(
        BenchmarkConfig(benchmark="mlvu"), str(root / "json/4_count.json"), str(tmp_path / "o2"), LOCAL
    )
    assert single.questions[0].video_uri == str(root / "video/4_count/movie_1.mp4")


def test_mlvu_dev_parquet_drops_the_option_lines_its_questions_embed(tmp_path: Path) -> None:
    items = _mcq(SEEDS[0], 3)
    rows = [
        {"video_name": f"{i % 2}_clip.mp4", "duration": "short", "task_type": ("count", "order", "count")[i],
         "question_id": f"q{i}", "candidates": list(m.options), "answer": m.answer,
         "question": m.question + "\nOptions:\n" + "\n".join(f"({LETTERS[j]}) {o}" for j, o in enumerate(m.options))}
        for i, m in enumerate(items)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dev.parquet")
    config = BenchmarkConfig(benchmark="mlvu", video_root=str(tmp_path / "videos"))
    prepared = prepare_benchmark(config, str(tmp_path / "dev.parquet"), str(tmp_path / "out"), LOCAL)
    assert [q.question for q in prepared.questions] == [m.question for m in items]
    assert [q.answer for q in prepared.questions] == [m.answer for m in items]
    assert [q.video_uri for q in prepared.questions] == [
        str(tmp_path / f"videos/{i}_clip.mp4") for i in (0, 1, 0)
    ]
    assert len(read_records(prepared.manifest, LOCAL)) == 2  # two videos, each decoded once


def _prepared(questions: list[Question], name: str = "mlvu") -> PreparedBenchmark:
    headline = "mean_task_accuracy" if name == "mlvu" else "accuracy"
    return PreparedBenchmark(name, "unused", questions, ("task_type",), headline, "default")


def _result(q: Question, text: str | None, status: str = "ok") -> dict:
    return {"id": q.row_id, "task": "mcq", "status": status, "answer": q.answer, "options": q.options,
            "text": text, "dense_text": text}  # fmt: skip


def test_mlvu_headline_is_the_mean_of_the_per_task_accuracies() -> None:
    def q(i: int, task: str) -> Question:
        return Question(f"v{i}", f"/v{i}.mp4", "0", "Q", ["a", "b"], "A", {"task_type": task})

    questions = [q(0, "count"), q(1, "count"), q(2, "count"), q(3, "order"), q(4, "order")]
    bad = Question("v5", "/v5.mp4", "0", "Q", ["a", "b"], None, {"task_type": "order"}, "no answer")
    rows = [_result(questions[0], "A"), _result(questions[1], "A"), _result(questions[2], "B"),
            _result(questions[3], "A"), _result(questions[4], "the shape is red")]  # fmt: skip
    report = benchmark_report(to_table(rows), _prepared([*questions, bad]))
    assert report["groups"]["task_type"] == {
        "count": {"scored": 3, "std": round(2 / 3, 4), "dense": round(2 / 3, 4)},
        "order": {"scored": 2, "std": 0.5, "dense": 0.5},
    }
    assert report["accuracy"] == {"std": 0.6, "dense": 0.6}  # pooled: 3 of 5
    assert report["headline"] == {"metric": "mean_task_accuracy", "std": round((2 / 3 + 0.5) / 2, 4),
                                  "dense": round((2 / 3 + 0.5) / 2, 4)}  # fmt: skip
    assert (report["questions"], report["questions_rejected"], report["scored"]) == (6, 1, 5)
    assert report["rejected_reasons"] == {"no answer": 1} and report["coverage"] == round(5 / 6, 4)


def test_error_rows_are_counted_and_not_scored() -> None:
    questions = [
        Question(f"v{i}", f"/v{i}.mp4", "0", "Q", ["a", "b"], "B", {"task_type": "t"}) for i in (0, 1)
    ]
    rows = [_result(questions[0], "B"), _result(questions[1], None, status="error")]
    report = benchmark_report(to_table(rows), _prepared(questions, "videomme"))
    assert (report["rows"], report["rows_error"], report["scored"]) == (2, 1, 1)
    assert report["headline"] == {"metric": "accuracy", "std": 1.0, "dense": 1.0}


# --- generic: LongVideoBench-, EgoSchema- and NExT-QA-shaped rows --------------------------------------


def _generic(tmp_path: Path, rows: list[dict], column_map: str, template: str | None) -> PreparedBenchmark:
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    config = BenchmarkConfig(benchmark="generic", column_map=column_map, video_template=template,
                             video_root=str(tmp_path / "root"))  # fmt: skip
    return prepare_benchmark(config, str(tmp_path / "bench.json"), str(tmp_path / "out"), LOCAL)


def test_longvideobench_shaped_rows(tmp_path: Path) -> None:
    items = _mcq(SEEDS[0], 2)
    rows = [
        {"id": f"lvb{i}", "video_path": "86CxyhFV9MI.mp4", "question": m.question, "duration_group": 600,
         **{f"option{j}": (m.options[j] if j < 4 else "N/A") for j in range(5)},
         "correct_choice": LETTERS.index(m.answer)}
        for i, m in enumerate(items)
    ]  # fmt: skip
    rows[1]["correct_choice"] = 4  # the N/A slot: rejected, with its reason
    column_map = "id=id,video=video_path,question=question,options=option0,option1,option2,option3,option4,"
    column_map += "answer=correct_choice,group=duration_group"
    prepared = _generic(tmp_path, rows, column_map, "{root}/videos/{video_path}")
    ok = [q for q in prepared.questions if q.error is None]
    assert [(q.row_id, q.options, q.answer) for q in ok] == [
        ("videos/86CxyhFV9MI:mcq:lvb0", list(items[0].options), items[0].answer)
    ]
    assert ok[0].video_uri == str(tmp_path / "root/videos/86CxyhFV9MI.mp4")
    assert ok[0].groups == {"duration_group": "600"}
    assert [q.error for q in prepared.rejected] == ["answer names an empty (N/A) option: '4'"]


def test_egoschema_shaped_rows(tmp_path: Path) -> None:
    items = [m for s in SEEDS for m in _mcq(s, 1)]
    rows = [
        {"q_uid": f"uid{i}", "video_idx": f"vid{i}", "question": m.question,
         "option": [f"{LETTERS[j]}. {o}" for j, o in enumerate(m.options)], "answer": LETTERS.index(m.answer)}
        for i, m in enumerate(items)
    ]  # fmt: skip
    column_map = "id=q_uid,question=question,options=option,answer=answer"
    prepared = _generic(tmp_path, rows, column_map, "{root}/videos/{video_idx}.mp4")
    assert [(q.video_key, q.options, q.answer) for q in prepared.questions] == [
        (f"videos/vid{i}", list(m.options), m.answer) for i, m in enumerate(items)
    ]
    items_ = expand_items(read_records(prepared.manifest, LOCAL), "mcq")
    assert [i.id for i in items_] == ["videos/vid0:mcq:uid0", "videos/vid1:mcq:uid1"]


def test_nextqa_shaped_rows_and_unmappable_answers(tmp_path: Path) -> None:
    items = _mcq(SEEDS[1], 3)
    rows = [
        {"video": 4010069381, "qid": i, "type": "TC", "question": m.question,
         **{f"a{j}": (m.options[j] if j < 4 else "none of them") for j in range(5)},
         "answer": LETTERS.index(m.answer)}
        for i, m in enumerate(items)
    ]  # fmt: skip
    rows[1]["answer"], rows[2]["answer"] = 9, None
    column_map = "video=video,id=qid,question=question,options=a0,a1,a2,a3,a4,answer=answer,group=type"
    prepared = _generic(tmp_path, rows, column_map, "{root}/{video}.mp4")
    assert [q.answer for q in prepared.questions if q.error is None] == [items[0].answer]
    assert prepared.questions[0].options[4] == "none of them" and len(prepared.questions[0].options) == 5
    assert [q.error for q in prepared.rejected] == ["answer names no option: '9'", "no answer"]
    report = benchmark_report(to_table([_result(prepared.questions[0], items[0].answer)]), prepared)
    assert report["rejected_reasons"] == {"answer names no option": 1, "no answer": 1}
    assert report["groups"] == {"type": {"TC": {"scored": 1, "std": 1.0, "dense": 1.0}}}


def test_a_benchmark_with_no_question_left_says_why(tmp_path: Path) -> None:
    rows = [{"v": "a.mp4", "q": "Q", "o": ["x", "y"], "ans": "z"}]
    with pytest.raises(PipelineError, match=r"none of its 1 questions can be asked \(answer names no option"):
        _generic(tmp_path, rows, "video=v,question=q,options=o,answer=ans", None)
    with pytest.raises(PipelineError, match="--video-template '{root}/{clip}.mp4': cannot fill it"):
        _generic(tmp_path, rows, "question=q,options=o,answer=ans", "{root}/{clip}.mp4")


# --- end to end ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_a_videomme_shaped_benchmark(
    ray_local: str, model_dir: Path, tmp_path: Path, capsys
) -> None:
    parquet, rows = write_videomme(tmp_path / "vmme", real_videos=True)
    output = tmp_path / "eval"
    argv = ["--benchmark", "videomme", "--input", str(parquet), "--video-root", str(tmp_path / "vmme"),
            "--prompt-preset", "lmms-eval", "--output", str(output), "--model", str(model_dir),
            "--max-new-tokens", "6", "--num-frames", "8", "--sparse-budget", "8", "--gamma", "3"]  # fmt: skip
    assert evaluate.main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report == json.loads((output / "_evaluation.json").read_text())
    bench = report["benchmark"]
    assert (bench["questions"], bench["questions_rejected"], bench["rows"], bench["scored"]) == (6, 1, 5, 5)
    assert bench["rejected"] == [{"id": "002:mcq:002-3", "error": "answer names no option: 'E'"}]
    assert report["tasks"] == ["mcq"] and report["rows"] == 5 and report["exact_match_rate"] == 1.0

    written = pq.read_table(list(output.glob("part-*.parquet"))).to_pylist()
    assert all(r["question"].startswith("Select the best answer") for r in written)  # the preset's prompt
    hits = {r["id"]: parse_lmms_eval_answer(r["text"], len(r["options"])) == r["answer"] for r in written}
    by_id = {f"{r['videoID']}:mcq:{r['question_id']}": r for r in rows}
    assert bench["accuracy"]["std"] == round(sum(hits.values()) / 5, 4) == bench["headline"]["std"]
    assert bench["headline"]["metric"] == "accuracy"
    for column in ("duration", "domain", "sub_category", "task_type"):
        groups = bench["groups"][column]
        assert sum(g["scored"] for g in groups.values()) == 5
        for value, g in groups.items():
            ids = [i for i in hits if by_id[i][column] == value]
            assert g["scored"] == len(ids) and g["std"] == round(sum(hits[i] for i in ids) / len(ids), 4)
    assert bench["groups"]["duration"]["short"]["scored"] == 3
    unparsable = sum(parse_lmms_eval_answer(r["text"], 4) is None for r in written)
    assert report["accuracy"]["unparsable_answers"]["std"] == unparsable
    assert report["accuracy"]["std"]["mcq"] == bench["accuracy"]["std"]
