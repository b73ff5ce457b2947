"""PipelineConfig refuses nonsensical values when it is built (before Ray starts or a model loads), with
the flag's name and what is allowed; the jobs report them as exit 2 and one JSON line."""

from __future__ import annotations

import json
import math
import re

import pytest

from jobs import caption
from pipeline.config import MAX_FRAMES, MIN_PIXELS, PipelineConfig


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"fps": math.nan}, "fps must be a finite number > 0"),
        ({"fps": math.inf}, "fps must be a finite number > 0"),
        ({"fps": 0.0}, "fps must be a finite number > 0"),
        ({"num_gpus": math.nan}, "num_gpus must be a finite number >= 0"),
        ({"num_gpus": -math.inf}, "num_gpus must be a finite number >= 0"),
        ({"num_gpus": 1.5}, "num_gpus must be a fraction <= 1 or a whole number of GPUs"),
        (
            {"max_pixels": 1},
            f"max_pixels must be an integer >= {MIN_PIXELS} (28*28, one vision patch), got 1",
        ),
        ({"max_pixels": MIN_PIXELS - 1}, f"max_pixels must be an integer >= {MIN_PIXELS}"),
        ({"num_frames": MAX_FRAMES + 1}, "num_frames must be an integer <= 10,000"),
        ({"num_frames": 0}, "num_frames must be an integer >= 1, got 0"),
        ({"segment_videos": 0}, "segment_videos must be an integer >= 1, got 0"),
        ({"input": "  "}, "input must be a path or URI"),
    ],
)
def test_nonsensical_values_are_refused_with_the_flag_and_what_is_allowed(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PipelineConfig(**fields)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0.7, "fps": 2.0, "num_gpus": 0.25},
        {"num_gpus": 2.0, "max_pixels": MIN_PIXELS, "num_frames": MAX_FRAMES},
        {"num_gpus": 0, "temperature": 0},
    ],
)
def test_sensible_edges_are_accepted(fields: dict) -> None:
    assert PipelineConfig(**fields) == PipelineConfig(**fields)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--temperature", "nan"], "temperature must be a finite number >= 0 (0: greedy), got nan"),
        (["--fps", "inf"], "fps must be a finite number > 0, got inf"),
        (["--num-gpus", "NaN"], "num_gpus must be a finite number >= 0, got nan"),
        (
            ["--max-pixels", "1"],
            f"max_pixels must be an integer >= {MIN_PIXELS} (28*28, one vision patch), got 1",
        ),
    ],
)
def test_the_job_refuses_them_at_parse_time(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert caption.main(argv) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {
        "status": "error",
        "error": message,
    }


def test_decoder_flags_reach_the_decoders_config() -> None:
    """--decoder (auto by default), --gamma, --sparse-budget and --static-steps become the StdConfig the
    actors build their decoder from."""
    from jobs._cli import build_parser, config_from_args

    assert PipelineConfig().std_config().mode == "auto"
    assert PipelineConfig().std_config().static_steps_on("cpu") == "off"
    parser = build_parser(PipelineConfig, "caption", "test")
    argv = ["--decoder", "std", "--gamma", "4", "--sparse-budget", "256", "--static-steps", "eager"]
    config = config_from_args(PipelineConfig, parser.parse_args(argv))
    std = config.std_config()
    assert (std.mode, std.gamma, std.sparse_budget, std.static_steps) == ("std", 4, 256, "eager")
    with pytest.raises(SystemExit):
        parser.parse_args(["--static-steps", "fast"])
