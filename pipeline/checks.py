"""Run-level checks: everything about a run as a whole that can be wrong is found before any model loads.

Each check raises :class:`PipelineError` with what to change, so a job exits 2 at once with one clear
message instead of failing after the compute (or waiting forever):

- :func:`check_run_id`: the run id is a file-name part (it names the run's Parquet parts and summary);
- :func:`check_writable`: the output is a folder (or prefix) this process can write: a probe object is
  written and removed;
- :func:`check_resources`: the model actors fit the Ray cluster, with a CPU left for the decode tasks
  (the actors would otherwise take every CPU and decoding would never start), and the GPUs they ask for
  exist, unless the run is told to wait for an autoscaling cluster to add them. (That holds at the
  start; after a node is lost, the actor pool's elastic size keeps it: see ``pipeline.run``.)
- :func:`check_output_location`: under ``ray job submit`` the output is not a relative path, which
  would resolve inside Ray's temporary copy of the working directory;
- :func:`check_sample_input`: a run on a cluster of several nodes (or one that adds nodes) names its
  ``--input``: the embedded default's sample clips exist only on the driver's node.

Storage reachability and the model location are checked by ``pipeline.storage.check_reachable`` and
``pipeline.models.check_model``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

from pipeline.errors import PipelineError
from pipeline.storage import StorageOptions, get_fs, is_object_store, protocol_of

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DECODE_CPUS = 1  # CPUs the decode stage needs at the least (one decode task at a time)
ACTOR_CPUS = 1  # CPUs Ray Data reserves per model actor (its default for map_batches, GPU actors too)
# Set in the environment of a driver that `ray job submit` started (and only there: Ray's job supervisor
# passes the job's runtime env through it; ray/dashboard/modules/job/job_supervisor.py in Ray 2.60).
# RAY_JOB_ID is no marker: the supervisor strips it from the driver's environment (RAY_INTERNAL_FLAGS).
JOB_SUBMISSION_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


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


def under_job_submission(env: Mapping[str, str]) -> bool:
    """True in the driver of a job that ``ray job submit`` started (``env``: ``os.environ``)."""
    return JOB_SUBMISSION_ENV in env


def check_output_location(output: str, env: Mapping[str, str]) -> None:
    """Under ``ray job submit``, ``output`` is an absolute path or a URI: a relative one (the default
    ``./out``) resolves in the driver's working directory, Ray's temporary copy of ``--working-dir``,
    which Ray deletes later. Elsewhere a relative path is the user's own working directory."""
    if not under_job_submission(env) or protocol_of(output) != "file":
        return
    path = output.removeprefix("file://")
    if not path.startswith(("/", "~")):
        raise PipelineError(
            f"--output {output} is a relative path, and this job runs under `ray job submit`, in Ray's "
            "temporary copy of the working directory, where the rows would be lost: pass an absolute path "
            "(on the node that runs the driver) or an object-storage URI such as s3://bucket/annotations/"
        )


def cluster_nodes(resources: Mapping[str, float]) -> int:
    """The number of alive nodes in ``resources`` (``ray.cluster_resources()``): every node adds 1 to
    its ``node:<ip>`` resource (nodes that share an address add up in one key)."""
    return round(
        sum(v for k, v in resources.items() if k.startswith("node:") and k != "node:__internal_head__")
    )


def check_sample_input(
    input: str | None, resources: Mapping[str, float], wait_for_resources: bool = False
) -> None:
    """A run without ``--input`` reads the sample clips generated on the driver's node, so it runs on a
    single-node cluster only: with more nodes (or ``wait_for_resources``, where nodes are added) the
    decode tasks on the other nodes would not find the clips."""
    if input is not None:
        return
    nodes = cluster_nodes(resources)
    if nodes > 1 or wait_for_resources:
        where = (
            f"a Ray cluster of {nodes} nodes"
            if nodes > 1
            else "a cluster that adds nodes (--wait-for-resources)"
        )
        raise PipelineError(
            f"no --input on {where}: the sample clips of the embedded default exist only on the driver's "
            "node, so the other nodes could not read them. Pass --input with videos every node can read "
            "(an s3:// prefix or manifest, or a shared filesystem)"
        )
