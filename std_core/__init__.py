"""Sparse-to-Dense (StD) lossless self-speculative decoding for Hugging Face Video-LLMs.

``std_core`` sees token ids and pixel tensors and returns ids and statistics: it imports torch and
transformers only (no Ray, no storage, no printing).

    from std_core import StdConfig, SparseToDenseDecoder
    decoder = SparseToDenseDecoder(model, StdConfig(gamma=9, sparse_budget=1024))
    result = decoder.generate(**inputs, max_new_tokens=128)
    result.sequences, result.stats

The names below load on first use, so ``std_core.config`` and ``std_core.stats`` (the config and the
metric definitions a Ray driver needs) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StdConfig": "std_core.config",
    "GenerateResult": "std_core.decoder",
    "SparseToDenseDecoder": "std_core.decoder",
    "Divergence": "std_core.diagnostics",
    "first_divergence": "std_core.diagnostics",
    "generate_shared": "std_core.shared_prefill",
    "SUPPORTED_ARCHITECTURES": "std_core.config",
    "UnsupportedModelError": "std_core.models",
    "DecodeStats": "std_core.stats",
    "RowStats": "std_core.stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'std_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
