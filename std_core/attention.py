"""The attention function StD registers with transformers, and the context that steers it.

``install(model)`` registers ``"std_<original>"`` in transformers' ``AttentionInterface`` together
with the original implementation's entry in ``AttentionMaskInterface`` (without a mask entry the
model would pass no causal mask to multi-token forwards), and switches the *language model* to it; the
vision tower keeps its own attention.

Outside :func:`attention_phase` the registered function is the original implementation, so plain
``model.generate`` keeps its exact behaviour. Inside:

- ``"prefill"``: the original implementation (the dense KV cache is what ``generate`` builds), and an
  optional observer sees every layer's post-RoPE queries and keys (text-guided selection);
- ``"decode"``: grouped-query SDPA over the cache prefix with the decoder's explicit mask. Query heads
  are folded onto their KV head (``[B, H, q, D] -> [B, KVH, G*q, D]``), so keys and values are read
  once per KV head, never repeated per query head, whatever the mask. Inside :func:`shared_prefix`
  the decode phase instead hands every layer's attention to a :class:`PrefixAttention` (the dense
  cache of a shared prefill, whose rows attend to a prefix stored once per video plus their own slots,
  see :mod:`std_core.prefix_cache`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

Observer = Callable[[int, torch.Tensor, torch.Tensor, float], None]
SUPPORTED_ORIGINALS = ("sdpa", "eager")
PREFIX = "std_"


@dataclass(frozen=True)
class _Phase:
    name: str  # "prefill" or "decode"
    observer: Observer | None = None


_PHASE: ContextVar[_Phase | None] = ContextVar("std_attention_phase", default=None)


class PrefixAttention(Protocol):
    """Attention of a decode-phase forward whose keys are not all in the cache's own slots."""

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        """query ``[B, H, q, D]``, the own slots' key/value ``[B, KVH, L, D]`` and their mask
        ``[B, 1, G*q, L]`` (as :func:`grouped_attention` takes them); returns ``[B, q, H, D]``."""
        ...


_PREFIX: ContextVar[PrefixAttention | None] = ContextVar("std_attention_prefix", default=None)


@contextlib.contextmanager
def shared_prefix(prefix: PrefixAttention | None) -> Iterator[None]:
    """Inside this block, decode-phase attention is ``prefix.attend`` (None: the plain grouped SDPA)."""
    token = _PREFIX.set(prefix)
    try:
        yield
    finally:
        _PREFIX.reset(token)


@contextlib.contextmanager
def attention_phase(name: str, observer: Observer | None = None) -> Iterator[None]:
    """Run the model's forwards inside this block in StD's ``"prefill"`` or ``"decode"`` phase."""
    if name not in ("prefill", "decode"):
        raise ValueError(f"unknown attention phase {name!r}")
    token = _PHASE.set(_Phase(name, observer))
    try:
        yield
    finally:
        _PHASE.reset(token)


def grouped_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """SDPA with query heads folded onto KV heads.

    query ``[B, H, q, D]``; key/value ``[B, KVH, L, D]``; mask ``[B, 1, G*q, L]`` bool, row
    ``g*q + i`` for query ``i`` (as :meth:`SlotCache.begin_forward` builds it). Returns
    ``[B, q, H, D]``. Query head ``h`` attends with KV head ``h // G``, as ``repeat_kv`` pairs them.
    """
    batch, heads, q, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    assert mask.shape[-2] == groups * q, f"mask rows {mask.shape[-2]} != groups*q {groups * q}"
    folded = query.reshape(batch, kv_heads, groups * q, dim)
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, q, dim).transpose(1, 2)


def _original_function(module: torch.nn.Module, name: str) -> Callable:
    if name == "eager":  # eager lives in each modeling file, not in the registry
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _make_attention(original: str) -> Callable:
    def std_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        phase = _PHASE.get()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if phase is not None and phase.observer is not None:
            phase.observer(module.layer_idx, query, key, scale)
        if phase is None or phase.name == "prefill":
            fn = _original_function(module, original)
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        prefix = _PREFIX.get()
        if prefix is not None:
            return prefix.attend(module.layer_idx, query, key, value, attention_mask, scale), None
        return grouped_attention(query, key, value, attention_mask, scale), None

    std_attention.__name__ = f"{PREFIX}{original}_attention"
    return std_attention


def text_attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation of the language model."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    return text._attn_implementation or "eager"


def install(model: torch.nn.Module) -> str:
    """Route the language model's attention through StD's function; return its registered name."""
    current = text_attention_implementation(model)
    if current.startswith(PREFIX):
        return current
    if current not in SUPPORTED_ORIGINALS:
        raise ValueError(
            f"StD needs the language model's attention to be one of {SUPPORTED_ORIGINALS}, got {current!r}. "
            "Load the model with attn_implementation='sdpa'."
        )
    name = PREFIX + current
    AttentionInterface.register(name, _make_attention(current))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation({"text_config": name})
    installed = text_attention_implementation(model)
    if installed != name:
        raise RuntimeError(f"could not switch the language model's attention to {name!r} (got {installed!r})")
    return name
