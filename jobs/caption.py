"""Caption (or answer questions about) a video dataset with StD, into Parquet.

    python -m jobs.caption                                   # embedded default: sample videos → ./out
    python -m jobs.caption --input s3://bucket/clips/ --output s3://bucket/captions/ --model /models/x
    python -m jobs.caption --input manifest.jsonl --task qa --output ./qa

The last stdout line is the run summary (one JSON object); it is also written to <output>/_summary.json.
"""

from __future__ import annotations

from jobs._cli import build_parser, config_from_args, exit_process, run_main
from pipeline.config import PipelineConfig
from pipeline.run import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(PipelineConfig, "python -m jobs.caption", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    return run_main(lambda: run_pipeline(config_from_args(PipelineConfig, args)), args.log_level)


if __name__ == "__main__":
    exit_process(main())
