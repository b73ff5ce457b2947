"""The decoder benchmark on a tiny configuration: its records, its invariants, and the job's JSON line.

No timing is asserted (timings on a shared CPU are noise at this size): the tests check that every
variant ran on the same inputs and produced the same tokens (fp32 on CPU, where StD is exact), that the
fields a reader relies on are present, positive and consistent, and that the sweep files are written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing

import pytest
import torch

from jobs import benchmark
from jobs._cli import config_from_args
from pipeline.bench.decoder import BenchModel, DecoderCase, run_case
from pipeline.bench.measure import DEFAULT_VARIANTS
from pipeline.bench.presets import PRESETS, build_model
from pipeline.bench.projection import alpha_for_acceptance
from pipeline.bench.records import DecoderRecord
from pipeline.bench.report import cross_project, markdown_table, read_csv
from pipeline.bench.runner import (
    SWEEP_BATCHES,
    SWEEP_FRAMES,
    SWEEP_VISUAL_TOKENS,
    DecoderBenchConfig,
    PresetName,
    Variant,
)

TINY = ["--visual-tokens", "192", "--batch", "1", "2", "--max-new-tokens", "8", "--repeats", "1",
        "--budget", "48", "--gamma", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def record() -> dict:
    torch.manual_seed(0)
    model = build_model(PRESETS["kv-bound"], init_std=0.5)  # varied tokens: some drafts rejected
    case = DecoderCase(
        batch=2,
        visual_tokens=192,
        gamma=3,
        sparse_budget=48,
        max_new_tokens=10,
        repeats=2,
        padding=3,
        variants=(*DEFAULT_VARIANTS, "std_sink"),
    )
    return dataclasses.asdict(run_case(BenchModel(model, "kv-bound"), case))


def test_every_variant_produced_the_dense_tokens(record: dict) -> None:
    assert record["outputs_equal"] is True and record["mismatched_variants"] == ""
    assert record["new_tokens"] == 10 and record["batch"] == 2 and record["visual_tokens"] == 192


def test_times_and_ratios_are_positive(record: dict) -> None:
    for variant in ("dense", "std", "std_sink", "auto", "hf", "hf_gqa"):
        assert record[f"{variant}_ms_per_token"] > 0
        assert record[f"{variant}_e2e_ms"] > record[f"{variant}_ms_per_token"]
        assert record[f"{variant}_peak_mb"] > 0
    for key in ("decode_speedup", "e2e_speedup", "auto_decode_speedup", "speedup_vs_hf", "speedup_vs_hf_gqa",
                "draft_step_ratio", "verify_step_ratio", "projected_decode_speedup", "projected_e2e_speedup",
                "achieved_gbps", "prefill_ms", "dense_cache_mb", "sparse_cache_mb"):  # fmt: skip
        assert record[key] > 0, key
    assert record["sparse_cache_mb"] < record["dense_cache_mb"]
    assert math.isclose(
        record["draft_share"] + record["verify_share"] + record["other_share"], 1.0, rel_tol=0.05
    )


def test_acceptance_and_projection_fields(record: dict) -> None:
    assert 0 <= record["acceptance_rate"] <= 1
    assert 1 <= record["mean_accepted_per_round"] <= record["gamma"] + 1
    assert record["kept_prompt_tokens"] == 48
    assert record["projected_alpha"] == pytest.approx(alpha_for_acceptance(0.62, 9))
    assert 0 <= record["projected_best_gamma"] <= record["gamma"]
    assert record["memory_kind"] == "process_peak_rss" and record["peak_gbps"] is None
    assert set(record) == {f.name for f in dataclasses.fields(DecoderRecord)}
    json.dumps(record)


def test_cross_projection_recomputes_the_records_own_projection(record: dict) -> None:
    again = cross_project(record, record["projected_alpha"])
    assert again.decode_speedup == pytest.approx(record["projected_decode_speedup"])
    assert again.e2e_speedup == pytest.approx(record["projected_e2e_speedup"])


def test_markdown_table_has_one_row_per_record(record: dict) -> None:
    table = markdown_table([record, {**record, "std_ms_per_token": None}])
    assert len(table.strip().splitlines()) == 4 and "–" in table


def test_checkpoint_on_demo_world_clips_runs_the_vision_tower_once(model_dir) -> None:
    from pipeline.models import load_model

    model, processor = load_model(str(model_dir), "float32", "cpu")
    case = DecoderCase(batch=2, frames=16, gamma=3, sparse_budget=24, max_new_tokens=6, repeats=1)
    record = dataclasses.asdict(run_case(BenchModel(model, "tiny", processor), case))
    assert record["inputs"] == "demo_world@16f" and record["visual_tokens"] == 16 // 2 * 36
    assert record["vision_ms"] > 0 and record["outputs_equal"] is True
    assert record["std_ms_per_token"] > 0 and record["hf_ms_per_token"] > 0


def test_sink_window_draft_is_measured_beside_the_text_guided_one(record: dict) -> None:
    """The paper's comparison: the same budget, filled with attention sinks plus the most recent tokens."""
    assert 0 <= record["sink_acceptance_rate"] <= 1 and record["sink_mean_accepted_per_round"] >= 1
    assert record["sink_decode_speedup"] > 0
    assert "std_sink" not in DecoderCase(batch=1, visual_tokens=64).variants  # opt-in: --variants


def test_decoder_case_rejects_ambiguous_sizes() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        DecoderCase(batch=1, visual_tokens=64, frames=32)
    with pytest.raises(ValueError, match="dense"):
        DecoderCase(batch=1, visual_tokens=64, variants=("std",))


def test_job_prints_one_json_line_and_writes_the_sweep(tmp_path, capsys: pytest.CaptureFixture) -> None:
    code = benchmark.main(
        ["decoder", *TINY, "--sweep", "--out", str(tmp_path), "--variants", "std", "dense", "auto"]
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["status"] == "ok" and out["outputs_equal"] is True
    assert [(r["visual_tokens"], r["batch"]) for r in out["records"]] == [(192, 1), (192, 2)]
    assert out["records"][0]["hf_ms_per_token"] is None
    rows = read_csv(out["files"]["csv"])
    assert len(rows) == 2 and rows[1]["batch"] == "2"
    assert (tmp_path / "decoder-kv-bound-cpu.png").stat().st_size > 1000
    assert "| visual tokens |" in (tmp_path / "decoder-kv-bound-cpu.md").read_text()


def test_job_costs_from_projects_another_runs_costs(tmp_path, capsys: pytest.CaptureFixture) -> None:
    benchmark.main(["decoder", *TINY, "--sweep", "--out", str(tmp_path), "--variants", "std", "dense"])
    csv_path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"]["csv"]
    benchmark.main(["decoder", *TINY, "--variants", "std", "dense", "--costs-from", csv_path])
    cross = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cross_projection"]
    assert 0 <= cross["alpha"] <= 1 and len(cross["rows"]) == 2
    assert all(row["projected_decode_speedup"] > 0 for row in cross["rows"])


def test_job_reports_a_bad_flag_as_an_error_line(capsys: pytest.CaptureFixture) -> None:
    assert benchmark.main(["decoder", "--acceptance", "1.5"]) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "error"


def _decoder_config(*argv: str) -> DecoderBenchConfig:
    return config_from_args(DecoderBenchConfig, benchmark.build_parser().parse_args(["decoder", *argv]))


def test_decoder_flags_keep_their_names_defaults_and_meaning() -> None:
    """The flags of the hand-written parser this one replaced, mapped to the same config values."""
    assert _decoder_config() == DecoderBenchConfig()
    one = _decoder_config("--budget", "256", "--batch", "1", "8", "--visual-tokens", "1024", "4096")
    assert (one.sparse_budget, one.batches, one.visual_tokens, one.frames) == (
        256,
        (1, 8),
        (1024, 4096),
        (64,),
    )
    assert (one.preset, one.gamma, one.max_new_tokens, one.repeats, one.padding) == ("kv-bound", 9, 64, 3, 0)
    assert (one.dtype, one.device, one.threads, one.acceptance_profile) == ("auto", "auto", 1, 0.62)
    assert one.variants == DEFAULT_VARIANTS and (one.sweep, one.out, one.seed) == (False, "bench-out", 0)
    assert DecoderBenchConfig().visual_tokens == (4096,) and DecoderBenchConfig().batches == (1,)
    sweep = _decoder_config("--sweep")  # the sweep's grid where the sizes are not given
    assert (sweep.visual_tokens, sweep.frames, sweep.batches) == (
        SWEEP_VISUAL_TOKENS,
        SWEEP_FRAMES,
        SWEEP_BATCHES,
    )
    assert _decoder_config("--sweep", "--batch", "2").batches == (2,)
    every = _decoder_config(
        "--preset", "qwen2-vl-7b", "--model", "m", "--layers", "2", "--frames", "32", "--gamma", "4",
        "--max-new-tokens", "8", "--repeats", "1", "--padding", "3", "--dtype", "float32", "--device", "cpu",
        "--threads", "2", "--variants", "std", "dense", "--acceptance", "0.5", "--out", "o",
        "--costs-from", "c.csv", "--seed", "1", "--init-std", "0.5", "--name", "n",
    )  # fmt: skip
    assert every == DecoderBenchConfig(
        preset="qwen2-vl-7b", model="m", layers=2, frames=(32,), gamma=4, max_new_tokens=8, repeats=1,
        padding=3, dtype="float32", device="cpu", threads=2, variants=("std", "dense"), acceptance_profile=0.5,
        out="o", costs_from="c.csv", seed=1, init_std=0.5, name="n",
    )  # fmt: skip
    assert typing.get_args(PresetName) == tuple(PRESETS)
    assert set(typing.get_args(Variant)) >= set(DEFAULT_VARIANTS) | {"std_sink"}


@pytest.mark.parametrize(
    "argv", [["--variants", "fast"], ["--dtype", "int8"], ["--device", "tpu"], ["--preset", "gpt-9"]]
)
def test_decoder_flag_choices_fail_in_argparse(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _decoder_config(*argv)
    assert exit_info.value.code == 2


def test_fixed_gammas_are_timed_and_auto_is_compared_with_the_best_of_them() -> None:
    torch.manual_seed(0)
    model = build_model(PRESETS["kv-bound"], init_std=0.5)
    case = DecoderCase(
        batch=2, visual_tokens=192, gamma=3, sparse_budget=48, max_new_tokens=8, repeats=2,
        variants=("std", "dense", "auto"), fixed_gammas=(1, 2, 3),
    )  # fmt: skip
    assert case.timed_variants == ("std", "dense", "auto", "std_g1", "std_g2")  # γ = 3 is std itself
    record = dataclasses.asdict(run_case(BenchModel(model, "kv-bound"), case))
    assert record["outputs_equal"] is True
    timed = dict(item.split(":") for item in record["fixed_gamma_ms_per_token"].split())
    assert sorted(int(g) for g in timed) == [1, 2, 3] and all(float(ms) > 0 for ms in timed.values())
    assert record["best_fixed_gamma"] in (1, 2, 3) and record["best_fixed_ms_per_token"] > 0
    assert record["auto_vs_best"] > 0 and record["setup_ms"] > 0
    assert 0 < record["draft_bytes_ratio"] < 1 and record["round_overhead_ratio"] >= 0
    assert record["dense_round_overhead_ms"] >= 0 and record["auto_round_overhead_ms"] >= 0
    assert _decoder_config("--fixed-gammas", "2", "4").fixed_gammas == (2, 4)


def test_compiled_variants_are_timed_beside_the_eager_ones() -> None:
    """``--compile`` adds a ``_compiled`` twin of every std_core variant (trace-only backend here: no C++
    compiler needed); their tokens equal dense's, their step costs and compile seconds are reported."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(PRESETS["kv-bound"], init_std=0.5)
    case = DecoderCase(
        batch=2, visual_tokens=192, gamma=3, sparse_budget=48, max_new_tokens=8, repeats=1,
        variants=("std", "dense", "hf"), compile=True, compile_backend="aot_eager",
    )  # fmt: skip
    assert case.timed_variants == ("std", "dense", "hf", "std_compiled", "dense_compiled")
    try:
        record = dataclasses.asdict(run_case(BenchModel(model, "kv-bound"), case))
    finally:
        torch._dynamo.reset()
    assert record["outputs_equal"] is True, record["mismatched_variants"]
    for name in ("dense_compiled_ms_per_token", "std_compiled_ms_per_token", "compiled_dense_step_ms"):
        assert record[name] > 0, name
    for name in ("compiled_draft_step_ratio", "compiled_verify_step_ratio", "compiled_decode_speedup"):
        assert record[name] > 0, name
    assert record["auto_compiled_ms_per_token"] is None
    assert record["compile_s"] > 0 and record["timed_compiles"] == 0  # compiled in the warm-up, reported
    flags = _decoder_config("--compile", "--compile-backend", "aot_eager")
    assert (flags.compile, flags.compile_backend) == (True, "aot_eager")
    assert DecoderBenchConfig().compile is False
