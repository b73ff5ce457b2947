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
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.frames import DEFAULT_MAX_PIXELS
from pipeline.storage import StorageOptions, get_fs, is_object_store, protocol_of

CACHE_ENV = "STD_ANNOTATE_CACHE"
_COMPLETE = ".complete"


def cache_dir() -> Path:
    """``$STD_ANNOTATE_CACHE`` or ``~/.cache/std-video-annotate``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "std-video-annotate")


def default_model_dir() -> Path:
    """The trained demo model shipped in the package (FileNotFoundError naming a missing file)."""
    from pipeline.demo import builders

    return builders.check_model_dir(builders.default_model_dir())


def model_label(model: str | None) -> str:
    """What the ``model`` column says: the URI or hub id as given, or the default directory's path."""
    return model if model else str(default_model_dir())


def check_model(model: str | None, storage: StorageOptions) -> None:
    """Fail fast when a local or object-storage model location holds no model (hub ids pass)."""
    if model is None:
        return
    if is_object_store(model):
        fs, path = get_fs(model, storage)
        if not fs.isfile(f"{path.rstrip('/')}/config.json"):
            raise PipelineError(f"--model {model}: no config.json there; point it at a model directory")
        return
    if _looks_like_path(model) and not (Path(model) / "config.json").is_file():
        raise PipelineError(f"--model {model}: not a model directory (no config.json); check the path")


def _looks_like_path(model: str) -> bool:
    return protocol_of(model) == "file" and (model.startswith((".", "/", "~")) or Path(model).exists())


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
