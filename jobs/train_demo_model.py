"""Train the demo Video-LLM from scratch on the procedural world (see ``pipeline.demo.training``).

    python -m jobs.train_demo_model --steps 3000 --output /tmp/demo-model
    python -m jobs.train_demo_model --final-eval-frames 8 32 --force     # retrain the committed model

The model directory (weights, processor, model card) lands in ``--output``; the last stdout line is the
run's summary (one JSON object).
"""

from __future__ import annotations

import sys

from jobs._cli import build_parser, config_from_args, exit_process, run_main
from pipeline.demo.training import TrainConfig, train_demo_model  # sets OMP_WAIT_POLICY before torch loads

PROG = "python -m jobs.train_demo_model"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(TrainConfig, PROG, __doc__.splitlines()[0]).parse_args(argv)
    command = " ".join([PROG, *argv])  # recorded in the model card
    return run_main(lambda: train_demo_model(config_from_args(TrainConfig, args), command), args.log_level)


if __name__ == "__main__":
    exit_process(main())
