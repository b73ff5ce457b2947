"""What the driver's private memory grows by during a stub run (issue 12), and which objects grow.

    PYTHONPATH=$PWD python scripts/driver_growth.py 20000 64                 # videos, --batch-size
    PYTHONPATH=$PWD python scripts/driver_growth.py 20000 64 --max-read-tasks 100   # bigger blocks

Runs ``pipeline.run.run_pipeline`` in this process with the stub stages of ``jobs.benchmark planning``
and, once 20% of the rows are written and again once all are, reads ``RssAnon`` after a
``gc.collect()`` and counts the live Python objects by type; it prints the growth per row received and
the object types that grew. ``--max-read-tasks`` overrides ``pipeline.pending.MAX_READ_TASKS`` (below
``videos / batch size`` it makes every block ``batch size`` videos: per-row growth apart from
per-block growth). ``--segment-videos`` sets the run's ``--segment-videos`` (one Ray Dataset per
segment). ``--trace`` adds a tracemalloc diff (slow). ``--drop-block-stats`` (an experiment, not a fix)
empties ``MapOperator._output_blocks_stats`` after each block it hands on.

Measured (2026-12-01, 2-vCPU Xeon shared with a training job; 20,000 videos, ``--batch-size 64``):
with the default 10,000 read tasks (blocks of 2 videos) +36.2 MB over the last 15,968 rows, and
16,150 more ``BlockStats`` / ``BlockExecStats`` / ``TaskExecWorkerStats`` (+32,452 dicts, +16,099
lists): one per output block of each map operator, kept by Ray Data's ``MapOperator`` in
``_output_blocks_stats`` until the dataset finishes (~2.2 KB a block); with 100 read tasks (blocks of
64 videos) +3.0 MB over the same rows (659 more ``BlockStats``). On 2026-12-02 (an AMD EPYC, idle):
one dataset +28.2 MB and +16,135 ``BlockStats``; ``--segment-videos 2000`` +29.3 MB and no new
``BlockStats``, its private memory flat after ~8k rows (BENCHMARKS §8).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import tempfile
import threading
import time
import tracemalloc
from functools import partial
from pathlib import Path

import pyarrow as pa


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("videos", type=int)
    parser.add_argument("batch_size", type=int)
    parser.add_argument("--max-read-tasks", type=int, default=None)
    parser.add_argument("--segment-videos", type=int, default=None, help="--segment-videos of the run")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument(
        "--drop-block-stats",
        action="store_true",
        help="experiment: Ray Data's map operators keep no BlockStats",
    )
    parser.add_argument("--out", default="bench-out/driver-growth")
    args = parser.parse_args()
    if args.trace:
        tracemalloc.start(12)

    import pipeline.pending as pending
    import pipeline.sink as sink_module
    from pipeline.bench.planning import StubAnnotator, status_mb, stub_decode, write_manifest
    from pipeline.config import PipelineConfig
    from pipeline.run import run_pipeline

    if args.drop_block_stats:  # the experiment that attributes the growth: nothing else changes
        from ray.data._internal.execution.operators.map_operator import MapOperator

        get_next = MapOperator._get_next_inner

        def get_next_keeping_no_stats(self):
            bundle = get_next(self)
            self._output_blocks_stats.clear()
            return bundle

        MapOperator._get_next_inner = get_next_keeping_no_stats
    if args.max_read_tasks:
        pending.MAX_READ_TASKS = args.max_read_tasks
    root = Path(args.out).resolve()
    manifest = write_manifest(root / f"manifest-caption-{args.videos}.jsonl", args.videos, "caption")
    output = tempfile.mkdtemp(prefix="out-", dir=root)
    state: dict = {"rows": 0, "mark": None}

    def types() -> collections.Counter:
        return collections.Counter(type(o).__name__ for o in gc.get_objects())

    def mark() -> None:  # the state at 20% of the rows
        gc.collect()
        snap = tracemalloc.take_snapshot() if args.trace else None
        state["mark"] = (state["rows"], status_mb("RssAnon"), types(), snap)
        print(f"mark: rows {state['rows']} private {state['mark'][1]} MB", flush=True)

    def report() -> None:  # the growth since the mark, once every row is written
        gc.collect()
        rows0, anon0, types0, snap0 = state["mark"]
        grown, rows = status_mb("RssAnon") - anon0, state["rows"] - rows0
        print(f"growth: {grown:+.1f} MB over {rows} rows = {grown * 1e6 / rows:.0f} B a row; Arrow pool "
              f"{pa.total_allocated_bytes() / 1e6:.1f} MB", flush=True)  # fmt: skip
        print("object types grown:", (types() - types0).most_common(12), flush=True)
        if snap0 is not None:
            for stat in tracemalloc.take_snapshot().compare_to(snap0, "traceback")[:10]:
                print(f"--- {stat.size_diff / 1e6:+.2f} MB {stat.count_diff:+d} blocks")
                print("\n".join(stat.traceback.format()[-12:]))
        state["mark"] = "done"

    write = sink_module.ParquetSink.write

    def counting_write(self, table: pa.Table) -> None:
        write(self, table)
        state["rows"] += table.num_rows
        if state["mark"] is None and state["rows"] >= args.videos * 0.2:
            mark()
        if state["rows"] >= args.videos and isinstance(state["mark"], tuple):
            report()

    sink_module.ParquetSink.write = counting_write

    def sample() -> None:
        started = time.time()
        while True:
            time.sleep(15)
            print(f"[{time.time() - started:.0f}s] rows {state['rows']} private {status_mb('RssAnon')} MB "
                  f"shared {status_mb('RssShmem')} MB", flush=True)  # fmt: skip

    threading.Thread(target=sample, daemon=True).start()
    config = PipelineConfig(
        input=str(manifest), output=output, task="caption", limit=None, dry_run=False,
        batch_size=args.batch_size, num_actors=1, num_gpus=0, if_exists="resume",
        **({"segment_videos": args.segment_videos} if args.segment_videos else {}),
    )  # fmt: skip
    summary = run_pipeline(config, annotator_cls=StubAnnotator, decode_fn=partial(stub_decode, seconds=0.0))
    keys = ("status", "rows", "rows_ok", "wall_seconds", "startup_seconds", "steady_videos_per_s")
    print(json.dumps({k: summary.get(k) for k in keys}))


if __name__ == "__main__":
    main()
