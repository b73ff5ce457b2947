"""The processor: check → plan → lease → Ray Data stages → stream rows into Parquet → summary.

    inputs (driver: URIs only) ─► decode frames (CPU tasks) ─► annotate (actor pool, GPU) ─► driver
                                                                                        │
                               _summary.json ◄─ accounting ◄── atomic Parquet parts ◄───┘

Everything that can be wrong with the run as a whole (run id, storage, bucket, manifest, model
location, a writable output, an output that already holds rows, resources that fit the cluster) is
checked before Ray starts a model actor (``pipeline.checks``). The run then holds the output's lease
(``pipeline.lease``: one run per output) while it reads the resume set and works. Result rows stream
back to the driver (text and counters only: frames stay in the workers), which commits them in whole
files and keeps the accounting; a batch that Ray retries after an actor crash is delivered once, and an
item whose task failed for good comes back as an error row written by the driver (each row carries its
item's ordinal, and the driver keeps a bit per item: ``pipeline.pending.ReceivedItems``). A large run
executes one Ray Dataset per segment of ``--segment-videos`` videos, one after the other, so Ray Data's
per-block records do not pile up in the driver (``pipeline.pending.segments``). SIGINT / SIGTERM stop
the run with what was received committed and a summary that says ``interrupted``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.accounting import Progress, RunAccounting
from pipeline.checks import (
    check_output_location,
    check_resources,
    check_run_id,
    check_sample_input,
    check_writable,
)  # fmt: skip
from pipeline.config import AnnotatorSettings, PipelineConfig
from pipeline.errors import PipelineError, RunInterrupted, SignalGuard
from pipeline.frames import FrameSampling, decode_frames
from pipeline.lease import OutputLease
from pipeline.models import cache_dir, check_model, model_label, pixel_limit
from pipeline.pending import (
    ACTOR,
    ACTOR_SECONDS,
    ORDINAL,
    STAGE_COLUMNS,
    Annotate,
    CountingPending,
    InDriverPending,
    ObjectStorePending,
    PendingChunk,
    PendingStore,
    ReceivedItems,
    chunk_refs,
    item_offsets,
    lost_items,
    pieces,
    read_video_rows,
    segments,
    task_sizes,
    video_offsets,
)  # fmt: skip
from pipeline.schema import STATUS_ERROR, to_table
from pipeline.sink import SUMMARY_NAME, ParquetSink, ok_ids, part_files, remove_outputs, write_json
from pipeline.sources import ITEM_SCHEMA, items_from_table, iter_items, iter_records
from pipeline.storage import StorageOptions, check_reachable, is_object_store, join, redact

log = logging.getLogger(__name__)

# A decode task that fails (a killed worker, say) is retried this often; then its block is dropped and
# its items become error rows (Ray Data's default retries without end). Per-video faults never fail a
# task: they are rows already.
DECODE_TASK_RETRIES = 3
DECODE_TASK_OVERHEAD = 300 << 20  # the task's interpreter, libraries and buffers beyond the frames


def decode_task_memory(sampling: FrameSampling, videos_per_task: int) -> int:
    """Heap reserved per decode task: one video's decode budget plus the task's sampled frames (uint8
    RGB at the pixel limit). It bounds concurrent decodes per node, and (being a different resource
    request from the model actors) keeps Ray from fusing decoding into the actor stage on CPU-only
    clusters."""
    frames = videos_per_task * sampling.num_frames * sampling.max_pixels * 3
    return sampling.max_decode_bytes + frames + DECODE_TASK_OVERHEAD


@dataclass(frozen=True)
class Inputs:
    """A checked run's inputs: everything about the run as a whole holds (see ``pipeline.checks``); the
    input itself is read by :func:`plan_run`."""

    input: str
    storage: StorageOptions
    run_id: str


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided in the driver before any model loads: the items this run processes
    (resume and --limit applied), as chunks in a :class:`pipeline.pending.PendingStore`, and the counts
    of the rest. Planning reads the input in chunks and hands each chunk's pending items to the store as
    it goes, so the driver's memory follows one chunk, not the size of the input, the output or the run."""

    input: str
    storage: StorageOptions
    run_id: str
    chunks: tuple[PendingChunk, ...] = ()  # the pending items to run, in order, a chunk each
    store: PendingStore = field(default_factory=InDriverPending)
    first_items: tuple[str, ...] = ()  # the first pending ids (what --dry-run shows)
    total: int = 0  # items the input defines
    done: int = 0  # items that already have an ok row in the output
    deferred: int = 0  # items left for a later run by --limit

    @property
    def to_run(self) -> int:
        return sum(c.items for c in self.chunks)

    def videos(self) -> int:
        return sum(c.videos for c in self.chunks)

    def iter_pending(self) -> Iterator[pa.Table]:
        """The pending items, a chunk at a time (read back from the store)."""
        for chunk in self.chunks:
            yield self.store.get(chunk.handle)

    def pending_items(self) -> pa.Table:
        """Every pending item in one table: for small plans (tests, the stage benchmark) only."""
        tables = list(self.iter_pending())
        return pa.concat_tables(tables).unify_dictionaries() if tables else ITEM_SCHEMA.empty_table()


FIRST_ITEMS = 10  # pending ids that --dry-run shows


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def check_inputs(config: PipelineConfig) -> Inputs:
    """Check the run id, storage, output, model and that the input is there. Raises PipelineError.
    Writes nothing (the output's probe object is removed again)."""
    check_output_location(config.output, os.environ)
    storage = config.storage_options()
    run_id = config.run_id or new_run_id()
    check_run_id(run_id)
    check_reachable(config.output, storage, "--output")
    check_writable(config.output, storage)
    input_uri = config.input or _sample_input(config)
    check_reachable(input_uri, storage, "--input")
    if config.model and is_object_store(config.model):
        check_reachable(config.model, storage, "--model")
    check_model(config.model, storage)
    return Inputs(input_uri, storage, run_id)


def plan_run(config: PipelineConfig, inputs: Inputs | None = None, store: PendingStore | None = None) -> Plan:
    """Read the input (checked as a whole: ids, formats, questions) and the output's rows, and apply
    ``--if-exists`` and ``--limit``; each chunk's pending items go to ``store`` (default: kept in the
    driver) as they are read. A run holds the output's lease before this: the resume set is read here.
    Raises PipelineError."""
    inputs = inputs or check_inputs(config)
    storage, run_id = inputs.storage, inputs.run_id
    store = store or InDriverPending()
    done_ids = _existing_ok_ids(config, storage)
    if part_files(config.output, storage, run_id):
        raise PipelineError(
            f"output {config.output} already holds files of run {run_id}: pass a new --run-id"
        )
    room = math.inf if config.limit is None else config.limit
    chunks: list[PendingChunk] = []
    first: list[str] = []
    total = done = deferred = 0
    columns = ("id", "video_uri", "caption") if config.task == "caption" else None
    for items in iter_items(iter_records(inputs.input, storage, columns), config.task, config.prompt):
        total += items.num_rows
        if done_ids:  # a set: one hash table for the whole scan (pc.is_in would build one per chunk)
            is_done = pa.array([i in done_ids for i in items.column("id").to_pylist()], pa.bool_())
            done += pc.sum(is_done).as_py() or 0
            items = items.filter(pc.invert(is_done))
        taken = int(min(items.num_rows, room))
        if taken:
            kept = items.slice(0, taken)
            first += kept.column("id").slice(0, FIRST_ITEMS - len(first)).to_pylist()
            chunks += [PendingChunk(store.put(p), p.num_rows, videos) for p, videos in pieces(kept)]
            room -= taken
        deferred += items.num_rows - taken
    plan = Plan(inputs.input, storage, run_id, tuple(chunks), store, tuple(first), total, done, deferred)
    log.info(
        "[plan] %d items from %s; %d done, %d deferred by --limit; %d to run (%d videos, %d chunks)",
        total, redact(inputs.input), done, deferred, plan.to_run, plan.videos(), len(chunks),
    )  # fmt: skip
    return plan


def _sample_input(config: PipelineConfig) -> str:
    """The embedded default's input: the demo world's sample clips, generated once into the cache."""
    from pipeline.demo.world import WORLD_VERSION, write_sample_dataset

    # per world version: clips cached by an older world would not be the world the demo model knows
    out = cache_dir() / "samples" / f"world{WORLD_VERSION}" / f"seed{config.seed}-n{config.num_samples}"
    manifest = out / "manifest.jsonl"
    if not manifest.exists():
        write_sample_dataset(out, num_clips=config.num_samples, seed=config.seed)
    return str(manifest)


def _existing_ok_ids(config: PipelineConfig, storage: StorageOptions) -> set[str]:
    files = part_files(config.output, storage)
    if not files:
        return set()
    if config.if_exists == "fail":
        raise PipelineError(
            f"output {config.output} already holds {len(files)} Parquet part files. Pass --if-exists resume "
            "to process only items without an ok row, or --if-exists overwrite to replace them."
        )
    if config.if_exists == "overwrite":
        removed = remove_outputs(config.output, storage)
        log.info("[plan] --if-exists overwrite: removed %d part files", removed)
        return set()
    return ok_ids(config.output, storage)


def gpus_per_actor(config: PipelineConfig) -> float:
    """``--num-gpus`` if given, else 1 when the Ray cluster has a GPU, else 0 (CPU actors)."""
    import ray

    if config.num_gpus is not None:
        return config.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def annotator_settings(config: PipelineConfig, plan: Plan, num_gpus: float) -> AnnotatorSettings:
    return AnnotatorSettings(
        model=config.model,
        model_label=model_label(config.model),
        run_id=plan.run_id,
        storage=plan.storage,
        std=config.std_config(),
        dense_sample=config.dense_sample,
        dtype=config.dtype,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        seed=config.seed,
        use_gpu=num_gpus > 0,
        max_items_per_call=max(config.batch_size, 1) * 4,
        share_prefill=config.share_prefill == "on",
        mcq_parser=config.mcq_parser,
    )


def build_dataset(
    config: PipelineConfig,
    plan: Plan,
    num_gpus: float,
    annotator_cls: type | None = None,
    decode_fn: Callable[..., dict] = decode_frames,
):
    """The lazy Ray Dataset: video rows → decode (CPU tasks) → annotate (actor pool) → result rows.
    The stages are ``decode_fn`` (:func:`pipeline.frames.decode_frames`) and ``annotator_cls`` (default
    :class:`pipeline.annotator.Annotator`, imported here: the driver itself never loads torch)."""
    import ray

    if annotator_cls is None:
        from pipeline.annotator import Annotator as annotator_cls

    sampling = config.frame_sampling(pixel_limit(config.model, plan.storage))
    # Decode tasks of one video each while there are at most MAX_READ_TASKS videos, growing to at most
    # --batch-size videos beyond that (task_sizes): a decode task that dies (a worker killed for memory,
    # say) costs its own videos only, a crash redoes at most a batch, and the first batch waits for its
    # own videos only (not for a block of videos / 10,000). A block whose task still fails after its retries is dropped instead
    # of failing the run; the driver writes an error row for each of its items (see _stream), so no item
    # is lost. Each read task cuts a whole number of decode blocks from the chunks of pending items in
    # the object store (the plan's refs): the driver builds no row and no block.
    sizes = task_sizes(plan.videos(), config.batch_size)
    offsets = video_offsets(plan.chunks)
    ds = ray.data.range(sizes.read_tasks, override_num_blocks=sizes.read_tasks)
    ds = ds.map_batches(
        read_video_rows,
        fn_kwargs={
            "chunks": chunk_refs(plan.store, plan.chunks),
            "offsets": offsets,
            "per_task": sizes.read_videos,
            "item_offsets": item_offsets(plan.chunks),
        },
        batch_size=None,
        batch_format="numpy",
    )
    if sizes.read_videos > sizes.decode_videos:  # fused into the read tasks: they yield decode blocks
        ds = ds.repartition(target_num_rows_per_block=sizes.decode_videos)
    ds.context.max_errored_blocks = -1
    ds = ds.map_batches(
        decode_fn,
        fn_kwargs={"sampling": sampling, "storage": plan.storage},
        batch_size=sizes.decode_videos,
        num_cpus=1,
        memory=decode_task_memory(sampling, sizes.decode_videos),
        max_retries=DECODE_TASK_RETRIES,
    )
    return ds.map_batches(
        Annotate,  # annotator_cls, its rows tagged with their item's ordinal (the driver's row-loss check)
        fn_constructor_kwargs={
            "annotator_cls": annotator_cls,
            "settings": annotator_settings(config, plan, num_gpus),
        },
        # An elastic pool that starts at --num-actors and may shrink to one actor. A fixed pool cannot
        # give back a CPU: when a node is lost, Ray restarts its actors on the nodes left, and if they
        # take every CPU there, no video is decoded again and the run hangs. Ray Data shrinks an
        # elastic pool when its actors idle (as they do once decoding starves), so CPU returns to the
        # decode tasks, and it grows back only within its share of the cluster, which keeps the decode
        # stage's reserved CPU (test: tests/pipeline/test_multinode.py). The cost: in a run whose
        # decoding cannot keep the actors busy, an idle actor is released (and a model loaded again
        # when the backlog returns), as Ray Data does with any elastic pool.
        compute=ray.data.ActorPoolStrategy(
            min_size=1, max_size=config.num_actors, initial_size=config.num_actors
        ),
        num_gpus=num_gpus,
        batch_size=config.batch_size,
        batch_format="numpy",
    )


def init_ray() -> None:
    """Join the cluster of ``ray job submit`` (RAY_ADDRESS) or start Ray locally (RAY_ADDRESS unset or empty)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, configure_logging=False)  # "": local


def run_pipeline(
    config: PipelineConfig, annotator_cls: type | None = None, decode_fn: Callable[..., dict] = decode_frames
) -> dict:
    """Run one job end to end; return the summary (also written to ``<output>/_summary.json``).

    ``status`` is ``ok`` (every pending item has its row), ``incomplete`` (fewer rows), ``interrupted``
    (SIGINT or SIGTERM: the rows received so far are committed, ``signal`` names it) or ``failed`` (an
    error while streaming or committing rows: ``error`` says which; what was committed stays)."""
    inputs = check_inputs(config)
    if config.dry_run:
        return dry_run_summary(config, plan_run(config, inputs, CountingPending()))
    with OutputLease(config.output, inputs.storage, inputs.run_id, wait=config.wait_for_lease) as lease:
        started = time.perf_counter()  # the run's clock: planning and Ray start-up count
        plan = plan_run(config, inputs, ObjectStorePending())  # starts Ray on the first pending chunk
        return _run(config, plan, lease, annotator_cls, decode_fn, started)


def _run(
    config: PipelineConfig,
    plan: Plan,
    lease: OutputLease,
    annotator_cls: type | None,
    decode_fn: Callable,
    started: float,
) -> dict:
    """Stream the plan's items through the stages into the output; write and return the summary."""
    budget = config.sparse_budget if config.decoder != "dense" else None
    accounting = RunAccounting(expected_rows=plan.to_run, started=started, sparse_budget=budget)
    num_gpus = 0.0
    outcome = _Outcome()
    if plan.to_run:
        init_ray()
        import ray

        num_gpus = gpus_per_actor(config)
        check_resources(ray.cluster_resources(), config.num_actors, num_gpus, config.wait_for_resources)
        check_sample_input(config.input, ray.cluster_resources(), config.wait_for_resources)
        log.info(
            "[run] %s: %d actor(s) × %g GPU, decoder %s",
            plan.run_id,
            config.num_actors,
            num_gpus,
            config.decoder,
        )
        parts = [replace(plan, chunks=chunks) for chunks in segments(plan.chunks, config.segment_videos)]
        if len(parts) > 1:
            log.info(
                "[run] %d segments of about %d videos, one Ray Dataset each", len(parts), parts[0].videos()
            )
        datasets = ((part, build_dataset(config, part, num_gpus, annotator_cls, decode_fn)) for part in parts)
        outcome = _stream(datasets, config, plan, accounting, lease)
    summary = {
        "run_id": plan.run_id,
        "task": config.task,
        "decoder": config.decoder,
        "model": model_label(config.model),
        "input": redact(plan.input),
        "output": config.output,
        "items_total": plan.total,
        "items_skipped": plan.done,  # items that already had an ok row
        "items_deferred": plan.deferred,  # items --limit left for a later run
        "rows_expected": plan.to_run,
        "files": len(outcome.files),
        "num_actors": config.num_actors,
        "num_gpus_per_actor": num_gpus,
        **accounting.summary(gpus_per_actor=num_gpus, num_actors=config.num_actors),
    }
    summary["status"] = outcome.status(summary["rows"] == summary["rows_expected"])
    if summary["rows_budget_covers_prompt"]:
        log.warning(
            "[run] %d of %d ok rows have prompts within --sparse-budget %d: their sparse draft is the dense "
            "model, so acceptance is 1.0 and StD cannot be faster there (lower --sparse-budget, or use more "
            "frames)", summary["rows_budget_covers_prompt"], summary["rows_ok"], config.sparse_budget,
        )  # fmt: skip
    summary |= {k: v for k, v in (("signal", outcome.signal), ("error", outcome.error)) if v}
    write_json(join(config.output, SUMMARY_NAME), summary, plan.storage)
    write_json(join(config.output, "_runs", f"{plan.run_id}.json"), summary, plan.storage)
    return summary


LOST_ITEM_ERROR = (
    "no result: the task that decoded or annotated this video failed after its retries (a worker killed "
    "for memory, say); see the Ray logs"
)


def lost_item_rows(config: PipelineConfig, plan: Plan, received: ReceivedItems) -> pa.Table:
    """Error rows for the pending items that no result row came back for (their block was dropped)."""
    now = datetime.now(timezone.utc)
    rows = [
        {"id": item.id, "video_id": item.video_id, "video_uri": item.video_uri, "task": item.task,
         "question": item.question, "options": item.options or None, "answer": item.answer,
         "status": STATUS_ERROR, "error": LOST_ITEM_ERROR, "decoder": config.decoder,
         "model": model_label(config.model), "run_id": plan.run_id, "created_at": now}
        for item in items_from_table(lost_items(plan.store, plan.chunks, received))
    ]  # fmt: skip
    return to_table(rows)


def dry_run_summary(config: PipelineConfig, plan: Plan) -> dict:
    """What ``--dry-run`` prints: the plan, and nothing run (``status`` "planned")."""
    return {
        "status": "planned",
        "dry_run": True,
        "run_id": plan.run_id,
        "task": config.task,
        "input": redact(plan.input),
        "output": config.output,
        "items_total": plan.total,
        "items_skipped": plan.done,
        "items_deferred": plan.deferred,
        "items_to_run": plan.to_run,
        "videos_to_run": plan.videos(),
        "first_items": list(plan.first_items),
    }


@dataclass
class _Outcome:
    """How the streaming ended: the committed files, and the signal or error that stopped it."""

    files: list[str] = field(default_factory=list)
    signal: str | None = None
    error: str | None = None

    def status(self, complete: bool) -> str:
        if self.signal:
            return "interrupted"
        if self.error:
            return "failed"
        return "ok" if complete else "incomplete"


def _write_lost_items(
    config: PipelineConfig, plan: Plan, received: ReceivedItems, sink: ParquetSink, accounting: RunAccounting
) -> None:
    """Error rows for the items whose block came back from no task (see :func:`lost_item_rows`)."""
    lost = lost_item_rows(config, plan, received)
    if lost.num_rows:
        log.warning(
            "[run] %d item(s) got no result (their task failed after retries): error rows", lost.num_rows
        )
        sink.write(lost)
        accounting.add(lost)


def _stream(
    datasets: Iterable[tuple[Plan, object]],
    config: PipelineConfig,
    plan: Plan,
    accounting: RunAccounting,
    lease: OutputLease,
) -> _Outcome:
    """Write every result block of each (segment, dataset) as it arrives, then the segment's lost items;
    on a signal, an error or a lost lease, commit what was received and stop."""
    sink = ParquetSink(config.output, plan.storage, plan.run_id, config.rows_per_file)
    progress = Progress(accounting)
    outcome = _Outcome(files=sink.files)
    with SignalGuard() as guard:
        try:
            for segment, ds in datasets:
                received = ReceivedItems(segment.to_run)  # one bit per item, set when its row comes back
                for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    if lease.lost():
                        raise PipelineError(f"another run took over the lease of {config.output}")
                    with guard.critical():  # written and counted together: the summary agrees with the files
                        ordinals = block.column(ORDINAL)
                        accounting.add_actor_age(block.column(ACTOR), block.column(ACTOR_SECONDS))
                        block = block.drop_columns(list(STAGE_COLUMNS))
                        sink.write(block)
                        accounting.add(block)
                        received.add(ordinals)
                    progress.update()
                with guard.critical():
                    _write_lost_items(config, segment, received, sink, accounting)
        except RunInterrupted as exc:
            outcome.signal = exc.signal_name
            log.warning("[run] %s: stopping; committing the rows received so far", outcome.signal)
        except Exception as exc:  # a failed write or a failed Ray stage: keep what is committed, say why
            outcome.error = f"{type(exc).__name__}: {exc}"
            log.exception("[run] streaming rows failed")
        with guard.critical(raise_pending=False):  # a second signal does not cut the last commit short
            try:
                sink.close()
            except Exception as exc:
                outcome.error = (
                    outcome.error or f"committing the last rows failed: {type(exc).__name__}: {exc}"
                )
                log.exception("[run] committing the last rows failed")
        outcome.signal = outcome.signal or guard.pending
    progress.update(force=True)
    return outcome
