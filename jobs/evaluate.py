"""Offline evaluation: run StD and dense decoding on the same rows of a manifest with answers.

    python -m jobs.evaluate              # the demo model on 100 held-out clips, all three tasks → ./out/eval
    python -m jobs.evaluate --input eval.jsonl --task mcq --model Qwen/Qwen2-VL-7B-Instruct --dtype bfloat16

Every row is decoded with StD and again densely on the same actor, from the same processor inputs.
With ``--task all`` (the default) the caption, qa and mcq tasks run one after another, each into its own
``<output>/<task>/`` folder. The report (accuracy per decoder: qa, mcq, and caption attributes on the
demo's own clips; the StD/dense exact-match rate with the logit margin at each divergence; acceptance;
speedup), over all rows and per task, is written to <output>/_evaluation.json and printed as the last
stdout line (one JSON object). Without ``--input``, the clips are held-out clips of the demo model's
procedural world (``pipeline.demo.world``: seeds never used in training), with their ground-truth
captions and answers; see ``pipeline.evaluation``.

A benchmark as users hold it (``pipeline.benchmarks``), scored per group and by its own headline:

    python -m jobs.evaluate --benchmark videomme --input videomme/test-00000-of-00001.parquet \
        --video-root videomme --prompt-preset lmms-eval --model Qwen/Qwen2-VL-7B-Instruct --output out/vmme
    python -m jobs.evaluate --benchmark generic --input lvb_val.json --video-root lvb \
        --column-map id=id,video=video_path,question=question,options=option0,option1,option2,option3,\
option4,answer=correct_choice,group=duration_group --video-template "{root}/videos/{video_path}"

``--prompt-preset lmms-eval`` also makes lmms-eval's frames, pixels and token limit the defaults
(``pipeline.benchmarks.PRESET_SETTINGS``); flags given explicitly still win.
"""

from __future__ import annotations

from jobs._cli import add_config_flags, build_parser, config_from_args, exit_process, run_main
from pipeline.benchmarks import PRESET_SETTINGS, BenchmarkConfig
from pipeline.config import PipelineConfig
from pipeline.evaluation import ALL_TASKS, EVALUATION_FIXED, EVALUATION_TASKS, run_evaluation

DEFAULTS = {"output": "./out/eval", "if_exists": "overwrite", "num_samples": 100}
TASK_HELP = "Which task to evaluate; all: caption, qa and mcq in turn, each into <output>/<task>/."


def main(argv: list[str] | None = None) -> int:
    hidden = [*EVALUATION_FIXED, "task"]  # --task below selects the tasks: all of them, or one
    parser = build_parser(
        PipelineConfig, "python -m jobs.evaluate", __doc__.splitlines()[0], fixed=hidden, defaults=DEFAULTS
    )
    parser.add_argument("--task", dest="tasks", choices=EVALUATION_TASKS, default=ALL_TASKS, help=TASK_HELP)
    add_config_flags(parser.add_argument_group("benchmarks"), BenchmarkConfig)
    preset, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESET_SETTINGS.get(preset.prompt_preset, {}))  # explicit flags still win
    args = parser.parse_args(argv)
    return run_main(
        lambda: run_evaluation(
            config_from_args(PipelineConfig, args, fixed=EVALUATION_FIXED),
            args.tasks,
            benchmark=config_from_args(BenchmarkConfig, args),
        ),
        args.log_level,
    )


if __name__ == "__main__":
    exit_process(main())
