"""The evaluation report on hand-made rows, and ``run_evaluation`` with the pipeline run stubbed out:
the generic metrics (qa, mcq, acceptance from ``std_core.stats``), the demo's caption scorer applied only
to the demo's own clips, one output folder per task, and the report file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import evaluation
from pipeline.config import PipelineConfig
from pipeline.demo.scoring import score_caption
from pipeline.evaluation import NO_CAPTION_SCORER, evaluation_report, run_evaluation
from pipeline.schema import to_table

CAPTION = "A red circle moves left, then a blue square moves up."


def _rows(run_id: str = "r1") -> list[dict]:
    common = {"status": "ok", "dense_match": True, "decode_seconds": 1.0, "dense_decode_seconds": 2.0}
    common |= {"run_id": run_id, "drafted_tokens": 6, "rounds": 2}
    return [
        {"id": "a:caption", "task": "caption", "answer": CAPTION, "text": CAPTION, "dense_text": CAPTION,
         "generated_tokens": 6, "accepted_tokens": 3, **common},
        {"id": "a:qa:0", "task": "qa", "answer": "red", "text": " Red.", "dense_text": " Red.",
         "generated_tokens": 4, "accepted_tokens": 1, **common},
        {"id": "a:mcq:0", "task": "mcq", "answer": "B", "options": ["x", "y"], "text": "A", "dense_text": "A",
         "generated_tokens": 3, "accepted_tokens": 0, **common},
        {"id": "b:caption", "task": "caption", "status": "error", "run_id": run_id},
    ]  # fmt: skip


def test_report_without_a_caption_scorer_counts_captions_but_does_not_score_them() -> None:
    report = evaluation_report(to_table(_rows()))
    accuracy = report["accuracy"]
    assert accuracy["std"] == {"qa": 1.0, "mcq": 0.0} and accuracy["dense"] == accuracy["std"]
    assert accuracy["scored"] == 2 and accuracy["unscored_captions"] == 1
    assert accuracy["caption"] == NO_CAPTION_SCORER
    assert (report["rows"], report["rows_ok"], report["rows_error"], report["compared_rows"]) == (4, 3, 1, 3)
    # summed counts: accepted 4 of 18 drafted; committed (6-1)+(4-1)+(3-1) = 10 over 6 rounds
    assert report["acceptance_rate"] == round(4 / 18, 4)
    assert report["mean_accepted_per_round"] == round(10 / 6, 4)
    assert (report["exact_match_rate"], report["speedup"]) == (1.0, 2.0)


def test_report_with_the_demo_scorer_scores_caption_attributes() -> None:
    accuracy = evaluation_report(to_table(_rows()), caption_scorer=score_caption)["accuracy"]
    assert accuracy["scored"] == 3 and "unscored_captions" not in accuracy
    assert accuracy["std"]["caption_colour"] == 1.0 and accuracy["std"]["caption_attributes"] == 1.0


def test_report_of_no_rows_has_no_ratios() -> None:
    report = evaluation_report(to_table([]))
    assert report["acceptance_rate"] is None and report["mean_accepted_per_round"] is None
    assert report["exact_match_rate"] is None and report["speedup"] is None


@pytest.fixture
def stub_runs(monkeypatch: pytest.MonkeyPatch) -> list[PipelineConfig]:
    """``run_pipeline`` and ``read_rows`` replaced: each run 'writes' the hand-made rows of its task."""
    runs: list[PipelineConfig] = []

    def run_pipeline(config: PipelineConfig) -> dict:
        runs.append(config)
        return {"run_id": f"run{len(runs)}", "model": "tiny"}

    def read_rows(output: str, storage: object) -> pa.Table:
        config = runs[-1]
        rows = _rows(f"run{len(runs)}") + _rows("an-earlier-run")
        return to_table([r for r in rows if r["task"] == config.task])

    monkeypatch.setattr(evaluation, "run_pipeline", run_pipeline)
    monkeypatch.setattr(evaluation, "read_rows", read_rows)
    return runs


def test_run_evaluation_all_tasks_each_into_its_own_folder(stub_runs: list, tmp_path: Path) -> None:
    report = run_evaluation(PipelineConfig(output=str(tmp_path), decoder="dense"), "all")
    assert [(c.task, c.output, c.decoder, c.dense_sample) for c in stub_runs] == [
        (task, str(tmp_path / task), "std", -1) for task in ("caption", "qa", "mcq")
    ]
    assert report == json.loads((tmp_path / "_evaluation.json").read_text())
    assert report["tasks"] == ["caption", "qa", "mcq"] and report["model"] == "tiny"
    assert report["rows"] == 4 and {t: r["rows"] for t, r in report["per_task"].items()} == {
        "caption": 2,
        "qa": 1,
        "mcq": 1,
    }
    assert report["accuracy"]["std"]["caption_colour"] == 1.0  # no --input: the demo's own clips


def test_run_evaluation_of_a_manifest_has_no_caption_attribute_metrics(
    stub_runs: list, tmp_path: Path
) -> None:
    config = PipelineConfig(input=str(tmp_path / "manifest.jsonl"), output=str(tmp_path))
    report = run_evaluation(config, "caption")
    assert [c.output for c in stub_runs] == [str(tmp_path)] and "per_task" not in report
    assert not any(key.startswith("caption_") for key in report["accuracy"]["std"])
    assert report["accuracy"]["unscored_captions"] == 1
    with pytest.raises(ValueError, match="tasks must be one of"):
        run_evaluation(config, "summaries")


def test_evaluation_does_not_import_the_demo() -> None:
    code = "import sys, pipeline.evaluation; print([m for m in sys.modules if m.startswith('pipeline.demo')])"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_unparsable_answers_are_wrong_and_counted_per_decoder() -> None:
    common = {"task": "mcq", "status": "ok", "answer": "B", "options": ["x", "y", "z", "w"], "run_id": "r"}
    rows = [
        {"id": "a", "text": "The best answer is B", "dense_text": "The best answer is B", **common},
        {"id": "b", "text": "the shape is red", "dense_text": "B", **common},
    ]
    default = evaluation_report(to_table(rows))["accuracy"]
    assert default["std"] == {"mcq": 0.5} and default["unparsable_answers"] == {"std": 1, "dense": 0}
    lmms = evaluation_report(to_table(rows), mcq_parser=evaluation.MCQ_PARSERS["lmms-eval"])["accuracy"]
    assert lmms["std"] == {"mcq": 0.5} and lmms["dense"] == {"mcq": 1.0}


def test_run_evaluation_of_a_benchmark_runs_its_manifest_once_as_mcq(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The pipeline run stubbed: it 'answers' the normalised manifest's items, right for video 1 only."""
    from pipeline.benchmarks import BenchmarkConfig
    from pipeline.sources import expand_items, read_records
    from pipeline.storage import StorageOptions

    rows = [
        {
            "vid": v,
            "q": f"Q{v}{i}",
            "opts": ["A. red", "B. blue"],
            "ans": i % 2,
            "dur": ("short", "long")[v - 1],
        }
        for v in (1, 2)
        for i in range(2)
    ] + [{"vid": 2, "q": "bad", "opts": ["A. red", "B. blue"], "ans": 5, "dur": "long"}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs: list[PipelineConfig] = []

    def run_pipeline(config: PipelineConfig) -> dict:
        runs.append(config)
        return {"run_id": "r1", "model": "tiny"}

    def read_rows(output: str, storage: object) -> pa.Table:
        items = expand_items(read_records(runs[-1].input, StorageOptions()), "mcq")
        return to_table(
            {"id": i.id, "task": "mcq", "status": "ok", "answer": i.answer, "options": i.options, "run_id": "r1",
             "text": i.answer if i.video_id.endswith("1") else "no idea", "dense_text": i.answer}
            for i in items
        )  # fmt: skip

    monkeypatch.setattr(evaluation, "run_pipeline", run_pipeline)
    monkeypatch.setattr(evaluation, "read_rows", read_rows)
    bench = BenchmarkConfig(benchmark="generic", column_map="video=vid,question=q,options=opts,answer=ans,group=dur",
                            video_template="{root}/{vid}.mp4", video_root=str(tmp_path))  # fmt: skip
    config = PipelineConfig(input=str(tmp_path / "bench.jsonl"), output=str(tmp_path / "out"))
    report = run_evaluation(config, benchmark=bench)
    assert [(c.task, c.input, c.dense_sample) for c in runs] == [
        ("mcq", str(tmp_path / "out/_benchmark/manifest.jsonl"), -1)
    ]
    assert report == json.loads((tmp_path / "out/_evaluation.json").read_text())
    summary = report["benchmark"]
    assert (summary["questions"], summary["questions_rejected"], summary["scored"]) == (5, 1, 4)
    assert summary["groups"]["dur"] == {
        "long": {"scored": 2, "std": 0.0, "dense": 1.0},
        "short": {"scored": 2, "std": 1.0, "dense": 1.0},
    }
    assert summary["headline"] == {"metric": "accuracy", "std": 0.5, "dense": 1.0}
    assert report["accuracy"]["unparsable_answers"] == {"std": 2, "dense": 0}
    with pytest.raises(ValueError, match="a benchmark is multiple-choice"):
        run_evaluation(config, "qa", benchmark=bench)
    with pytest.raises(ValueError, match="--benchmark generic reads --input"):
        run_evaluation(PipelineConfig(output=str(tmp_path / "o")), benchmark=bench)
