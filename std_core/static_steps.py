"""Static-shape decode steps: one compiled (and, on CUDA, graph-captured) forward per shape bucket.

A *static step* is a draft step (``[B, 1]`` tokens over the sparse cache) or a verify / dense step
(``[B, q]`` tokens over the dense cache) whose every input has a fixed shape for the whole decode:

- the tokens ``[B, q]`` and their RoPE positions (``[3, B, q]`` M-RoPE, ``[B, q]`` 1-D);
- the write slots ``[B, q]`` (``lengths[b] + pending + i``), a tensor: new keys and values are
  scattered there, never sliced at a Python length, by the custom op :func:`write_slots`, which
  mutates the cache buffers in place. (A plain ``scatter_`` on a buffer that the compiled graph
  receives as an input is functionalized by ``torch.compile`` into an out-of-place scatter plus a
  copy of the whole buffer back into the input: every compiled step then copied the whole KV cache,
  which made the compiled dense step of the demo model cost 2.1x the eager one on CPU. A custom op
  that declares its mutation is re-inplaced by inductor, so the step writes only its own slots.)
- the additive mask ``[B, 1, groups · q, capacity]``, a view of the cache's preallocated bias over
  the cache's **whole capacity**. Slots no query may see hold −inf, so after the softmax they weigh
  exactly 0, and their values (zeros, or finite states of dropped tokens) add exactly 0. Every value
  slot is written only with model states or zeros, so none is NaN or inf.

The step runs the language model's decoder stack and ``lm_head`` directly (not the multimodal
``model(...)``, whose vision/RoPE-index Python is not needed at decode time), over
:class:`StaticSlots`, a ``Cache`` view of a :class:`~std_core.kv_cache.SlotCache`'s own buffers.
Nothing in it branches on a length, so ``torch.compile(fullgraph=True, dynamic=False)`` traces it
once per bucket ``(tokens, positions, mask, cache buffer)`` shapes, and a decode never recompiles.
Each bucket gets its own code object (:func:`_bucket_function`), so a recompile *within* a bucket is
a guard failure that ``torch._dynamo.config.error_on_recompile`` turns into an error in tests.

On CUDA (``cuda_graphs``) each (cache, q) is captured once per ``generate`` call into a
``torch.cuda.CUDAGraph`` (the cache's buffers have fixed addresses for the call): the step's inputs
are copied into static buffers before each replay and the logits are cloned out of the graph's
output buffer, so no later replay can overwrite what a caller holds.

Not static (they stay eager, in :mod:`std_core.decoder`): the prefill, the shared-prefix path
(:mod:`std_core.shared_prefill`), the logits processors and stopping criteria, acceptance and
rollback. Architectures whose language model has sliding-window layers are not supported here
(:func:`unsupported_reason`); the decoder then decodes eagerly.
"""

from __future__ import annotations

import time
import types
import weakref
from collections.abc import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from std_core.attention import attention_phase
from std_core.kv_cache import SlotCache

#: static caches' capacities are multiples of this many slots (one compiled step serves every
#: length in a bucket; the masked slots cost attention reads of at most this many more keys)
CAPACITY_STEP = 256


def bucket_capacity(slots: int) -> int:
    """``slots`` rounded up to a multiple of :data:`CAPACITY_STEP`."""
    return -(-slots // CAPACITY_STEP) * CAPACITY_STEP


@torch.library.custom_op("std_core::write_slots", mutates_args=("keys", "values"))
def write_slots(
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    key_states: torch.Tensor,
    value_states: torch.Tensor,
) -> None:
    """``keys[b, :, slots[b, i]] = key_states[b, :, i]`` (values likewise), in place: buffers
    ``[B, KVH, capacity, D]``, slots ``[B, q]``, states ``[B, KVH, q, D]``."""
    batch, heads, q, dim = key_states.shape
    index = slots[:, None, :, None].expand(batch, heads, q, dim)
    keys.scatter_(2, index, key_states)
    values.scatter_(2, index, value_states)


@write_slots.register_fake
def _write_slots_fake(*tensors: torch.Tensor) -> None:
    """Tracing: the op returns nothing (its effect is the declared mutation)."""


class StaticLayer(CacheLayerMixin):
    """One layer of :class:`StaticSlots`: scatters new states at the owner's ``slots`` and returns
    the layer's whole fixed-capacity buffers."""

    is_compileable = True
    is_croppable = False
    is_sliding = False

    def __init__(self, owner: StaticSlots, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.owner = owner
        self.keys, self.values = keys, values  # [B, KVH, capacity, D], the SlotCache layer's own
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("StaticLayer wraps initialised buffers")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, KVH, q, D]`` at ``owner.slots [B, q]`` (in place, :func:`write_slots`); return
        keys/values ``[B, KVH, capacity, D]``."""
        write_slots(self.keys, self.values, self.owner.slots, key_states, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        return self.keys.shape[2]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class StaticSlots(Cache):
    """A ``Cache`` over a :class:`SlotCache`'s buffers for static steps; ``slots`` is set per step."""

    def __init__(self, source: SlotCache) -> None:
        layers = []
        super().__init__(layers=layers)
        self.layers = [StaticLayer(self, layer.keys, layer.values) for layer in source.layers]
        self.slots: torch.Tensor | None = None  # [B, q] write slots of the current step


def _step(
    language_model: torch.nn.Module,
    lm_head: torch.nn.Module,
    cache: StaticSlots,
    input_ids: torch.Tensor,  # [B, q]
    position_ids: torch.Tensor,  # [3, B, q] (M-RoPE) or [B, q]
    mask: torch.Tensor,  # [B, 1, groups * q, capacity] additive
    slots: torch.Tensor,  # [B, q] write slots
) -> torch.Tensor:
    """One static decode forward; logits ``[B, q, V]``."""
    cache.slots = slots
    hidden = language_model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    return lm_head(hidden)


def _bucket_function(name: str) -> Callable:
    """A copy of :func:`_step` with its own code object: dynamo caches compiled graphs per code
    object, so each bucket's graph lives apart and a second compile of one bucket is a recompile."""
    code = _step.__code__.replace(co_name=name)
    return types.FunctionType(code, _step.__globals__, name, _step.__defaults__, _step.__closure__)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why static steps cannot run this model (None: they can)."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if language_model is None or not hasattr(model, "lm_head"):
        return "no model.model.language_model / model.lm_head"
    if "sliding_attention" in (getattr(language_model.config, "layer_types", None) or ()):
        return "sliding-window layers need a per-layer mask"
    return None


class StaticSteps:
    """The compiled step functions of one model, one per shape bucket, kept across ``generate`` calls.

    ``backend`` is a ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` or ``"eager"`` need no
    C++ compiler) or None for the static step run eagerly."""

    def __init__(self, model: torch.nn.Module, backend: str | None, cuda_graphs: bool = False) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"static steps unsupported: {reason}")
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        self._functions: dict[tuple, Callable] = {}

    def function(self, key: tuple) -> tuple[Callable, bool]:
        """The step function of a bucket, and whether it is new (its first call compiles)."""
        if key in self._functions:
            return self._functions[key], False
        fn = _bucket_function(f"std_static_step_{len(self._functions)}")
        if self.backend is not None:
            fn = torch.compile(fn, backend=self.backend, fullgraph=True, dynamic=False)
        self._functions[key] = fn
        return fn, True

    def session(self) -> StaticSession:
        """The per-``generate`` state (cache views, CUDA graphs)."""
        return StaticSession(self)


class StaticSession:
    """Static steps over the caches of one ``generate`` call (see the module docstring).

    ``compile_seconds``: the first calls of new buckets (trace, compile and that one step) and, on
    CUDA, each graph's warm-up and capture (once per cache and q in every call)."""

    def __init__(self, steps: StaticSteps) -> None:
        self.steps = steps
        self._views: weakref.WeakKeyDictionary[SlotCache, StaticSlots] = weakref.WeakKeyDictionary()
        self._graphs: dict[tuple[int, int], _Graphed] = {}
        self.kind = "compile" if steps.backend is not None else "eager"
        self.compile_seconds = 0.0  # this call's first calls of new buckets (compiling)
        self.compiles = 0

    def forward(self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What :meth:`std_core.decoder._Decode.forward` does, statically: ``tokens [B, q]`` at
        ``positions``, written at the row cursors; logits ``[B, q, V]``."""
        q = tokens.shape[1]
        mask = cache.begin_forward(q, full=True)  # [B, 1, groups * q, capacity]
        slots = _packed(cache.window(cache.pending + q)[:, cache.pending :])  # the cache's own write slots
        view = self._views.get(cache)
        if view is None:
            view = self._views[cache] = StaticSlots(cache)
        args = (_packed(tokens), _packed(positions), mask, slots)
        key = (*(tuple(a.shape) + a.stride() for a in args), tuple(view.layers[0].keys.shape))
        fn, new = self.steps.function(key)

        start, before = time.perf_counter(), self.compile_seconds
        with attention_phase("decode"):
            if self.steps.cuda_graphs:
                logits = self._graphed(cache, view, fn, args)
            else:
                logits = fn(self.steps.language_model, self.steps.lm_head, view, *args)
        if new:  # the whole first call (on CUDA it holds the capture that _graphed counted: not twice)
            self.compile_seconds = before + time.perf_counter() - start
            self.compiles += 1
        cache.end_forward(q)
        return logits

    def _graphed(self, cache: SlotCache, view: StaticSlots, fn: Callable, args: tuple) -> torch.Tensor:
        key = (id(cache), args[0].shape[1])
        graph = self._graphs.get(key)
        if graph is None:  # warm-up + capture, once per call: counted with the compiling
            start = time.perf_counter()
            graph = self._graphs[key] = _Graphed(
                lambda *a: fn(self.steps.language_model, self.steps.lm_head, view, *a), args
            )
            self.compile_seconds += time.perf_counter() - start
        return graph(args)


def _packed(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` with row-major strides, whatever ``x``'s layout (a stride is part of a bucket)."""
    return x.new_empty(x.shape).copy_(x)


class _Graphed:
    """A CUDA graph of one step: inputs copied into static buffers, logits cloned out.

    Capture runs the step (after a warm-up on a side stream) on the capture-time inputs. A step's
    only side effect is writing its own keys/values at its slots, so running it again with the same
    inputs (warm-up, capture, first replay) writes the same states: it is idempotent."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.static = [a.clone() for a in args[:2]] + [args[2]] + [args[3].clone()]  # mask: the bias view
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.static)

    def __call__(self, args: tuple) -> torch.Tensor:
        for static, new in zip(self.static, args, strict=True):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new)
        self.graph.replay()
        return self.output.clone()
