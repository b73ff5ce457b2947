"""The driver at scale: planning time and driver memory against the size of the input and of the output.

    python -m jobs.benchmark planning --items 1000000 --limit 4               # plan a 4-item run
    python -m jobs.benchmark planning --items 1000000 --done 1.0              # a tick with nothing to do
    python -m jobs.benchmark planning --items 1000000 --limit -1 --run        # a simulated whole run
    python -m jobs.benchmark planning --items 10000000 --limit -1 --run --first-rows  # up to the first rows
    python -m jobs.benchmark planning --items 10000000 --limit -1 --run --batch-size 256 \
        --segment-videos 2500000                                             # a whole 10M run, ~47 min

Each case writes a synthetic JSON Lines manifest of ``items`` videos (and, with ``--done``, an output in
which that fraction of them already has an ok row), then runs the driver in a fresh process and reads
that process's own peak RSS:

- plan only: ``jobs.annotate --dry-run``, exactly what a scheduled run does before it starts Ray;
- ``--run``: the whole run (``pipeline.run.run_pipeline``: lease, plan, Ray Data, sink, accounting)
  with stub decode and annotate stages (:class:`StubAnnotator`: one ok row per item, no model), so what
  is measured is the driver: its memory, its planning, and the time to the first row;
- ``--run --first-rows``: the same run, stopped (SIGTERM, as a scheduler would) once its first result
  rows are committed: planning, Ray start-up and the first batch, without waiting for the rest.

Driver memory is reported twice: ``driver_max_rss_mb`` (``VmHWM``: everything resident, including the
object store pages that the driver wrote with ``ray.put`` and keeps mapped) and ``driver_max_private_mb``
(the largest ``RssAnon`` seen, sampled every 0.1 s: the driver's own heap, without those shared pages).

The last stdout line is one JSON object: a record per case.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import AnnotatorSettings, PipelineConfig, flag
from pipeline.schema import STATUS_OK, to_table
from pipeline.sources import items_from_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlanningBenchConfig:
    """One field per ``jobs.benchmark planning`` flag."""

    items: tuple[int, ...] = flag((1_000_000,), "videos in the synthetic manifest (one case each)")
    limit: int = flag(4, "--limit of the run; -1: none")
    done: float = flag(0.0, "fraction of the items that already have an ok row in the output")
    task: Literal["caption", "qa"] = flag("caption", "caption (one item per video) or qa (three per video)")
    run: bool = flag(False, "run the plan through Ray Data with stub stages, not only --dry-run")
    batch_size: int = flag(8, "videos per annotate batch (--run)")
    first_rows: bool = flag(False, "with --run: stop the run once its first rows are committed")
    decode_seconds: float = flag(0.0, "with --run: seconds the stub decode stage spends on each video")
    segment_videos: int = flag(
        PipelineConfig.segment_videos, "with --run: the run's --segment-videos (videos per Ray Dataset)"
    )
    out: str = flag("bench-out/planning", "folder for the manifests and outputs")

    def __post_init__(self) -> None:
        if not 0.0 <= self.done <= 1.0:
            raise ValueError(f"done: a fraction in [0, 1], not {self.done}")
        if self.limit < -1:
            raise ValueError(f"limit: -1 (none) or a count, not {self.limit}")


def run_planning_benchmark(config: PlanningBenchConfig) -> dict:
    root = Path(config.out).resolve()
    records = []
    for n in config.items:
        manifest = write_manifest(root / f"manifest-{config.task}-{n}.jsonl", n, config.task)
        output = root / f"out-{config.task}-{n}-done{config.done:g}-{time.strftime('%Y%m%dT%H%M%S')}"
        if config.done:
            write_done_rows(output, n, config.done, config.task)
        record = _child(config, manifest, output)
        record |= {"items": n, "task": config.task, "done_fraction": config.done, "limit": config.limit}
        log.info("[planning] %s", json.dumps(record))
        records.append(record)
    return {"cases": records}


QUESTIONS = ("What moves?", "Which colour is it?", "Where does it go?")


def write_manifest(path: Path, videos: int, task: str) -> Path:
    """A JSON Lines manifest of ``videos`` rows (kept: the same size is reused)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = f', "questions": {json.dumps(list(QUESTIONS))}' if task == "qa" else ""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(videos):
            f.write(
                f'{{"id": "clip{i:08d}", "video_uri": "s3://bucket/videos/{i % 997:03d}/clip{i:08d}.mp4"{extra}}}\n'
            )
    tmp.rename(path)
    return path


def write_done_rows(output: Path, videos: int, fraction: float, task: str) -> None:
    """Ok rows for the first ``fraction`` of the videos' items, as earlier runs would have left them."""
    done = int(videos * fraction)
    ids = [f"clip{i:08d}" for i in range(done)]
    item_ids = (
        [f"{v}:caption" for v in ids] if task == "caption" else [f"{v}:qa:{q}" for v in ids for q in range(3)]
    )
    output.mkdir(parents=True)
    table = pa.table({"id": item_ids, "status": [STATUS_OK] * len(item_ids)})
    pq.write_table(table, output / "part-earlier-00000.parquet")


_CHILD = """
import json, sys, time
from pipeline.bench.planning import PrivateMemory, child, peak_rss_mb, status_mb
started = time.perf_counter()
with PrivateMemory() as private:
    result = child(json.loads(sys.argv[1]))
result["wall_seconds"] = round(time.perf_counter() - started, 3)
result["driver_max_rss_mb"] = peak_rss_mb()
result["driver_max_private_mb"] = private.peak_mb
result["driver_private_mb_every_30s"] = private.timeline
result["driver_shmem_mb_at_end"] = status_mb("RssShmem")
print(json.dumps(result))
"""


def status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``RssAnon``, ...) in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class PrivateMemory:
    """The peak of this process's ``RssAnon`` (Linux keeps no high-water mark of it), sampled by a
    thread every ``interval`` seconds while the ``with`` block runs; ``timeline`` holds one sample
    every ``every`` seconds (whether the driver's memory grows with the rows received)."""

    def __init__(self, interval: float = 0.1, every: float = 30.0) -> None:
        self.interval, self.every, self.peak_mb = interval, every, status_mb("RssAnon")
        self.timeline: list[float | None] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        started = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = self._record()
            if time.perf_counter() - started >= self.every * len(self.timeline):
                self.timeline.append(now)

    def __enter__(self) -> PrivateMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._record()

    def _record(self) -> float | None:
        now = status_mb("RssAnon")
        if now is not None and (self.peak_mb is None or now > self.peak_mb):
            self.peak_mb = now
        return now


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ``VmHWM`` starts afresh at ``exec``; ``ru_maxrss``
    would also count the parent's memory at ``fork``."""
    peak = status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _child(config: PlanningBenchConfig, manifest: Path, output: Path) -> dict:
    spec = {"input": str(manifest), "output": str(output), "limit": config.limit, "task": config.task,
            "run": config.run, "batch_size": config.batch_size, "first_rows": config.first_rows,
            "decode_seconds": config.decode_seconds, "segment_videos": config.segment_videos}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"planning case failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_config(spec: dict) -> PipelineConfig:
    """The measured run's configuration: one stub actor, no GPU, resuming into the case's output."""
    limit = None if spec["limit"] < 0 else spec["limit"]
    first_rows = spec.get("first_rows", False)
    return PipelineConfig(
        input=spec["input"], output=spec["output"], task=spec["task"], limit=limit, dry_run=not spec["run"],
        batch_size=spec["batch_size"], num_actors=1, num_gpus=0, if_exists="resume",
        segment_videos=spec.get("segment_videos", PipelineConfig.segment_videos),
        **({"rows_per_file": spec["batch_size"]} if first_rows else {}),
    )  # fmt: skip


def child(spec: dict) -> dict:
    """The measured driver (in its own process): plan with ``--dry-run``, or run with stub stages."""
    from pipeline.run import run_pipeline

    first_rows = spec.get("first_rows", False)
    config = run_config(spec)
    started = time.perf_counter()
    first_part: list[float] = []
    if first_rows:
        watch = (Path(spec["output"]), started, first_part)
        threading.Thread(target=_stop_at_first_part, args=watch, daemon=True).start()
    decode = partial(stub_decode, seconds=spec.get("decode_seconds", 0.0))
    summary = run_pipeline(config, annotator_cls=StubAnnotator, decode_fn=decode)
    keys = ("status", "items_total", "items_skipped", "items_deferred", "items_to_run", "rows", "rows_ok",
            "startup_seconds", "items_per_s", "steady_videos_per_s", "rows_expected")  # fmt: skip
    return {k: summary[k] for k in keys if k in summary} | {
        "run_seconds": round(time.perf_counter() - started, 3),
        **({"first_rows_committed_seconds": round(first_part[0], 3)} if first_part else {}),
    }


def _stop_at_first_part(output: Path, started: float, seen: list[float]) -> None:
    """SIGTERM this process once the run has committed its first part file (the run then commits what
    it received and writes its summary, ``interrupted``); ``seen`` gets the time since ``started``."""
    while not [p for p in output.glob("part-*.parquet") if "earlier" not in p.name]:
        time.sleep(0.05)
    seen.append(time.perf_counter() - started)
    os.kill(os.getpid(), signal.SIGTERM)


def stub_decode(
    batch: dict[str, np.ndarray], sampling: object, storage: object, seconds: float = 0.0
) -> dict:
    """The decode stage's columns with no video opened (what the stub annotator needs); ``seconds``: a
    decode's time per video, slept (where a real decode's time would go, without its CPU)."""
    n = len(batch["video_id"])
    time.sleep(seconds * n)
    return {
        **batch,
        "num_frames": np.zeros(n, np.int32),
        "frame_seconds": np.zeros(n),
        "frame_error": np.full(n, ""),
    }


class StubAnnotator:
    """One ok row per item, no model: the annotate stage at no cost, to measure the driver."""

    def __init__(self, settings: AnnotatorSettings) -> None:
        self.settings = settings

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        now = datetime.now(timezone.utc)
        rows = [
            {"id": item.id, "video_id": item.video_id, "video_uri": item.video_uri, "task": item.task,
             "question": item.question, "text": "stub", "status": STATUS_OK, "generated_tokens": 1,
             "decoder": self.settings.std.mode, "model": self.settings.model_label,
             "run_id": self.settings.run_id, "created_at": now}
            for items in batch["items"] for item in items_from_json(str(items))
        ]  # fmt: skip
        return to_table(rows)
