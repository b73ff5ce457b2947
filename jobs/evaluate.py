"""Offline evaluation: run StD and dense decoding on the same rows of a manifest with answers.

    python -m jobs.evaluate                                  # the sample videos' MCQ items → ./out/eval
    python -m jobs.evaluate --input eval.jsonl --task mcq --output ./eval --dtype bfloat16

Every row is decoded with StD and again densely on the same actor, from the same processor inputs.
The report (accuracy per decoder, the StD/dense exact-match rate with the logit margin at each
divergence, acceptance, speedup) is written to <output>/_evaluation.json and printed as the last
stdout line (one JSON object).
"""

from __future__ import annotations

import sys

import pyarrow.compute as pc

from jobs._cli import build_parser, config_from_args, run_main
from pipeline.evaluation import evaluation_report
from pipeline.run import run_pipeline, storage_options
from pipeline.sink import read_rows, write_json
from pipeline.storage import join

FIXED = {"decoder": "std", "dense_sample": -1}
DEFAULTS = {"task": "mcq", "output": "./out/eval", "if_exists": "overwrite"}


def evaluate(argv: list[str] | None = None) -> dict:
    parser = build_parser("python -m jobs.evaluate", __doc__.splitlines()[0], fixed=FIXED, defaults=DEFAULTS)
    config = config_from_args(parser.parse_args(argv), fixed=FIXED)
    summary = run_pipeline(config)
    table = read_rows(config.output, storage_options(config))
    table = table.filter(pc.equal(table["run_id"], summary["run_id"]))
    report = {"run_id": summary["run_id"], "task": config.task, "model": summary["model"]}
    report |= evaluation_report(table)
    write_json(join(config.output, "_evaluation.json"), report, storage_options(config))
    return report


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: evaluate(argv))


if __name__ == "__main__":
    sys.exit(main())
