"""One timed ``generate`` call of one decoding variant, as a :class:`Sample`.

Variants (all greedy, same inputs, same model object):

- ``std``: :class:`std_core.SparseToDenseDecoder` with fixed γ (the case's); ``std_g<γ>`` (e.g.
  ``std_g3``, from ``--fixed-gammas``): the same at another fixed γ, so auto is compared with the best
  fixed γ, not only with γ = 9;
- ``std_sink``: the same with ``selection="sink_window"`` (the first visual tokens as attention sinks
  plus the most recent visual tokens, the paper's comparison draft) instead of the text-guided top-K,
  at the same budget;
- ``dense``: the same decoder with ``mode="dense"`` (plain one-token decoding through the same code);
- ``auto``: ``mode="auto"`` (γ per round from measured step costs and the running acceptance);
- ``<variant>_compiled`` (``--compile``): each std_core variant again with compiled static steps
  (``StdConfig(static_steps="compile")``, CUDA graphs on CUDA); the plain variants then run with
  ``static_steps="off"``, so compiled and eager step costs sit side by side;
- ``hf``: plain ``model.generate``; ``hf_gqa``: the same with ``TRANSFORMERS_SDPA_FORCE_GQA=1``
  (transformers reads it per attention call), so SDPA attends per KV head even with a mask.

Where the time goes. std_core times its own phases (prefill, selection, the rounds, and the draft and
verify forwards inside them); for every variant, *decode* is the wall time after the first token: the
rounds for the std_core variants (std_core's ``rounds_seconds``, so it includes choosing γ and the
accept / roll-back bookkeeping), and, for ``hf``, the time between the first and the last call of a
no-op stopping criterion (called once per generated token). *Setup* is the rest of a std_core call
(``wall − prefill − select − decode``: ``generate``'s input preparation, the first token, the caches'
masks), the same for every std_core variant. *Steps* are the tokens after the first (which every
variant takes from the prefill's logits), so ``decode / steps`` is the time per output position of the
whole batch.

Memory. CUDA: ``max_memory_allocated`` over the call. CPU: the process's peak resident set (VmHWM,
reset before the call through ``/proc/self/clear_refs``), which includes the model and the interpreter;
``base_memory_bytes`` is the resident set just before the call.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from pipeline.bench.inputs import fresh
from std_core.stats import RowStats

STD_VARIANTS = ("std", "std_sink", "dense", "auto")
HF_VARIANTS = ("hf", "hf_gqa")
VARIANTS = STD_VARIANTS + HF_VARIANTS
DEFAULT_VARIANTS = ("std", "dense", "auto", "hf", "hf_gqa")  # std_sink on request (--variants)
FORCE_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
FIXED_PREFIX = "std_g"  # std_g<γ>: fixed-γ StD at another γ than the case's
COMPILED_SUFFIX = "_compiled"  # <variant>_compiled: the std_core variant with compiled static steps


def fixed_variant(gamma: int) -> str:
    """The name of the fixed-γ StD variant at ``gamma`` (``std_g3``)."""
    return f"{FIXED_PREFIX}{gamma}"


def fixed_gamma_of(variant: str) -> int | None:
    """The γ of a ``std_g<γ>`` variant, else None."""
    tail = variant.removeprefix(FIXED_PREFIX)
    return int(tail) if variant.startswith(FIXED_PREFIX) and tail.isdigit() else None


def compiled_variant(variant: str) -> str:
    """The compiled twin of a std_core variant (``dense_compiled``: ``static_steps="compile"``)."""
    return f"{variant}{COMPILED_SUFFIX}"


def eager_of(variant: str) -> str:
    """The variant without its compiled suffix (``dense_compiled`` → ``dense``)."""
    return variant.removesuffix(COMPILED_SUFFIX)


def is_std_core(variant: str) -> bool:
    """Whether ``variant`` decodes with std_core (its phases are timed), not plain ``generate``."""
    base = eager_of(variant)
    return base in STD_VARIANTS or fixed_gamma_of(base) is not None


@dataclass(frozen=True)
class Sample:
    """One call of one variant. Seconds are wall-clock (CUDA: synchronised at the call's ends)."""

    variant: str
    wall_seconds: float
    prefill_seconds: float
    select_seconds: float
    draft_seconds: float
    verify_seconds: float
    decode_seconds: float
    setup_seconds: float  # std_core variants: wall - prefill - select - decode (0 for hf)
    steps: int  # decode positions: generated tokens after the first (max over rows)
    rounds: int  # batch rounds (std_core variants; = steps for dense)
    counts: RowStats  # the rows' decode counts, summed (each row's rounds until it stopped)
    round_gammas: tuple[int, ...]
    peak_memory_bytes: int
    base_memory_bytes: int
    dense_cache_bytes: int
    sparse_cache_bytes: int
    kept_prompt_tokens: int  # prompt tokens in the sparse cache, mean over rows (0 without one)
    visual_tokens: int  # visual tokens in the prompt as std_core counts them, mean over rows (0: hf variants)
    batch: int
    sequences: torch.Tensor  # [B, prompt + new]: compared across variants, not reported
    compile_seconds: float = 0.0  # first calls of new static-step buckets in this call (compiling)
    compiles: int = 0  # static-step buckets compiled in this call

    @property
    def other_seconds(self) -> float:
        """Decode time outside draft and verify forwards: the rounds' bookkeeping (choosing γ,
        accepting, rolling back, stop checks)."""
        return max(0.0, self.decode_seconds - self.draft_seconds - self.verify_seconds)


def run_variant(
    variant: str, model: torch.nn.Module, decoders: dict, inputs: dict, max_new_tokens: int
) -> Sample:
    """Time one ``generate`` call of ``variant`` (``decoders`` maps the std_core variants to decoders)."""
    device = model.device
    with _peak_memory(device) as memory:
        if is_std_core(variant):
            sample = _run_std(variant, decoders[variant], inputs, max_new_tokens, device)
        elif variant in HF_VARIANTS:
            with _env(FORCE_GQA_ENV, "1" if variant == "hf_gqa" else None):
                sample = _run_hf(variant, model, inputs, max_new_tokens, device)
        else:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return _with_memory(sample, memory)


def _run_std(
    variant: str, decoder: object, inputs: dict, max_new_tokens: int, device: torch.device
) -> Sample:
    synchronize(device)
    start = time.perf_counter()
    result = decoder.generate(**fresh(inputs), max_new_tokens=max_new_tokens)
    synchronize(device)
    wall = time.perf_counter() - start
    stats = result.stats
    return Sample(
        variant=variant,
        wall_seconds=wall,
        prefill_seconds=stats.prefill_seconds,
        select_seconds=stats.select_seconds,
        draft_seconds=stats.draft_seconds,
        verify_seconds=stats.verify_seconds,
        decode_seconds=stats.rounds_seconds,
        setup_seconds=max(0.0, wall - stats.prefill_seconds - stats.select_seconds - stats.rounds_seconds),
        steps=max(row.generated for row in stats.rows) - 1,
        rounds=stats.batch_rounds,
        counts=stats.total,
        round_gammas=stats.round_gammas,
        peak_memory_bytes=0,
        base_memory_bytes=0,
        dense_cache_bytes=stats.dense_cache_bytes,
        sparse_cache_bytes=stats.sparse_cache_bytes,
        visual_tokens=round(sum(stats.visual_tokens) / len(stats.rows)),
        kept_prompt_tokens=round(sum(stats.kept_prompt_tokens) / len(stats.rows))
        if result.stats.gamma
        else 0,
        batch=len(stats.rows),
        sequences=result.sequences.cpu(),
        compile_seconds=stats.compile_seconds,
        compiles=stats.compiles,
    )


class _TokenClock(StoppingCriteria):
    """A stopping criterion that never stops: it stamps the first and the last generated token."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if self.first is None:
            synchronize(self.device)
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _run_hf(
    variant: str, model: torch.nn.Module, inputs: dict, max_new_tokens: int, device: torch.device
) -> Sample:
    clock = _TokenClock(device)
    prompt_len = inputs["input_ids"].shape[1]
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        sequences = model.generate(
            **fresh(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    synchronize(device)
    end = time.perf_counter()
    first = clock.first if clock.first is not None else end
    steps = sequences.shape[1] - prompt_len - 1
    return Sample(
        variant=variant,
        wall_seconds=end - start,
        prefill_seconds=first - start,
        select_seconds=0.0,
        draft_seconds=0.0,
        verify_seconds=0.0,
        decode_seconds=end - first,
        setup_seconds=0.0,
        steps=steps,
        rounds=steps,
        counts=RowStats(
            generated=(steps + 1) * sequences.shape[0],
            rounds=steps * sequences.shape[0],
            committed=steps * sequences.shape[0],
        ),
        round_gammas=(),
        peak_memory_bytes=0,
        base_memory_bytes=0,
        dense_cache_bytes=0,
        sparse_cache_bytes=0,
        kept_prompt_tokens=0,
        visual_tokens=0,
        batch=sequences.shape[0],
        sequences=sequences.cpu(),
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` torch threads; restore the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set (or, with None, unset) an environment variable for the block; restore it after."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@dataclass
class _Memory:
    base: int = 0
    peak: int = 0


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[_Memory]:
    memory = _Memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        memory.base = torch.cuda.memory_allocated(device)
        yield memory
        memory.peak = torch.cuda.max_memory_allocated(device)
        return
    _reset_peak_rss()
    memory.base = _proc_status_bytes("VmRSS")
    yield memory
    memory.peak = _proc_status_bytes("VmHWM")


def memory_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _proc_status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _with_memory(sample: Sample, memory: _Memory) -> Sample:
    from dataclasses import replace

    return replace(sample, peak_memory_bytes=memory.peak, base_memory_bytes=memory.base)
