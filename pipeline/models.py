"""Model locations: the default demo model, object-storage copies, hub ids; and loading.

A model is named by

- a local directory (used in place);
- an object-storage URI such as ``s3://bucket/models/qwen2-vl-7b/`` (copied once per node into the
  local cache, guarded by a lock file, so every actor on a node shares one copy);
- a Hugging Face hub id such as ``Qwen/Qwen2-VL-7B-Instruct`` (downloaded by transformers where a
  network exists);
- nothing: the project's demo model, committed in ``pipeline/demo/model/`` and installed with the package.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError
from pipeline.frames import DEFAULT_MAX_PIXELS
from pipeline.storage import StorageOptions, get_fs, is_object_store, protocol_of
from std_core.config import SUPPORTED_ARCHITECTURES

if TYPE_CHECKING:
    import torch

CACHE_ENV = "STD_ANNOTATE_CACHE"
_COMPLETE = ".complete"


def cache_dir() -> Path:
    """``$STD_ANNOTATE_CACHE`` or ``~/.cache/std-video-annotate``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "std-video-annotate")


def default_model_dir() -> Path:
    """The trained demo model shipped in the package (FileNotFoundError naming a missing file)."""
    from pipeline.demo import model_dir  # torch-free: the driver never loads the model

    return model_dir.check_model_dir(model_dir.default_model_dir())


def model_label(model: str | None) -> str:
    """What the ``model`` column says: the URI or hub id as given; for the default demo model, its
    place in the package and its weights' hash (``pipeline/demo/model@sha256:<16 hex>``), the same on
    every machine (under ``ray job submit`` the package lives in a temporary copy whose path says
    nothing)."""
    return model if model else _demo_label(default_model_dir())


@functools.lru_cache(maxsize=4)
def _demo_label(directory: Path) -> str:
    from pipeline.demo import model_dir  # torch-free

    return f"pipeline/demo/model@sha256:{model_dir.sha256_of(directory / 'model.safetensors')[:16]}"


# What a loadable model directory holds: a config, weights, and the processor (tokenizer included).
_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_PROCESSOR = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model(model: str | None, storage: StorageOptions) -> None:
    """Fail fast, before any actor starts, when ``--model`` names nothing loadable: a local or
    object-storage directory without config, weights, processor or tokenizer files, of an architecture
    StD does not support; a path that does not exist; a hub id that is neither in the local Hugging Face
    cache nor reachable. Raises :class:`PipelineError` saying what to fix."""
    if model is None:
        return
    if is_object_store(model):
        fs, path = get_fs(model, storage)
        root = path.rstrip("/")
        names = {p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)} if fs.isdir(root) else set()
        _check_model_files(model, names, lambda name: fs.cat(f"{root}/{name}"))
        return
    local = Path(model).expanduser()
    if local.is_dir():
        names = {p.name for p in local.iterdir()}
        _check_model_files(model, names, lambda name: (local / name).read_bytes())
    elif local.exists():
        raise PipelineError(f"--model {model}: a file, not a model directory")
    elif model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise PipelineError(f"--model {model}: no such directory ({local.resolve()}); check the path")
    else:  # "org/name" may be a hub id or a relative path with a typo: say both
        _check_hub_model(model, f"--model {model}: no such directory ({local.resolve()}), and as a hub id")


def _check_model_files(model: str, names: set[str], read: object) -> None:
    """The directory listing ``names`` holds a config, weights, a processor and a tokenizer, and the
    config's ``model_type`` is one StD supports."""
    if "config.json" not in names:
        raise PipelineError(f"--model {model}: not a model directory (no config.json); check the path")
    needed = {"weights": _WEIGHTS, "processor config": _PROCESSOR, "tokenizer": _TOKENIZER}
    for role, candidates in needed.items():
        if not names.intersection(candidates) and not (role == "weights" and _sharded(names)):
            raise PipelineError(
                f"--model {model}: the directory has config.json but no {role} ({' / '.join(candidates)}); "
                "point --model at a complete save_pretrained directory (model and processor)"
            )
    try:
        model_type = json.loads(read("config.json")).get("model_type")
    except ValueError as exc:
        raise PipelineError(f"--model {model}: config.json is not valid JSON ({exc})") from exc
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise PipelineError(
            f"--model {model}: model_type {model_type!r} is not one StD supports "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def _sharded(names: set[str]) -> bool:
    return any(n.endswith(".safetensors") for n in names)


def _check_hub_model(model: str, prefix: str) -> None:
    """A hub id passes when the local Hugging Face cache holds it, or the hub answers for it."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        snapshot_download(model, local_files_only=True, allow_patterns=["config.json"])
        return
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    hint = "download it first (huggingface-cli download ...) or pass a local directory / s3:// URI"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise PipelineError(
            f"{prefix} it is not in the local Hugging Face cache (HF_HUB_OFFLINE is set); {hint}"
        )
    try:
        HfApi().model_info(model, timeout=10)
    except RepositoryNotFoundError as exc:
        raise PipelineError(f"{prefix} it is not on the Hugging Face hub (or it is private)") from exc
    except Exception as exc:  # DNS, connection, timeout: the hub cannot be reached from here
        raise PipelineError(
            f"{prefix} it is not in the local Hugging Face cache and the hub cannot be reached "
            f"({type(exc).__name__}); {hint}"
        ) from exc


def resolve_model(model: str | None, storage: StorageOptions) -> str:
    """A local directory or hub id that ``from_pretrained`` can load (copying remote models once)."""
    if model is None:
        return str(default_model_dir())
    if protocol_of(model) == "file":
        return model
    digest = hashlib.sha256(model.encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{digest}-{model.rstrip('/').rsplit('/', 1)[-1]}"
    with _node_lock(target):
        if not (target / _COMPLETE).exists():
            fs, path = get_fs(model, storage)
            shutil.rmtree(target, ignore_errors=True)
            fs.get(path.rstrip("/") + "/", str(target), recursive=True)
            (target / _COMPLETE).touch()
    return str(target)


@contextlib.contextmanager
def _node_lock(target: Path):
    """An exclusive lock shared by every process of this node that prepares ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pixel_limit(model: str | None, storage: StorageOptions) -> int:
    """The model processor's per-frame pixel limit for videos (its ``size``), read from its config."""
    location = str(default_model_dir()) if model is None else model
    for name in ("processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json"):
        config = _read_json(location, name, storage)
        if config is None:
            continue
        limit = _limit_from(config.get("video_processor", config))
        if limit:
            return limit
    return DEFAULT_MAX_PIXELS


def _read_json(location: str, name: str, storage: StorageOptions) -> dict | None:
    if protocol_of(location) == "file" and not Path(location).is_dir():
        return None  # a hub id: the processor will apply its own limits
    fs, path = get_fs(location, storage)
    try:
        with fs.open(f"{path.rstrip('/')}/{name}", "rb") as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def _limit_from(config: dict) -> int | None:
    size = config.get("size") or {}
    if config.get("max_pixels"):
        return int(config["max_pixels"])
    if size.get("longest_edge"):
        return int(size["longest_edge"])
    if size.get("height") and size.get("width"):
        return int(size["height"]) * int(size["width"])
    return None


def load_model(path: str, dtype: str, device: str) -> tuple[torch.nn.Module, object]:
    """The model (eval mode, on ``device``) and its processor (left padding, for batched generation)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:  # "auto"
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    # StD routes the language model's attention through its own registered function, which wraps sdpa
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor
