"""Memory and speed of the shared prefill's two dense-cache layouts: a copy of the video's prefix per
question (``copy_prefix=True``) against the prefix stored once (the default).

``python -m jobs.benchmark prefix-memory --questions 10 50`` measures, for one demo-world video and
each question count, in three **fresh processes** (``python -m pipeline.bench.prefix_memory
CONFIG_JSON QUESTIONS copy|shared|speed``), one after the other in this one run:

- *memory*, one process per layout: it loads the model, preprocesses the video and its questions
  (:func:`pipeline.questions.question_inputs`), reads its peak resident memory (``VmHWM`` of
  ``/proc/self/status``), runs :func:`std_core.generate_shared` once and reads ``VmHWM`` again: the
  call's peak in a process that did nothing else. It reports the dense and sparse cache bytes from
  the call's stats and a hash of its output tokens: both layouts must produce the same tokens
  (``outputs_equal``).
- *speed*, one process for both layouts: one warm-up call of each, then ``repeats`` rounds each
  calling both layouts (the order alternating), so a shared machine's drifts fall on both; medians
  of ``rounds_seconds`` (the draft / verify rounds: the decode) and of ``prefill_seconds`` (the
  video's prefix, the suffixes and the selection), and decode tokens/s = generated tokens / median
  rounds seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from pipeline.config import DecoderMode, flag

log = logging.getLogger(__name__)

LAYOUTS = ("copy", "shared")  # copy_prefix=True, and the default


@dataclass(frozen=True)
class PrefixMemoryBenchConfig:
    """One field per ``jobs.benchmark prefix-memory`` flag (``jobs/_cli.py`` reads each field's metadata)."""

    model: str | None = flag(None, "model directory; None: the demo model")
    num_frames: int = flag(128, "frames of the one demo-world video")
    questions: tuple[int, ...] = flag((10, 50), "question counts about that video, each measured in one call")
    decoder: DecoderMode = flag("std", "std_core mode: std, dense or auto")
    gamma: int = flag(9, "drafts per round")
    sparse_budget: int = flag(1024, "prompt tokens the draft keeps per layer and KV head")
    max_new_tokens: int = flag(32, "upper bound on generated tokens per question")
    full_length: bool = flag(
        False,
        "every question generates max_new_tokens (min_new_tokens = max_new_tokens: EOS is suppressed), so "
        "the decode is long enough to time; off: the model's own answers (1-3 words on the demo model)",
    )
    threads: int = flag(1, "torch threads of each child process")
    repeats: int = flag(5, "timed calls of each layout in the speed process (medians)")
    seed: int = flag(0, "demo-world clip seed")

    def __post_init__(self) -> None:
        if any(q < 1 for q in self.questions) or not self.questions:
            raise ValueError("questions must be one or more counts >= 1")
        for name in ("num_frames", "max_new_tokens", "threads", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def run_prefix_memory_benchmark(config: PrefixMemoryBenchConfig) -> dict:
    """Both layouts at every question count, each in a fresh child process; returns the side-by-side
    figures and their ratios (copy / shared)."""
    cases = []
    for questions in config.questions:
        runs = {layout: _child(config, questions, layout) for layout in (*LAYOUTS, "speed")}
        copy, shared, speed = runs["copy"], runs["shared"], runs["speed"]
        cases.append(
            {
                "questions": questions,
                "copy": copy,
                "shared": shared,
                "speed": speed,
                "outputs_equal": copy["output_sha1"] == shared["output_sha1"] and speed["outputs_equal"],
                "dense_cache_ratio": copy["dense_cache_bytes"] / shared["dense_cache_bytes"],
                "vmhwm_saved_mib": (copy["vmhwm_after_kib"] - shared["vmhwm_after_kib"]) / 1024,
                "decode_speed_ratio": speed["shared"]["decode_tokens_per_s"]
                / speed["copy"]["decode_tokens_per_s"],
            }
        )
        log.info("%d questions: %s", questions, json.dumps(cases[-1]))
    return {"benchmark": "prefix-memory", "config": asdict(config), "cases": cases}


def _child(config: PrefixMemoryBenchConfig, questions: int, layout: str) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is its JSON result."""
    command = [
        sys.executable,
        "-m",
        "pipeline.bench.prefix_memory",
        json.dumps(asdict(config)),
        str(questions),
        layout,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"prefix-memory child ({questions} questions, {layout}) failed:\n{done.stderr[-4000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def question_texts(count: int, seed: int) -> list[str]:
    """``count`` distinct questions in the demo world's vocabulary: its QA questions and its
    multiple-choice items (options in the prompt, shuffled per clip), over clips from ``seed`` on."""
    from pipeline.demo.world import make_clip, mcq_items, qa_pairs

    texts: list[str] = []
    for clip_seed in range(seed, seed + 10_000):
        clip = make_clip(clip_seed)
        mcq = [
            f"{item.question} " + " ".join(f"{letter}. {o}" for letter, o in zip("ABCD", item.options, strict=False))
            + " Answer with the option letter from the given choices directly."
            for item in mcq_items(clip)
        ]  # fmt: skip
        for text in [pair.question for pair in qa_pairs(clip)] + mcq:
            if text not in texts:
                texts.append(text)
        if len(texts) >= count:
            return texts[:count]
    raise ValueError(f"the demo world asks fewer than {count} distinct questions")


def _setup(config: PrefixMemoryBenchConfig, questions: int) -> tuple[object, list]:
    """The decoder and the one video's question inputs."""
    import torch

    from pipeline.demo.world import make_clip, render_frames, sample_frames
    from pipeline.models import default_model_dir, load_model
    from pipeline.questions import question_inputs
    from std_core import SparseToDenseDecoder, StdConfig

    torch.set_num_threads(config.threads)
    model, processor = load_model(str(config.model or default_model_dir()), "float32", "cpu")
    frames = sample_frames(render_frames(make_clip(config.seed, config.num_frames)), config.num_frames)
    prompts = [question_inputs(processor, frames, question_texts(questions, config.seed), "cpu")]
    std = StdConfig(mode=config.decoder, gamma=config.gamma, sparse_budget=config.sparse_budget)
    return SparseToDenseDecoder(model, std), prompts


def _call(config: PrefixMemoryBenchConfig, decoder: object, prompts: list, layout: str) -> object:
    from std_core import generate_shared

    length = {"min_new_tokens": config.max_new_tokens} if config.full_length else {}
    copy = layout == "copy"
    return generate_shared(decoder, prompts, max_new_tokens=config.max_new_tokens, copy_prefix=copy, **length)


def measure(config: PrefixMemoryBenchConfig, questions: int, layout: str) -> dict:
    """One memory process's measurement of ``layout`` (see the module docstring)."""
    import torch

    decoder, prompts = _setup(config, questions)
    before = _vmhwm_kib()
    start = time.perf_counter()
    result = _call(config, decoder, prompts, layout)
    seconds = time.perf_counter() - start
    after = _vmhwm_kib()
    stats = result.stats
    return {
        "layout": layout,
        "questions": questions,
        "prompt_tokens": int(prompts[0][0]["input_ids"].shape[1]),
        "visual_tokens": stats.visual_tokens[0],
        "dense_cache_bytes": stats.dense_cache_bytes,
        "sparse_cache_bytes": stats.sparse_cache_bytes,
        "vmhwm_before_kib": before,
        "vmhwm_after_kib": after,
        "call_seconds": seconds,
        "generated_tokens": stats.total.generated,
        "acceptance_rate": stats.total.acceptance_rate,
        "output_sha1": hashlib.sha1(result.sequences.numpy().tobytes()).hexdigest(),
        "threads": torch.get_num_threads(),
    }


def measure_speed(config: PrefixMemoryBenchConfig, questions: int) -> dict:
    """The speed process: both layouts interleaved, medians (see the module docstring)."""
    import torch

    decoder, prompts = _setup(config, questions)
    warm = {layout: _call(config, decoder, prompts, layout) for layout in LAYOUTS}
    runs: dict[str, list] = {layout: [] for layout in LAYOUTS}
    for r in range(config.repeats):
        for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
            runs[layout].append(_call(config, decoder, prompts, layout))
    reference = warm["copy"].sequences
    out: dict = {
        "outputs_equal": all(torch.equal(x.sequences, reference) for x in [warm["shared"], *runs["copy"], *runs["shared"]]),
        "repeats": config.repeats,
    }  # fmt: skip
    for layout, results in runs.items():
        rounds = statistics.median(x.stats.rounds_seconds for x in results)
        generated = results[0].stats.total.generated
        out[layout] = {
            "rounds_seconds_median": rounds,
            "rounds_seconds": [x.stats.rounds_seconds for x in results],
            "prefill_seconds_median": statistics.median(x.stats.prefill_seconds for x in results),
            "generated_tokens": generated,
            "decode_tokens_per_s": generated / rounds if rounds else 0.0,
            "acceptance_rate": results[0].stats.total.acceptance_rate,
        }
    return out


def _vmhwm_kib() -> int:
    """This process's peak resident set size so far (``VmHWM``), KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


if __name__ == "__main__":
    _config = PrefixMemoryBenchConfig(**{**json.loads(sys.argv[1]), "questions": (int(sys.argv[2]),)})
    _questions, _what = int(sys.argv[2]), sys.argv[3]
    _result = measure_speed(_config, _questions) if _what == "speed" else measure(_config, _questions, _what)
    print(json.dumps(_result))
