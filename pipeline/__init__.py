"""Ray Data video-annotation pipeline: read, decode frames, annotate on actors, write Parquet, account."""

from __future__ import annotations

from typing import Any

__all__ = ["default_model_dir"]


def __getattr__(name: str) -> Any:
    # ``from pipeline import default_model_dir`` without importing torch for every ``pipeline.*`` import
    if name == "default_model_dir":
        from pipeline.models import default_model_dir

        return default_model_dir
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
