"""The one-command GPU check: bf16 losslessness and the 7B-shape decoder benchmark, in one run.

    .venv/bin/python scripts/gpu_check.py --out gpu-check                   # on a lent GPU (≤ 8 minutes)
    .venv/bin/python scripts/gpu_check.py --tiny --device cpu --out /tmp/g  # the same steps, tiny (tests)

Steps, each recorded in ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` as it finishes (a step that
fails or runs out of time is recorded as such, and the next one still runs):

1. ``environment``: torch, transformers, the device and its memory.
2. ``lossless_bf16``: a random-weight model of the preset's shape (weights at std 0.5, so tokens vary),
   bf16, synthetic visual tokens: StD with ``verify="sequential"`` must equal ``model.generate`` token for
   token; with ``verify="parallel"`` every divergence is reported with the dense logit margin there
   (``std_core.first_divergence``), which must be a near-tie.
   The same sequential check runs again with compiled static steps (``static_steps="compile"``: CUDA
   graphs over inductor on CUDA; the trace-only ``aot_eager`` backend on CPU), ``compiled_sequential_equal``.
3. ``benchmark``: ``python -m jobs.benchmark decoder --compile`` on the preset at each visual-token
   count × batch (dense, StD, auto and plain ``generate``; the std_core ones eager and compiled, side
   by side, with the seconds spent compiling).

Exit status: 0 when every step ran and the sequential check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer kv-bound model and small inputs")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> dict:
    """What the check runs: the preset, the losslessness case and the benchmark grid."""
    if args.tiny:
        return {"preset": "kv-bound", "layers": 2, "lossless": {"visual_tokens": 256, "batch": 2, "new": 16},
                "bench": [([512], [1, 2])], "bench_new_tokens": 8, "repeats": 1}  # fmt: skip
    return {"preset": "qwen2-vl-7b", "layers": None, "lossless": {"visual_tokens": 4096, "batch": 4, "new": 64},
            "bench": [([16384], [1, 8]), ([65536], [1, 8])], "bench_new_tokens": 64, "repeats": 2}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args)}
    steps = plan(args)
    report["environment"] = _step(environment, args)
    _write(out, report)
    report["lossless_bf16"] = _step(lossless_bf16, args, steps)
    _write(out, report)
    report["benchmark"] = []
    for tokens, batches in steps["bench"]:
        left = deadline - time.monotonic()
        if left < 30:
            report["benchmark"].append(
                {"visual_tokens": tokens, "batches": batches, "status": "no time left"}
            )
            continue
        report["benchmark"].append(_step(benchmark, args, steps, tokens, batches, left - 10))
        _write(out, report)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write(out, report)
    lossless = report["lossless_bf16"]
    ok = lossless.get("status") == "ok" and lossless.get("sequential_equal") is True
    ok = ok and all(case.get("status") == "ok" for case in report["benchmark"])
    return 0 if ok else 1


def _step(fn, *args: object) -> dict:
    started = time.monotonic()
    try:
        result = fn(*args) | {"status": "ok"}
    except Exception as exc:  # recorded, and the next step still runs
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    return result | {"seconds": round(time.monotonic() - started, 2)}


def environment(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": args.device}  # fmt: skip
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: run with --device cpu --tiny to test the script")
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                 "cuda": torch.version.cuda}  # fmt: skip
    return info


def lossless_bf16(args: argparse.Namespace, steps: dict) -> dict:
    import torch

    from pipeline.bench.inputs import SyntheticSpec, synthetic_inputs
    from pipeline.bench.presets import build_model, get_preset
    from std_core import SparseToDenseDecoder, StdConfig, first_divergence

    preset = get_preset(steps["preset"])
    if steps["layers"]:
        preset = preset.shrink(layers=steps["layers"])
    case = steps["lossless"]
    positions = case["visual_tokens"] + case["new"] + 256
    model = build_model(preset, torch.bfloat16, args.device, max_positions=positions, init_std=0.5, seed=0)
    spec = SyntheticSpec(visual_tokens=case["visual_tokens"], batch=case["batch"], seed=0)
    inputs = synthetic_inputs(model, spec)
    new = case["new"]
    dense = model.generate(**_fresh(inputs), max_new_tokens=new, do_sample=False)
    result: dict = {"visual_tokens": case["visual_tokens"], "batch": case["batch"], "new_tokens": new,
                    "sparse_budget": min(1024, case["visual_tokens"] // 4)}  # fmt: skip
    generated = dense[:, inputs["input_ids"].shape[1] :]
    result["reference_distinct_tokens"] = int(torch.unique(generated).numel())  # varied, not one repeated
    backend = _compile_backend(args)
    for name, verify, static in (
        ("sequential", "sequential", "off"),
        ("parallel", "parallel", "off"),
        ("compiled_sequential", "sequential", "compile"),
    ):
        budget = min(1024, case["visual_tokens"] // 4)  # below the prompt: the draft is really sparse
        config = StdConfig(
            gamma=9, sparse_budget=budget, verify=verify, static_steps=static, compile_backend=backend
        )
        std = SparseToDenseDecoder(model, config).generate(**_fresh(inputs), max_new_tokens=new)
        equal = bool(torch.equal(std.sequences, dense))
        result[f"{name}_equal"] = equal
        result[f"{name}_acceptance"] = std.stats.summary().get("acceptance_rate")
        if static != "off":
            result[f"{name}_compile_s"] = round(std.stats.compile_seconds, 2)
        if not equal:
            found = first_divergence(model, _fresh(inputs), std.sequences, dense)
            result[f"{name}_divergences"] = [
                None if d is None else {"row": d.row, "position": d.position, "margin": round(d.margin, 4)}
                for d in found
            ]
    return result


def _compile_backend(args: argparse.Namespace) -> str:
    """inductor (+ CUDA graphs) on CUDA; on CPU the trace-only backend (no C++ compiler needed)."""
    return "inductor" if args.device == "cuda" else "aot_eager"


def _fresh(inputs: dict) -> dict:
    from pipeline.bench.inputs import fresh

    return fresh(inputs)


def benchmark(
    args: argparse.Namespace, steps: dict, tokens: list[int], batches: list[int], timeout: float
) -> dict:
    command = [sys.executable, "-m", "jobs.benchmark", "decoder", "--preset", steps["preset"],
               "--visual-tokens", *map(str, tokens), "--batch", *map(str, batches),
               "--variants", "dense", "std", "auto", "hf", "--device", args.device,
               "--max-new-tokens", str(steps["bench_new_tokens"]), "--repeats", str(steps["repeats"]),
               "--compile", "--compile-backend", _compile_backend(args)]  # fmt: skip
    if steps["layers"]:
        command += ["--layers", str(steps["layers"])]
    if args.device == "cuda":
        command += ["--dtype", "bfloat16"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-1500:]}")
    records = json.loads(done.stdout.strip().splitlines()[-1])
    return {"visual_tokens": tokens, "batches": batches, "command": " ".join(command[1:]), "records": records}


TABLE = ("visual_tokens", "batch", "dense_ms_per_token", "std_ms_per_token", "auto_ms_per_token",
         "hf_ms_per_token", "dense_compiled_ms_per_token", "std_compiled_ms_per_token",
         "auto_compiled_ms_per_token", "decode_speedup", "compiled_decode_speedup", "auto_decode_speedup",
         "compile_s", "outputs_equal")  # fmt: skip


def _write(out: Path, report: dict) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def markdown(report: dict) -> str:
    lines = ["# GPU check", "", f"Started {report['started']}.", ""]
    env = report.get("environment", {})
    lines += ["## Environment", "", *(f"- {k}: {v}" for k, v in env.items()), ""]
    lossless = report.get("lossless_bf16")
    if lossless:
        lines += ["## bf16 losslessness", "", *(f"- {k}: {v}" for k, v in lossless.items()), ""]
    for case in report.get("benchmark", []):
        lines += [
            f"## Benchmark: {case.get('visual_tokens')} visual tokens × batch {case.get('batches')}",
            "",
        ]
        if case.get("status") != "ok":
            lines += [f"- {case.get('status')}: {case.get('error', '')}", ""]
            continue
        lines += [
            f"`python {case['command']}`",
            "",
            "| " + " | ".join(TABLE) + " |",
            "|" + "---|" * len(TABLE),
        ]
        lines += ["| " + " | ".join(str(r.get(k)) for k in TABLE) + " |" for r in case["records"]["records"]]
        lines += ["", f"All outputs equal: {case['records'].get('outputs_equal')}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
