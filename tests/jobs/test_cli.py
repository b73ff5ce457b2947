"""The jobs as commands: --help, fail-fast faults (before any model loads), evaluate, and the embedded
default run exactly as the README's quick start runs it (a subprocess, attached to the session's Ray).
The flag helper itself is tested in ``test_flags.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import annotate, caption, evaluate
from pipeline.demo.world import write_sample_dataset

ROOT = Path(__file__).resolve().parents[2]


def _last_json(capsys: pytest.CaptureFixture) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("job", [caption, annotate, evaluate])
def test_every_job_has_help(job, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--input", "--output", "--model", "--endpoint-url", "--num-frames", "--batch-size"):
        assert flag in text
    assert ("--if-exists" in text) == (job is not annotate)  # annotate always resumes
    assert ("--decoder" in text) == (job is not evaluate)  # evaluate runs both
    assert "--log-level {debug,info,warning,error}" in text


def test_unknown_flag_value_fails_in_argparse(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        caption.main(["--decoder", "fast"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fast' (choose from 'std', 'dense', 'auto')" in capsys.readouterr().err


def test_invalid_numbers_fail_with_the_reason(capsys) -> None:
    assert caption.main(["--num-frames", "0"]) == 2
    assert _last_json(capsys) == {"status": "error", "error": "num_frames must be an integer >= 1, got 0"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--input", "s3://videos/clips/", "--endpoint-url", "http://127.0.0.1:9"],
            "cannot reach the object store",
        ),
        (["--input", "s3://no-such-bucket/clips/"], "bucket 'no-such-bucket' does not exist"),
        (["--input", "MANIFEST"], "no 'video_uri' column"),
        (["--model", "/nonexistent/model"], "no such directory"),
        (["--run-id", "nightly/1"], "--run-id 'nightly/1': use letters"),
        (["--output", "FILE"], "is a file, not a folder"),
        (["--output", "FILE/sub"], "is a file, so the folder cannot be created there"),
    ],
)
def test_run_level_faults_fail_fast_before_any_model_loads(
    argv, message, s3_endpoint, tmp_path, capsys
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "path": "a.mp4"}) + "\n")
    (tmp_path / "a-file").write_text("not a folder")
    names = {
        "MANIFEST": str(manifest),
        "FILE": str(tmp_path / "a-file"),
        "FILE/sub": str(tmp_path / "a-file/sub"),
    }
    argv = [names.get(a, a) for a in argv]
    start = time.perf_counter()
    assert caption.main(["--output", str(tmp_path / "out"), *argv]) == 2  # a later --output wins
    out = _last_json(capsys)
    assert out["status"] == "error" and message in out["error"]
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "out").exists()  # nothing written, no actor started


@pytest.mark.slow
def test_evaluate_reports_accuracy_exactness_acceptance_and_speedup(
    ray_local: str, model_dir: Path, tmp_path: Path, capsys
) -> None:
    # No --input: the demo world's own clips (3 questions per clip), whose captions the demo scores
    output = tmp_path / "eval"
    argv = ["--num-samples", "3", "--seed", "1", "--output", str(output), "--model", str(model_dir),
            "--max-new-tokens", "6", "--num-frames", "8", "--sparse-budget", "8", "--gamma", "3"]  # fmt: skip
    assert evaluate.main(argv) == 0  # --task all: caption, qa, mcq
    report = _last_json(capsys)
    assert report == json.loads((output / "_evaluation.json").read_text())
    assert report["tasks"] == ["caption", "qa", "mcq"]
    assert (report["rows"], report["rows_ok"], report["compared_rows"]) == (15, 15, 15)
    rows = {task: r["rows"] for task, r in report["per_task"].items()}
    assert rows == {"caption": 3, "qa": 9, "mcq": 3}
    assert all(list((output / task).glob("part-*.parquet")) for task in rows)
    accuracy = report["accuracy"]
    assert accuracy["scored"] == 15 and accuracy["std"] == accuracy["dense"]
    assert {
        "caption_attributes",
        "caption_colour",
        "caption_shape",
        "caption_motion",
        "caption_order",
    } <= set(accuracy["std"])
    assert {"qa", "mcq"} <= set(accuracy["std"])
    assert report["per_task"]["mcq"]["accuracy"]["std"].keys() == {"mcq"}
    assert report["exact_match_rate"] == 1.0 and report["divergences"] == []  # fp32 greedy: lossless
    assert 0 <= report["acceptance_rate"] <= 1 and report["mean_accepted_per_round"] >= 1
    assert report["speedup"] > 0 and report["std_decode_seconds"] > 0

    manifest = write_sample_dataset(
        tmp_path / "samples", num_clips=3, seed=1
    )  # the same clips, as a manifest
    assert (
        evaluate.main([*argv, "--input", str(manifest), "--task", "mcq", "--output", str(tmp_path / "mcq")])
        == 0
    )
    single = _last_json(capsys)
    assert single["tasks"] == ["mcq"] and single["rows"] == 3 and "per_task" not in single
    assert list((tmp_path / "mcq").glob("part-*.parquet"))

    # A user's manifest with captions: counted, not scored by the demo world's attributes
    assert (
        evaluate.main([*argv, "--input", str(manifest), "--task", "caption", "--output", str(tmp_path / "c")])
        == 0
    )
    captions = _last_json(capsys)["accuracy"]
    assert captions["unscored_captions"] == 3 and captions["scored"] == 0
    assert not any(key.startswith("caption_") for key in captions["std"])


@pytest.mark.slow
def test_embedded_default_runs_like_the_quick_start(ray_local: str, tmp_path: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": ray_local, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.caption", "--max-new-tokens", "6", "--num-samples", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, lines  # stdout holds exactly the final JSON line; Ray's messages go to stderr
    summary = json.loads(lines[0])
    assert (summary["rows"], summary["rows_ok"], summary["status"]) == (2, 2, "ok")
    assert "[progress] rows 2/2" in proc.stderr  # live progress on stderr
    out = tmp_path / "out"
    assert json.loads((out / "_summary.json").read_text()) == summary
    assert len(list(out.glob("part-*.parquet"))) == 1


def test_readme_documents_every_flag_and_column() -> None:
    import dataclasses

    from pipeline.config import PipelineConfig
    from pipeline.schema import NAMES

    readme = (ROOT / "README.md").read_text()
    for field in dataclasses.fields(PipelineConfig):
        assert f"| `--{field.name.replace('_', '-')}` |" in readme, field.name
    for column in NAMES:
        assert f"| `{column}` |" in readme, column
    assert "RAY_AUTH_MODE=disabled" in readme and "jobs.annotate" in readme and "*/30 * * * *" in readme


def test_reusing_a_run_id_in_the_same_output_is_refused(tmp_path: Path, clip_bytes: dict, capsys) -> None:
    from pipeline.schema import to_table
    from pipeline.sink import ParquetSink
    from pipeline.storage import StorageOptions

    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a.mp4").write_bytes(clip_bytes["red-left.mp4"])
    sink = ParquetSink(str(tmp_path / "out"), StorageOptions(), run_id="nightly")
    sink.write(to_table([{"id": "x", "video_id": "x", "status": "error"}]))
    sink.close()
    argv = ["--input", str(tmp_path / "clips"), "--output", str(tmp_path / "out"), "--run-id", "nightly"]
    assert annotate.main(argv) == 2  # its part files would be overwritten
    assert "already holds files of run nightly" in _last_json(capsys)["error"]


@pytest.mark.slow
def test_ctrl_c_stops_a_job_cleanly_with_a_summary_and_exit_130(
    ray_local: str, model_dir: Path, tmp_path: Path, clip_bytes: dict
) -> None:
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(60):
        (clips / f"v{i:02d}.mp4").write_bytes(clip_bytes["red-left.mp4"])
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    argv = ["--input", str(clips), "--output", str(out), "--model", str(model_dir), "--batch-size", "1",
            "--rows-per-file", "1", "--max-new-tokens", "64", "--decoder", "dense", "--dense-sample", "0"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "jobs.caption", *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    summary = json.loads(lines[0])
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert 1 <= summary["rows"] < 60 and summary["files"] == summary["rows"]
    assert json.loads((out / "_summary.json").read_text()) == summary
    import pyarrow.parquet as pq

    ids = pq.read_table(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == summary["rows"]  # what was committed is whole, and resumable


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--video-root", "/videos"], "--video-root only apply to a benchmark: pass --benchmark too"),
        (["--benchmark", "generic"], "generic needs a --column-map"),
        (["--benchmark", "generic", "--column-map", "question=q,options=o,size=s"], "key 'size' unknown"),
        (["--benchmark", "videomme", "--input", "NOWHERE"], "benchmark input .* does not exist"),
        (["--benchmark", "mlvu", "--input", "NOWHERE", "--task", "qa"], "a benchmark is multiple-choice"),
    ],
)
def test_evaluate_benchmark_flags_fail_fast(argv, message, tmp_path, capsys) -> None:
    import re

    argv = [str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    assert evaluate.main([*argv, "--output", str(tmp_path / "out")]) == 2
    result = _last_json(capsys)
    assert result["status"] == "error" and re.search(message, result["error"]), result


def test_evaluate_lmms_eval_preset_sets_its_defaults_but_flags_win(monkeypatch, capsys) -> None:
    seen = []
    monkeypatch.setattr(evaluate, "run_evaluation", lambda config, tasks, benchmark: seen.append(
        (config, tasks, benchmark)) or {"status": "ok"})  # fmt: skip
    argv = ["--benchmark", "videomme", "--input", "v.parquet", "--prompt-preset", "lmms-eval"]
    assert evaluate.main([*argv, "--num-frames", "16", "--group-by", "duration"]) == 0
    config, tasks, benchmark = seen[-1]
    assert (config.num_frames, config.max_pixels, config.max_new_tokens) == (16, 602_112, 16)
    assert (benchmark.benchmark, benchmark.prompt_preset, benchmark.group_columns) == (
        "videomme",
        "lmms-eval",
        ("duration",),
    )
    assert evaluate.main(["--input", "m.jsonl"]) == 0  # no preset: the pipeline's own defaults
    assert seen[-1][0].num_frames == 8 and seen[-1][0].max_new_tokens == 128 and seen[-1][2].benchmark is None
