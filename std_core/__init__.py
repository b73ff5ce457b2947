"""Sparse-to-Dense (StD) lossless self-speculative decoding for Hugging Face Video-LLMs.

``std_core`` sees token ids and pixel tensors and returns ids and statistics: it imports torch and
transformers only (no Ray, no storage, no printing).

    from std_core import StdConfig, SparseToDenseDecoder
    decoder = SparseToDenseDecoder(model, StdConfig(gamma=9, sparse_budget=1024))
    result = decoder.generate(**inputs, max_new_tokens=128)
    result.sequences, result.stats
"""

from std_core.config import StdConfig
from std_core.decoder import GenerateResult, SparseToDenseDecoder
from std_core.diagnostics import Divergence, first_divergence
from std_core.models import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from std_core.stats import DecodeStats, RowStats

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "DecodeStats",
    "Divergence",
    "GenerateResult",
    "RowStats",
    "SparseToDenseDecoder",
    "StdConfig",
    "UnsupportedModelError",
    "first_divergence",
]
