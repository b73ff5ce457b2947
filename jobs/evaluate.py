"""Offline evaluation: run StD and dense decoding on the same rows of a manifest with answers.

    python -m jobs.evaluate              # the demo model on 100 held-out clips, all three tasks → ./out/eval
    python -m jobs.evaluate --input eval.jsonl --task mcq --model Qwen/Qwen2-VL-7B-Instruct --dtype bfloat16

Every row is decoded with StD and again densely on the same actor, from the same processor inputs.
With ``--task all`` (the default) the caption, qa and mcq tasks run one after another, each into its own
``<output>/<task>/`` folder. The report (accuracy per decoder: caption attributes, qa, mcq; the
StD/dense exact-match rate with the logit margin at each divergence; acceptance; speedup), over all rows
and per task, is written to <output>/_evaluation.json and printed as the last stdout line (one JSON
object). Without ``--input``, the clips are held-out clips of the demo model's procedural world
(``pipeline.demo_world``: seeds never used in training), with their ground-truth captions and answers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import pyarrow as pa
import pyarrow.compute as pc

from jobs._cli import build_parser, config_from_args, run_main
from pipeline.config import TASKS, PipelineConfig
from pipeline.evaluation import evaluation_report
from pipeline.run import run_pipeline, storage_options
from pipeline.sink import read_rows, write_json
from pipeline.storage import join

FIXED = {"decoder": "std", "dense_sample": -1}
DEFAULTS = {"output": "./out/eval", "if_exists": "overwrite", "num_samples": 100}
ALL = "all"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed flags and the tasks they select (``--task all``: caption, qa and mcq)."""
    parser = build_parser(
        "python -m jobs.evaluate", __doc__.splitlines()[0], fixed={**FIXED, "task": None}, defaults=DEFAULTS
    )
    parser.add_argument(
        "--task",
        choices=(ALL, *TASKS),
        default=ALL,
        help="Which task to evaluate; all: caption, qa and mcq in turn, each into <output>/<task>/.",
    )
    args = parser.parse_args(argv)
    return args, list(TASKS) if args.task == ALL else [args.task]


def run_task(config: PipelineConfig) -> tuple[dict, pa.Table]:
    """Run one task's pipeline; return its summary and the rows of that run."""
    summary = run_pipeline(config)
    table = read_rows(config.output, storage_options(config))
    return summary, table.filter(pc.equal(table["run_id"], summary["run_id"]))


def evaluate(argv: list[str] | None = None) -> dict:
    args, tasks = parse_args(argv)
    configs = [config_from_args(args, fixed={**FIXED, "task": task}) for task in tasks]
    if len(tasks) > 1:  # one output folder per task, so each task's --if-exists applies to its own rows
        configs = [dataclasses.replace(c, output=join(c.output, c.task)) for c in configs]
    report: dict = {"tasks": tasks}
    per_task, tables = {}, []
    for config in configs:
        summary, table = run_task(config)
        report["model"] = summary["model"]
        per_task[config.task] = {"run_id": summary["run_id"], **evaluation_report(table)}
        tables.append(table)
    if len(tasks) == 1:
        report |= per_task[tasks[0]]
    else:
        report |= evaluation_report(pa.concat_tables(tables)) | {"per_task": per_task}
    write_json(join(args.output, "_evaluation.json"), report, storage_options(configs[0]))
    return report


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: evaluate(argv))


if __name__ == "__main__":
    sys.exit(main())
