"""The processor: check → plan → Ray Data stages → stream rows into Parquet → summary.

    inputs (driver: URIs only) ─► decode frames (CPU tasks) ─► annotate (actor pool, GPU) ─► driver
                                                                                        │
                               _summary.json ◄─ accounting ◄── atomic Parquet parts ◄───┘

Everything that can be wrong with the run as a whole (storage, bucket, manifest, model location,
an output that already holds rows) is checked before Ray starts a model actor. Result rows stream back
to the driver (text and counters only: frames stay in the workers), which commits them in whole files
and keeps the accounting; a batch that Ray retries after an actor crash is delivered once.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from pipeline.accounting import Progress, RunAccounting
from pipeline.annotator import Annotator, AnnotatorSettings
from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.frames import decode_frames
from pipeline.models import cache_dir, check_model, model_label, pixel_limit
from pipeline.sink import SUMMARY_NAME, ParquetSink, ok_ids, part_files, remove_outputs, write_json
from pipeline.sources import Item, expand_items, read_records, video_rows
from pipeline.storage import StorageOptions, check_reachable, is_object_store, join

log = logging.getLogger(__name__)

# Heap reserved per decode task: decord reads a remote video whole into memory, plus the sampled frames.
# Bounds concurrent decodes per node, and (being a different resource request from the model actors)
# keeps Ray from fusing decoding into the actor stage on CPU-only clusters.
DECODE_TASK_MEMORY = 1 << 30


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided in the driver before any model loads."""

    input: str
    items: list[Item]  # every item the input defines
    pending: list[Item]  # the items this run processes (resume and --limit applied)
    storage: StorageOptions
    run_id: str


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def storage_options(config: PipelineConfig) -> StorageOptions:
    """``config.storage_options()`` (kept for callers of the earlier name)."""
    return config.storage_options()


def plan_run(config: PipelineConfig) -> Plan:
    """Check storage, read the inputs, apply ``--if-exists`` and ``--limit``. Raises PipelineError."""
    storage = config.storage_options()
    input_uri = config.input or _sample_input(config)
    check_reachable(input_uri, storage, "--input")
    check_reachable(config.output, storage, "--output")
    if config.model and is_object_store(config.model):
        check_reachable(config.model, storage, "--model")
    check_model(config.model, storage)
    items = expand_items(read_records(input_uri, storage), config.task, config.prompt)
    done = _existing_ok_ids(config, storage)
    pending = [item for item in items if item.id not in done]
    if config.limit is not None:
        pending = pending[: config.limit]
    log.info(
        "[plan] %d items from %s; %d skipped; %d to run",
        len(items), input_uri, len(items) - len(pending), len(pending),
    )  # fmt: skip
    run_id = config.run_id or new_run_id()
    if part_files(config.output, storage, run_id):
        raise PipelineError(
            f"output {config.output} already holds files of run {run_id}: pass a new --run-id"
        )
    return Plan(input_uri, items, pending, storage, run_id)


def _sample_input(config: PipelineConfig) -> str:
    """The embedded default's input: the demo world's sample clips, generated once into the cache."""
    from pipeline.demo.world import write_sample_dataset

    out = cache_dir() / "samples" / f"seed{config.seed}-n{config.num_samples}"
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
    )


def build_dataset(config: PipelineConfig, plan: Plan, num_gpus: float, annotator_cls: type = Annotator):
    """The lazy Ray Dataset: video rows → decode (CPU tasks) → annotate (actor pool) → result rows."""
    import ray

    rows = video_rows(plan.pending)
    sampling = config.frame_sampling(pixel_limit(config.model, plan.storage))
    ds = ray.data.from_items(
        rows, override_num_blocks=max(1, min(math.ceil(len(rows) / config.batch_size), 10_000))
    )
    ds = ds.map_batches(
        decode_frames,
        fn_kwargs={"sampling": sampling, "storage": plan.storage},
        batch_size=config.batch_size,
        num_cpus=1,
        memory=DECODE_TASK_MEMORY,
    )
    return ds.map_batches(
        annotator_cls,
        fn_constructor_kwargs={"settings": annotator_settings(config, plan, num_gpus)},
        compute=ray.data.ActorPoolStrategy(size=config.num_actors),
        num_gpus=num_gpus,
        batch_size=config.batch_size,
        batch_format="numpy",
    )


def init_ray() -> None:
    """Join the cluster of ``ray job submit`` (RAY_ADDRESS) or start Ray locally."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), configure_logging=False)


def run_pipeline(config: PipelineConfig, annotator_cls: type = Annotator) -> dict:
    """Run one job end to end; return the summary (also written to ``<output>/_summary.json``)."""
    plan = plan_run(config)
    accounting = RunAccounting(expected_rows=len(plan.pending))
    num_gpus = 0.0
    files: list[str] = []
    if plan.pending:
        init_ray()
        num_gpus = gpus_per_actor(config)
        log.info(
            "[run] %s: %d actor(s) × %g GPU, decoder %s",
            plan.run_id,
            config.num_actors,
            num_gpus,
            config.decoder,
        )
        files = _stream(build_dataset(config, plan, num_gpus, annotator_cls), config, plan, accounting)
    summary = {
        "run_id": plan.run_id,
        "task": config.task,
        "decoder": config.decoder,
        "model": model_label(config.model),
        "input": plan.input,
        "output": config.output,
        "items_total": len(plan.items),
        "items_skipped": len(plan.items) - len(plan.pending),
        "rows_expected": len(plan.pending),
        "files": len(files),
        "num_actors": config.num_actors,
        "num_gpus_per_actor": num_gpus,
        **accounting.summary(gpus_held=config.num_actors * num_gpus),
    }
    summary["status"] = "ok" if summary["rows"] == summary["rows_expected"] else "incomplete"
    write_json(join(config.output, SUMMARY_NAME), summary, plan.storage)
    write_json(join(config.output, "_runs", f"{plan.run_id}.json"), summary, plan.storage)
    return summary


def _stream(ds, config: PipelineConfig, plan: Plan, accounting: RunAccounting) -> list[str]:
    sink = ParquetSink(config.output, plan.storage, plan.run_id, config.rows_per_file)
    progress = Progress(accounting)
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        sink.write(block)
        accounting.add(block)
        progress.update()
    sink.close()
    progress.update(force=True)
    return sink.files
