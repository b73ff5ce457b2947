"""StdConfig: every knob of the Sparse-to-Dense decoder, frozen and validated.

Vocabulary (used the same way everywhere in ``std_core``):

- *dense*: the model with full attention over its whole KV cache. The dense model's greedy output is
  the reference; StD never changes it.
- *sparse*: the same weights attending to a compact copy of the KV cache that holds every non-visual
  prompt token, the top-K visual tokens of each (layer, KV head), and every generated token.
- *draft*: one sparse forward that proposes the next token. gamma (γ) drafts are proposed per round.
- *verify*: one dense forward over ``[pending] + drafts`` (γ + 1 positions).
- *accepted*: drafted tokens equal to (greedy) or accepted by the rejection rule against (sampling)
  the dense prediction, counted as the longest prefix.
- *bonus*: the one dense token every round commits after the accepted prefix, so a round commits
  accepted + 1 tokens. vLLM's spec-decode vocabulary has two names for it: a *recovered* token
  replaces the first rejected draft, a *bonus* token follows a fully accepted draft run. Our bonus is
  either one; we do not use "recovered".
- *round*: draft γ → verify → accept → roll back.
- *sparse budget*: K + m_t, the number of prompt tokens the sparse cache keeps per (layer, KV head);
  m_t is the number of non-visual prompt tokens (always kept), K the number of visual tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: The ``model_type`` of every architecture StD supports (``...ForConditionalGeneration`` models).
SUPPORTED_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")

Mode = Literal["std", "dense", "auto"]
Verify = Literal["parallel", "sequential"]
Selection = Literal["text_topk", "sink_window"]
SelectionQueries = Literal["all_text", "after_visual"]
StaticSteps = Literal["auto", "compile", "eager", "off"]

_MODES = ("std", "dense", "auto")
_VERIFY = ("parallel", "sequential")
_SELECTION = ("text_topk", "sink_window")
_QUERIES = ("all_text", "after_visual")
_STATIC = ("auto", "compile", "eager", "off")


# What static_steps="auto" means on CUDA. Compiled, graph-captured steps are the point of static
# steps there, but they have never run on a GPU: until scripts/gpu_check.py has passed on one
# (bf16 sequential verify equal to generate, compiled included), CUDA decodes with "off" by default.
COMPILE_ON_CUDA = False


@dataclass(frozen=True)
class StdConfig:
    """Configuration of :class:`std_core.SparseToDenseDecoder`.

    Attributes:
        mode: ``"std"`` drafts with the sparse cache and verifies densely; ``"dense"`` runs plain
            autoregressive decoding through the same code path (the fair baseline, and the fallback);
            ``"auto"`` picks γ per round (0 = dense) from measured step costs and the running
            acceptance, so it does not use StD where StD cannot win (see :mod:`std_core.auto`).
        gamma: drafts per round (paper: 9); the largest γ ``"auto"`` may pick. Larger γ amortises a
            verify over more tokens but wastes more drafts after a rejection.
        sparse_budget: prompt tokens kept in the sparse cache per (layer, KV head), K + m_t
            (paper: 1024). Non-visual prompt tokens are always kept, so K = budget − m_t, clamped to
            [0, visual tokens].
        verify: ``"parallel"`` checks all γ + 1 positions in one dense forward (fast; in bf16/fp16 a
            near-tie can flip because the reduction order differs from one-token decoding).
            ``"sequential"`` checks one position per forward: the same numerics as plain decoding,
            exact in every dtype, but slower.
        selection: ``"text_topk"`` is the paper's draft: per (layer, KV head) the K visual tokens that
            the prompt's text attends to most. ``"sink_window"`` keeps the first ``sink_tokens`` visual
            tokens plus the last K − sink visual tokens (a StreamingLLM-style draft, same budget), for
            comparison.
        selection_queries: which text tokens score the visual tokens. ``"all_text"`` averages over all
            text tokens; text before the first visual token cannot attend to it (causal), so only text
            after the first visual token is used, which ranks exactly as the paper's average.
            ``"after_visual"`` uses only the text after the last visual token (question + assistant
            header), as the independent reproduction did.
        sink_tokens: visual tokens always kept at the start by ``"sink_window"``.
        static_steps: how decode forwards run (see :mod:`std_core.static_steps`). ``"compile"``:
            static-shape steps (fixed inputs over the caches' whole capacity) under
            ``torch.compile(fullgraph=True)`` with ``compile_backend``, captured in CUDA graphs on
            CUDA; each (batch, γ, capacity) bucket compiles once, on its first call (timed in
            ``DecodeStats.compile_seconds``). ``"eager"``: the same static steps, not compiled.
            ``"off"``: the Hugging Face forward over the used cache prefix. ``"auto"`` (default):
            ``"off"`` on CPU, where compiled steps cost about what eager ones do (BENCHMARKS.md §9); on CUDA
            ``"compile"`` once :data:`COMPILE_ON_CUDA` is set, which waits for the compiled and
            graph-captured steps to pass ``scripts/gpu_check.py`` on a GPU (they have never run on
            one), and ``"off"`` until then. Architectures the static step does not support decode
            as ``"off"``.
        compile_backend: the ``torch.compile`` backend of ``"compile"``: ``"inductor"`` (needs a C++
            compiler on CPU), or ``"aot_eager"`` / ``"eager"`` (trace only: graph-break and
            recompile checks without a compiler). fp32 exactness against ``generate`` is tested
            with the trace-only backends; inductor may fuse reductions in another order.
    """

    mode: Mode = "std"
    gamma: int = 9
    sparse_budget: int = 1024
    verify: Verify = "parallel"
    selection: Selection = "text_topk"
    selection_queries: SelectionQueries = "all_text"
    sink_tokens: int = 4
    static_steps: StaticSteps = "auto"
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"StdConfig.mode must be one of {_MODES}, got {self.mode!r}")
        if not isinstance(self.gamma, int) or self.gamma < 1:
            raise ValueError(f"StdConfig.gamma must be an integer >= 1, got {self.gamma!r}")
        if not isinstance(self.sparse_budget, int) or self.sparse_budget <= 0:
            raise ValueError(f"StdConfig.sparse_budget must be an integer > 0, got {self.sparse_budget!r}")
        if self.verify not in _VERIFY:
            raise ValueError(f"StdConfig.verify must be one of {_VERIFY}, got {self.verify!r}")
        if self.selection not in _SELECTION:
            raise ValueError(f"StdConfig.selection must be one of {_SELECTION}, got {self.selection!r}")
        if self.selection_queries not in _QUERIES:
            raise ValueError(
                f"StdConfig.selection_queries must be one of {_QUERIES}, got {self.selection_queries!r}"
            )
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"StdConfig.sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        if self.static_steps not in _STATIC:
            raise ValueError(f"StdConfig.static_steps must be one of {_STATIC}, got {self.static_steps!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(
                f"StdConfig.compile_backend must be a backend name, got {self.compile_backend!r}"
            )

    def static_steps_on(self, device_type: str) -> StaticSteps:
        """``static_steps`` with ``"auto"`` resolved for a device type: ``"compile"`` on ``"cuda"``
        where :data:`COMPILE_ON_CUDA`, else ``"off"``."""
        if self.static_steps == "auto":
            return "compile" if device_type == "cuda" and COMPILE_ON_CUDA else "off"
        return self.static_steps
