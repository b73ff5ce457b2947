"""Sparse-to-Dense (StD) lossless self-speculative decoding for Hugging Face Video-LLMs.

``std_core`` sees token ids and pixel tensors and returns ids and statistics: it imports torch and
transformers only (no Ray, no storage, no printing).
"""

from std_core.config import StdConfig

__all__ = ["StdConfig"]
