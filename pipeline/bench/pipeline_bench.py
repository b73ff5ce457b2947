"""Pipeline throughput: the decode stage alone, the annotate stage alone, and the whole run on local Ray.

Built on the pipeline's own pieces, measured from outside (nothing in them changes):

1. **Videos**: ``pipeline.demo.world.write_sample_dataset`` (the demo world's clips, H.264 files) and the
   run's plan (``pipeline.run.plan_run``), exactly as ``jobs.caption`` would see them.
2. **Decode stage alone**: :class:`pipeline.frames.FrameDecoder` called in this process, one batch at a
   time, on one core: videos/s per CPU core.
3. **Annotate stage alone**: :class:`pipeline.annotator.Annotator` built here (model load and warm-up
   timed apart) and called on the decoded batches: videos/s and tokens/s of one model actor.
4. **End to end**: ``pipeline.run.run_pipeline`` on a local Ray cluster, with the annotator subclassed
   to log, per actor, when it became ready and when each batch started and ended. Idle fraction =
   time between ready and the actor's last batch end not spent in a batch, over that window, summed
   over actors: the time the model actors sat waiting for frames. The run's wall time also holds the
   start-up (Ray Data planning, actor start, model load and warm-up: run start → first actor ready),
   reported apart, and the throughput over the active part (first batch start → last batch end).

The dense re-run of sampled batches (``dense_sample``) is off in every stage, so each video is decoded
once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pipeline.annotator import Annotator
from pipeline.bench.measure import torch_threads
from pipeline.config import DecoderMode, PipelineConfig, flag
from pipeline.demo.world import write_sample_dataset
from pipeline.frames import FrameDecoder, FrameSampling
from pipeline.models import pixel_limit
from pipeline.run import annotator_settings, plan_run, run_pipeline
from pipeline.sources import items_from_table, video_rows
from std_core.stats import RowStats, acceptance_rate, tokens_per_second

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineBenchConfig:
    """One field per ``jobs.benchmark pipeline`` flag (``jobs/_cli.py`` reads each field's metadata)."""

    model: str | None = flag(None, "model directory; None: the demo model")
    videos: int = flag(16, "generated demo-world videos")
    num_frames: int = flag(32, "frames sampled per video")
    batch_size: int = flag(4, "videos per annotator batch")
    num_actors: int = flag(1, "model actors of the end-to-end run")
    ray_cpus: int | None = flag(None, "CPUs of the local Ray cluster; None: every core of this machine")
    decoder: DecoderMode = flag("std", "the pipeline's --decoder")
    max_new_tokens: int = flag(32, "upper bound on generated tokens per row")
    threads: int = flag(1, "torch threads of the in-process stages")
    out: str = flag("bench-out/pipeline", "scratch folder (videos, Parquet output)")
    questions: int = flag(
        0,
        "qa questions per video (the demo world's); > 0 measures the annotate stage with --share-prefill on "
        "and off side by side (items/s, acceptance); 0: the caption task",
    )
    dry_run: bool = flag(False, "plan only: print the configuration as the final JSON line; run nothing")

    def __post_init__(self) -> None:
        for name in ("videos", "num_frames", "batch_size", "num_actors", "max_new_tokens", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.questions < 0:
            raise ValueError("questions must be >= 0")

    def pipeline_config(self, manifest: Path, output: Path) -> PipelineConfig:
        return PipelineConfig(
            input=str(manifest),
            output=str(output),
            model=self.model,
            decoder=self.decoder,
            task="qa" if self.questions else "caption",
            dense_sample=0,
            num_frames=self.num_frames,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            num_actors=self.num_actors,
            num_gpus=0.0,
        )


def run_pipeline_benchmark(config: PipelineBenchConfig) -> dict:
    """All three measurements (see the module docstring); returns one flat summary (with ``dry_run``:
    the configuration, and nothing run)."""
    if config.dry_run:
        return {"benchmark": "pipeline", "status": "planned", "dry_run": True, "config": asdict(config)}
    with torch_threads(config.threads):
        return _run(config)


def _run(config: PipelineBenchConfig) -> dict:
    out = Path(config.out).resolve() / time.strftime("%Y%m%dT%H%M%S")
    manifest = write_sample_dataset(
        out / "videos", num_clips=config.videos, seed=0, questions=config.questions or 3
    )
    pipeline_config = config.pipeline_config(manifest, out / "stages")
    plan = plan_run(pipeline_config)
    batches = _batches(video_rows(items_from_table(plan.pending_items())), config.batch_size)
    decode, decoded = decode_stage(pipeline_config, plan.storage, batches)
    log.info("[pipeline] decode stage: %.2f videos/s per core", decode["decode_videos_per_s_per_core"] or 0.0)
    annotate = annotate_stage(pipeline_config, plan, decoded)
    log.info("[pipeline] annotate stage: %.3f videos/s", annotate["annotate_videos_per_s"])
    if config.questions:
        unshared = annotate_stage(replace(pipeline_config, share_prefill="off"), plan, decoded)
        annotate |= {f"unshared_{k}": v for k, v in unshared.items()}
        annotate["share_prefill_speedup"] = (
            annotate["annotate_items_per_s"] / unshared["annotate_items_per_s"]
        )
        log.info(
            "[pipeline] annotate stage, prefill shared / not: %.2fx items/s",
            annotate["share_prefill_speedup"],
        )
    e2e = end_to_end(config, replace(pipeline_config, output=str(out / "e2e")), out / "timing")
    return {"benchmark": "pipeline", "status": "ok", "videos": config.videos, **decode, **annotate, **e2e}


def _batches(rows: list[dict], size: int) -> list[dict]:
    """Rows as ``map_batches``-style column batches of ``size`` videos."""
    import numpy as np

    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    return [{key: np.array([r[key] for r in chunk], dtype=object) for key in chunk[0]} for chunk in chunks]


def decode_stage(config: PipelineConfig, storage: object, batches: list[dict]) -> tuple[dict, list[dict]]:
    """Decode every batch in this process (one core): throughput and the decoded batches."""
    sampling = FrameSampling(
        config.num_frames, config.fps, config.max_pixels or pixel_limit(config.model, storage)
    )
    decoder = FrameDecoder(sampling, storage)
    cpu0, start = time.process_time(), time.perf_counter()
    decoded = [decoder(batch) for batch in batches]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    videos = sum(len(b["video_uri"]) for b in batches)
    return {
        "decode_videos": videos,
        "decode_seconds": wall,
        "decode_cpu_seconds": cpu,
        "decode_videos_per_s_per_core": videos / cpu if cpu else None,
        "decode_videos_per_s_wall": videos / wall,
        "decode_errors": int(sum((b["frame_error"] != "").sum() for b in decoded)),
    }, decoded


def annotate_stage(config: PipelineConfig, plan: object, decoded: list[dict]) -> dict:
    """One annotator in this process on the decoded batches: load time, then throughput."""
    start = time.perf_counter()
    annotator = Annotator(annotator_settings(config, plan, 0.0))
    ready = time.perf_counter()
    tables = [annotator(batch) for batch in decoded]
    wall = time.perf_counter() - ready
    videos = sum(len(b["video_uri"]) for b in decoded)
    rows = [row for t in tables for row in t.to_pylist()]
    tokens = sum((RowStats.from_columns(row) for row in rows), RowStats()).generated
    ok = sum(row["status"] == "ok" for row in rows)
    counts = sum((RowStats.from_columns(row) for row in rows if row["status"] == "ok"), RowStats())
    return {
        "annotate_load_seconds": ready - start,
        "annotate_seconds": wall,
        "annotate_videos_per_s": videos / wall,
        "annotate_items_per_s": len(rows) / wall,
        "annotate_acceptance_rate": acceptance_rate(counts.accepted, counts.drafted),
        "annotate_tokens_per_s": tokens_per_second(tokens, wall),
        "annotate_rows_ok": ok,
        "annotate_threads": torch.get_num_threads(),
    }


def end_to_end(config: PipelineBenchConfig, pipeline_config: PipelineConfig, timing_dir: Path) -> dict:
    """``run_pipeline`` on local Ray with a timed annotator; throughput and the actors' idle fraction."""
    import ray

    timing_dir.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(num_cpus=config.ray_cpus or os.cpu_count(), include_dashboard=False, configure_logging=False)
    started = time.time()
    summary = run_pipeline(pipeline_config, annotator_cls=timed_annotator(str(timing_dir)))
    entries = read_timings(timing_dir)
    return {
        "e2e_wall_seconds": summary["wall_seconds"],
        "e2e_videos_per_s": summary["videos_per_s"],
        "e2e_generated_tokens_per_s": summary["generated_tokens_per_s"],
        "e2e_rows_ok": summary["rows_ok"],
        "e2e_status": summary["status"],
        "ray_cpus": int(ray.cluster_resources().get("CPU", 0)),
        "num_actors": pipeline_config.num_actors,
        **timeline(entries, started, summary["videos"]),
        **idle_fraction(entries),
    }


def timed_annotator(timing_dir: str) -> type:
    """An :class:`Annotator` that appends ``{"actor", "event", "t", ...}`` lines to ``timing_dir``."""

    class TimedAnnotator(Annotator):
        def __init__(self, settings: object) -> None:
            super().__init__(settings)
            self._timing = Path(timing_dir) / f"actor-{os.getpid()}-{id(self)}.jsonl"
            self._record({"event": "ready", "t": time.time()})

        def __call__(self, batch: dict):
            start = time.time()
            table = super().__call__(batch)
            self._record(
                {"event": "batch", "start": start, "end": time.time(), "videos": len(batch["video_id"])}
            )
            return table

        def _record(self, entry: dict) -> None:
            with open(self._timing, "a") as handle:
                handle.write(json.dumps({"actor": self._timing.stem, **entry}) + "\n")

    return TimedAnnotator


def read_timings(timing_dir: Path) -> list[dict]:
    return [
        json.loads(line)
        for path in sorted(timing_dir.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def timeline(entries: list[dict], started: float, videos: int) -> dict:
    """Start-up (run start → first actor ready) and the steady part (first batch start → last batch
    end) of a run, and the throughput over the steady part."""
    ready = [e["t"] for e in entries if e["event"] == "ready"]
    batches = [e for e in entries if e["event"] == "batch"]
    if not ready or not batches:
        return {"e2e_startup_seconds": None, "e2e_active_seconds": None, "e2e_videos_per_s_active": None}
    active = max(e["end"] for e in batches) - min(e["start"] for e in batches)
    return {
        "e2e_startup_seconds": min(ready) - started,
        "e2e_active_seconds": active,
        "e2e_videos_per_s_active": videos / active if active > 0 else None,
    }


def idle_fraction(entries: list[dict]) -> dict:
    """Per actor, idle = (last batch end − ready) − busy; summed over actors (see the module docstring)."""
    window = busy = 0.0
    actors = sorted({e["actor"] for e in entries})
    for actor in actors:
        mine = [e for e in entries if e["actor"] == actor]
        ready = min((e["t"] for e in mine if e["event"] == "ready"), default=None)
        spans = [(e["start"], e["end"]) for e in mine if e["event"] == "batch"]
        if ready is None or not spans:
            continue
        window += max(end for _, end in spans) - ready
        busy += sum(end - start for start, end in spans)
    return {
        "annotate_actors_seen": len(actors),
        "annotate_busy_seconds": busy,
        "annotate_idle_seconds": max(0.0, window - busy),
        "annotate_idle_fraction": max(0.0, window - busy) / window if window else None,
    }
