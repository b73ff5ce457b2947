"""``--dry-run``: the plan as the final JSON line, with the resume set and ``--limit`` applied, and nothing
run: no model loaded, no Ray started, nothing written to the output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import annotate, caption
from pipeline.schema import to_table
from pipeline.sink import ParquetSink
from pipeline.storage import StorageOptions

ROOT = Path(__file__).resolve().parents[2]


def _clips(tmp_path: Path, clip_bytes: dict, count: int) -> Path:
    clips = tmp_path / "clips"
    clips.mkdir()
    for i in range(count):
        (clips / f"v{i}.mp4").write_bytes(clip_bytes["red-left.mp4"])
    return clips


def test_dry_run_prints_the_plan_with_resume_and_limit_applied(
    tmp_path: Path, clip_bytes: dict, capsys
) -> None:
    clips, out = _clips(tmp_path, clip_bytes, 5), tmp_path / "out"
    sink = ParquetSink(str(out), StorageOptions(), run_id="earlier")
    sink.write(to_table([{"id": "v0:caption", "video_id": "v0", "status": "ok"}]))  # v0 is done
    sink.close()
    before = sorted(p.name for p in out.iterdir())
    assert annotate.main(["--input", str(clips), "--output", str(out), "--limit", "3", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["status"] == "planned" and plan["dry_run"] is True
    assert (plan["items_total"], plan["items_skipped"], plan["items_to_run"], plan["items_deferred"]) == (
        5,
        1,
        3,
        1,
    )
    assert plan["first_items"] == ["v1:caption", "v2:caption", "v3:caption"] and plan["videos_to_run"] == 3
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, no lease taken


def test_dry_run_still_fails_fast_on_a_bad_run(tmp_path: Path, clip_bytes: dict, capsys) -> None:
    clips = _clips(tmp_path, clip_bytes, 1)
    code = caption.main(
        ["--input", str(clips), "--output", str(tmp_path / "o"), "--model", "./nope", "--dry-run"]
    )
    assert (
        code == 2
        and "no such directory" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    )


@pytest.mark.slow
def test_dry_run_loads_no_model_starts_no_ray_and_imports_no_torch_or_ffmpeg(
    tmp_path: Path, clip_bytes: dict
) -> None:
    clips = _clips(tmp_path, clip_bytes, 2)
    code = (
        "import sys, json\n"
        "from jobs import caption\n"
        f"rc = caption.main(['--input', {str(clips)!r}, '--output', {str(tmp_path / 'out')!r}, '--dry-run'])\n"
        "assert rc == 0, rc\n"
        "heavy = [m for m in ('torch', 'ray', 'av', 'decord') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["items_to_run"] == 2
    assert not (tmp_path / "out").exists()


def test_evaluate_dry_run_plans_every_task_and_writes_nothing(tmp_path: Path, capsys) -> None:
    from jobs import evaluate
    from pipeline.demo.world import write_sample_dataset

    manifest = write_sample_dataset(tmp_path / "videos", num_clips=2, seed=3)
    out = tmp_path / "eval"
    assert evaluate.main(["--input", str(manifest), "--output", str(out), "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["status"] == "planned" and report["tasks"] == ["caption", "qa", "mcq"]
    to_run = {task: plan["items_to_run"] for task, plan in report["plans"].items()}
    assert to_run == {"caption": 2, "qa": 6, "mcq": 2}  # 3 questions and one MCQ item per clip
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["decoder", "--visual-tokens", "1024", "4096", "--batch", "1", "8"],
            4,
        ),  # the grid: 2 sizes × 2 batches
        (["pipeline", "--videos", "3"], None),
    ],
)
def test_the_benchmarks_dry_run_lists_what_would_run(argv: list[str], expected: int | None, capsys) -> None:
    from jobs import benchmark

    assert benchmark.main([*argv, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["status"] == "planned" and plan["dry_run"] is True
    if expected is None:
        assert plan["config"]["videos"] == 3
    else:
        cases = plan["cases"]
        assert len(cases) == expected and {(c["visual_tokens"], c["batch"]) for c in cases} == {
            (1024, 1), (1024, 8), (4096, 1), (4096, 8)
        }  # fmt: skip


def test_training_dry_run_checks_the_output_and_trains_nothing(tmp_path: Path, capsys) -> None:
    from jobs import train_demo_model

    out = tmp_path / "model"
    assert train_demo_model.main(["--output", str(out), "--steps", "5", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["status"] == "planned" and plan["config"]["steps"] == 5 and not out.exists()
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"weights")
    assert train_demo_model.main(["--output", str(out), "--dry-run"]) == 2  # the --force guard still applies
    assert "refusing to overwrite" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
