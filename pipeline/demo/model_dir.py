"""Where the committed demo model lives and what a loadable model directory holds (no torch imported:
the driver and the jobs' checks use these)."""

from __future__ import annotations

import hashlib
from pathlib import Path

REQUIRED_FILES = {
    "config": ("config.json",),
    "weights": ("model.safetensors",),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json"),
    "processor config": ("processor_config.json",),
    "chat template": ("chat_template.jinja",),
}


def default_model_dir() -> Path:
    """The committed demo model: a Hugging Face directory shipped inside the package."""
    return Path(__file__).resolve().parent / "model"


def check_model_dir(path: str | Path) -> Path:
    """Return ``path`` if it holds a loadable model; else raise naming the first missing file.

    Raises ``FileNotFoundError`` ("model directory ... has no weights: model.safetensors is missing")
    for a missing directory, weights, tokenizer, processor config or chat template.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    for role, names in REQUIRED_FILES.items():
        for name in names:
            if not (path / name).is_file():
                raise FileNotFoundError(f"model directory {path} has no {role}: {name} is missing")
    return path


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
