"""The pipeline benchmark: the idle-time arithmetic, the two stages measured in-process on real H.264
clips of the demo world with a small random model, and (slow) the whole benchmark on local Ray.

No timing is asserted; the tests check that each stage processed every video without errors and that
the reported rates and fractions are consistent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs import benchmark
from jobs._cli import config_from_args
from pipeline.bench.pipeline_bench import (
    PipelineBenchConfig,
    _batches,
    annotate_stage,
    decode_stage,
    idle_fraction,
    timeline,
)
from pipeline.demo.world import write_sample_dataset
from pipeline.run import plan_run
from pipeline.sources import items_from_table, video_rows


def test_idle_fraction_counts_gaps_between_ready_and_the_last_batch() -> None:
    entries = [
        {"actor": "a", "event": "ready", "t": 0.0},
        {"actor": "a", "event": "batch", "start": 1.0, "end": 3.0, "videos": 2},
        {"actor": "a", "event": "batch", "start": 4.0, "end": 5.0, "videos": 2},
        {"actor": "b", "event": "ready", "t": 0.0},
        {"actor": "b", "event": "batch", "start": 0.0, "end": 5.0, "videos": 4},
        {"actor": "c", "event": "ready", "t": 0.0},  # never got a batch: no window
    ]
    idle = idle_fraction(entries)
    assert idle["annotate_busy_seconds"] == pytest.approx(8.0)
    assert idle["annotate_idle_seconds"] == pytest.approx(2.0)
    assert idle["annotate_idle_fraction"] == pytest.approx(0.2)
    assert idle["annotate_actors_seen"] == 3
    assert idle_fraction([])["annotate_idle_fraction"] is None
    steady = timeline(entries, started=-2.0, videos=8)
    assert steady == {"e2e_startup_seconds": 2.0, "e2e_active_seconds": 5.0, "e2e_videos_per_s_active": 1.6}


def test_stages_alone_process_every_video(model_dir: Path, tmp_path: Path) -> None:
    config = PipelineBenchConfig(model=str(model_dir), videos=3, num_frames=4, batch_size=2, max_new_tokens=4)
    manifest = write_sample_dataset(tmp_path / "videos", num_clips=3)
    pipeline_config = config.pipeline_config(manifest, tmp_path / "out")
    plan = plan_run(pipeline_config)
    batches = _batches(video_rows(items_from_table(plan.pending_items())), config.batch_size)
    assert [len(b["video_uri"]) for b in batches] == [2, 1]
    decode, decoded = decode_stage(pipeline_config, plan.storage, batches)
    assert decode["decode_videos"] == 3 and decode["decode_errors"] == 0
    assert decode["decode_videos_per_s_per_core"] > 0 and decoded[0]["frames"][0].shape[0] == 4
    annotate = annotate_stage(pipeline_config, plan, decoded)
    assert annotate["annotate_rows_ok"] == 3
    assert annotate["annotate_videos_per_s"] > 0 and annotate["annotate_tokens_per_s"] > 0


def test_pipeline_flags_keep_their_names_and_defaults() -> None:
    def config(*argv: str) -> PipelineBenchConfig:
        return config_from_args(PipelineBenchConfig, benchmark.build_parser().parse_args(["pipeline", *argv]))

    assert config() == PipelineBenchConfig()
    assert (PipelineBenchConfig().videos, PipelineBenchConfig().out) == (16, "bench-out/pipeline")
    argv = ["--model", "m", "--videos", "4", "--num-frames", "8", "--batch-size", "2", "--num-actors", "2",
            "--ray-cpus", "3", "--decoder", "dense", "--max-new-tokens", "5", "--threads", "2", "--out", "o"]  # fmt: skip
    assert config(*argv) == PipelineBenchConfig("m", 4, 8, 2, 2, 3, "dense", 5, 2, "o")
    with pytest.raises(SystemExit):
        config("--decoder", "fast")


def test_pipeline_config_rejects_zero_videos() -> None:
    with pytest.raises(ValueError, match="videos"):
        PipelineBenchConfig(videos=0)


@pytest.mark.slow
def test_pipeline_benchmark_end_to_end(ray_local: str, model_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["pipeline", "--model", str(model_dir), "--videos", "4", "--num-frames", "4", "--batch-size", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path)]  # fmt: skip
    assert benchmark.main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "pipeline" and out["e2e_status"] == "ok" and out["e2e_rows_ok"] == 4
    assert out["e2e_videos_per_s"] > 0 and out["annotate_actors_seen"] >= 1
    assert 0 <= out["annotate_idle_fraction"] < 1
    assert out["e2e_startup_seconds"] > 0 and out["e2e_active_seconds"] <= out["e2e_wall_seconds"]
