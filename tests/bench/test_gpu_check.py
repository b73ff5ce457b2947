"""scripts/gpu_check.py runs its every step on CPU with the tiny preset (on a GPU it runs the 7B shape)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_on_a_tiny_preset(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    lossless = report["lossless_bf16"]
    assert lossless["status"] == "ok" and lossless["sequential_equal"] is True
    assert lossless["reference_distinct_tokens"] > 4  # varied reference tokens, not one repeated
    assert lossless["sparse_budget"] < lossless["visual_tokens"]  # a real sparse draft
    assert "parallel_equal" in lossless and 0.0 <= lossless["sequential_acceptance"] <= 1.0
    assert "compiled_sequential_equal" in lossless and lossless["compiled_sequential_compile_s"] > 0
    [case] = report["benchmark"]
    assert case["status"] == "ok" and case["records"]["outputs_equal"] is True
    assert all(r["std_compiled_ms_per_token"] > 0 and r["compile_s"] > 0 for r in case["records"]["records"])
    assert [(r["visual_tokens"], r["batch"]) for r in case["records"]["records"]] == [(512, 1), (512, 2)]
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## bf16 losslessness" in text and "| 512 | 2 |" in text


def test_the_gpu_check_refuses_a_missing_gpu_with_a_clear_step_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the refusal path does not apply")
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    report = gpu_check._step(gpu_check.environment, gpu_check.parse_args(["--out", str(tmp_path)]))
    assert report["status"] == "failed" and "no CUDA device" in report["error"]
