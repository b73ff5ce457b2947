"""Scheduled, incremental annotation: process only the inputs that have no ``ok`` row in the output.

Run it on a schedule (cron, Airflow, ...) over a growing prefix or manifest. Every run lists the inputs,
skips each item that already has an ``ok`` row in ``--output``, and annotates the rest (new videos, and
items whose earlier attempts failed). A crashed or killed run loses at most its uncommitted rows; the
next run picks them up. Running it twice in a row does nothing the second time.

    python -m jobs.annotate --input s3://bucket/incoming/ --output s3://bucket/annotations/ --limit 5000

The last stdout line is the run summary (one JSON object).
"""

from __future__ import annotations

from jobs._cli import build_parser, config_from_args, exit_process, run_main
from pipeline.config import PipelineConfig
from pipeline.run import run_pipeline

FIXED = {"if_exists": "resume"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(PipelineConfig, "python -m jobs.annotate", __doc__.splitlines()[0], fixed=FIXED)
    args = parser.parse_args(argv)
    return run_main(lambda: run_pipeline(config_from_args(PipelineConfig, args, fixed=FIXED)), args.log_level)


if __name__ == "__main__":
    exit_process(main())
