"""Run-level checks: everything about a run as a whole that can be wrong is found before any model loads.

Each check raises :class:`PipelineError` with what to change, so a job exits 2 at once with one clear
message instead of failing after the compute (or waiting forever):

- :func:`check_run_id`: the run id is a file-name part (it names the run's Parquet parts and summary);
- :func:`check_writable`: the output is a folder (or prefix) this process can write: a probe object is
  written and removed;
- :func:`check_resources`: the model actors fit the Ray cluster, with a CPU left for the decode tasks
  (the actors would otherwise take every CPU and decoding would never start), and the GPUs they ask for
  exist, unless the run is told to wait for an autoscaling cluster to add them.

Storage reachability and the model location are checked by ``pipeline.storage.check_reachable`` and
``pipeline.models.check_model``.
"""

from __future__ import annotations

import re
import uuid

from pipeline.errors import PipelineError
from pipeline.storage import StorageOptions, get_fs, is_object_store

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DECODE_CPUS = 1  # CPUs the decode stage needs at the least (one decode task at a time)
ACTOR_CPUS = 1  # CPUs Ray Data reserves per model actor (its default for map_batches, GPU actors too)


def check_run_id(run_id: str) -> None:
    """A run id names files: letters, digits, ``.``, ``_`` and ``-``, at most 128, not starting with a dot."""
    if not RUN_ID.match(run_id):
        raise PipelineError(
            f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' only (at most 128, starting with a "
            "letter or digit); it names the run's files"
        )


def check_writable(output: str, storage: StorageOptions) -> None:
    """Write and remove a probe object: under ``output`` on an object store; on a local filesystem in
    ``output`` or, where it does not exist yet, in its nearest existing parent (nothing is created)."""
    fs, root = get_fs(output.rstrip("/"), storage)
    if is_object_store(output):
        where = root
    else:
        if fs.exists(root) and not fs.isdir(root):
            raise PipelineError(
                f"--output {output} is a file, not a folder: pass a folder (created if missing)"
            )
        where = root
        while not fs.exists(where) and where.rsplit("/", 1)[0] not in ("", where):
            where = where.rsplit("/", 1)[0]
        if not fs.isdir(where):
            raise PipelineError(
                f"--output {output}: {where} is a file, so the folder cannot be created there"
            )
    probe = f"{where}/_probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except PermissionError as exc:
        raise PipelineError(
            f"--output {output} is not writable (permission denied: {exc}): pick a location this user can "
            "write, or fix its permissions / credentials (--profile)"
        ) from exc
    except OSError as exc:
        raise PipelineError(f"--output {output} is not writable ({type(exc).__name__}: {exc})") from exc


def check_resources(
    resources: dict[str, float], num_actors: int, gpus_per_actor: float, wait_for_resources: bool = False
) -> None:
    """The actors and their GPUs fit ``resources`` (``ray.cluster_resources()``) with CPU left for decoding.

    ``wait_for_resources``: the cluster adds nodes on demand (an autoscaler), so what is missing now is
    not an error."""
    if wait_for_resources:
        return
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    needed = num_actors * ACTOR_CPUS + DECODE_CPUS
    if needed > cpus:
        most = max(0, int(cpus) - DECODE_CPUS)
        raise PipelineError(
            f"--num-actors {num_actors} needs {num_actors * ACTOR_CPUS} CPU(s) for the model actors plus "
            f"{DECODE_CPUS} for decoding, but the Ray cluster has {cpus:g}: pass --num-actors {most} or fewer"
            " (or add nodes; on an autoscaling cluster pass --wait-for-resources)"
        )
    if gpus_per_actor > 0 and num_actors * gpus_per_actor > gpus:
        raise PipelineError(
            f"--num-actors {num_actors} × --num-gpus {gpus_per_actor:g} needs "
            f"{num_actors * gpus_per_actor:g} GPU(s), but the Ray cluster has {gpus:g}: pass --num-gpus 0 "
            "to run the model on CPU, fewer actors, or --wait-for-resources on an autoscaling cluster whose "
            "GPU nodes start on demand"
        )
