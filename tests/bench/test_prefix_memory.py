"""The prefix-memory benchmark: its questions, one measurement of each layout (in this process, on a
small random demo-architecture model), and its flags. No timing or memory figure is asserted beyond
consistency: both layouts give the same tokens, and the no-copy dense cache is the smaller."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from jobs import benchmark
from jobs._cli import config_from_args
from pipeline.bench.prefix_memory import PrefixMemoryBenchConfig, measure, measure_speed, question_texts


def test_the_questions_are_distinct_and_in_the_demo_vocabulary() -> None:
    texts = question_texts(50, seed=0)
    assert len(texts) == len(set(texts)) == 50
    assert question_texts(10, seed=0) == texts[:10]


def test_both_layouts_give_the_same_tokens_and_the_shared_one_a_smaller_dense_cache(model_dir: Path) -> None:
    config = PrefixMemoryBenchConfig(
        model=str(model_dir), num_frames=16, questions=(3,), max_new_tokens=4, full_length=True
    )
    copy, shared = (measure(config, 3, layout) for layout in ("copy", "shared"))
    assert copy["output_sha1"] == shared["output_sha1"]
    assert copy["generated_tokens"] == shared["generated_tokens"] == 3 * 4  # full length: EOS suppressed
    assert shared["dense_cache_bytes"] < copy["dense_cache_bytes"]
    assert shared["sparse_cache_bytes"] == copy["sparse_cache_bytes"]
    assert 0 < shared["vmhwm_before_kib"] <= shared["vmhwm_after_kib"]
    assert shared["visual_tokens"] > 100
    speed = measure_speed(replace(config, repeats=2), 3)
    assert speed["outputs_equal"] and speed["repeats"] == 2
    for layout in ("copy", "shared"):
        assert len(speed[layout]["rounds_seconds"]) == 2 and speed[layout]["decode_tokens_per_s"] > 0
        assert speed[layout]["generated_tokens"] == 3 * 4


def test_prefix_memory_flags() -> None:
    args = benchmark.build_parser().parse_args(["prefix-memory", "--questions", "10", "50", "--full-length"])
    config = config_from_args(PrefixMemoryBenchConfig, args)
    assert config.questions == (10, 50) and config.full_length and config.num_frames == 128
