"""The shared flag helper (``jobs/_cli.py``) on a toy config, on every real config, and the shape of the
jobs themselves: each is a docstring and a short ``main`` that parses, makes one library call and ends
through ``run_main`` (one JSON line on stdout, everything else on stderr)."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from jobs import _cli, annotate, benchmark, caption, evaluate, train_demo_model
from jobs._cli import build_parser, config_from_args, configure_logging, run_main
from pipeline.bench.pipeline_bench import PipelineBenchConfig
from pipeline.bench.runner import DecoderBenchConfig
from pipeline.config import PipelineConfig, flag
from pipeline.demo.training import TrainConfig

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
CONFIGS = (PipelineConfig, DecoderBenchConfig, PipelineBenchConfig, TrainConfig)


@dataclass(frozen=True)
class Toy:
    count: int = flag(3, "how many")
    ratio: float = flag(0.5, "a fraction")
    verbose: bool = flag(False, "say more")
    colour: Literal["red", "green"] = flag("red", "a colour")
    sizes: tuple[int, ...] = flag((1, 2), "one or more sizes")
    limit: int | None = flag(None, "an optional bound")
    sparse_budget: int = flag(7, "a field whose flag has another name", name="budget")

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count must be >= 1")


def _toy(*argv: str, **kwargs) -> Toy:
    return config_from_args(Toy, build_parser(Toy, "toy", "a toy", **kwargs).parse_args(list(argv)))


def test_every_field_is_one_flag() -> None:
    parser = build_parser(Toy, "toy", "a toy")
    options = {a.dest: a.option_strings for a in parser._actions if a.dest not in ("help", "log_level")}
    assert options == {
        "count": ["--count"],
        "ratio": ["--ratio"],
        "verbose": ["--verbose"],
        "colour": ["--colour"],
        "sizes": ["--sizes"],
        "limit": ["--limit"],
        "sparse_budget": ["--budget"],
    }
    assert _toy() == Toy()


def test_flags_read_their_types() -> None:
    toy = _toy("--count", "4", "--ratio", "0.25", "--verbose", "--colour", "green", "--sizes", "3", "4", "5",
               "--limit", "9", "--budget", "11")  # fmt: skip
    assert toy == Toy(4, 0.25, True, "green", (3, 4, 5), 9, 11)
    assert isinstance(toy.sizes, tuple) and isinstance(toy.ratio, float)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--colour", "blue"], "invalid choice: 'blue'"),
        (["--count", "many"], "invalid int value: 'many'"),
        (["--sizes"], "expected at least one argument"),
        (["--log-level", "loud"], "invalid choice: 'loud'"),
    ],
)
def test_bad_values_fail_in_argparse(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _toy(*argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_fixed_fields_have_no_flag_and_defaults_can_change(capsys) -> None:
    parser = build_parser(Toy, "toy", "a toy", fixed={"count": 5}, defaults={"ratio": 0.75})
    with pytest.raises(SystemExit):
        parser.parse_args(["--count", "2"])
    assert "unrecognized arguments: --count" in capsys.readouterr().err
    assert config_from_args(Toy, parser.parse_args([]), fixed={"count": 5}) == Toy(count=5, ratio=0.75)


def test_a_field_type_without_a_flag_is_refused() -> None:
    @dataclass(frozen=True)
    class Odd:
        table: dict = flag(None, "no flag for this")

    with pytest.raises(TypeError, match="no flag"):
        build_parser(Odd, "odd", "odd")


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_every_real_config_field_is_a_documented_flag(config_cls: type) -> None:
    parser = build_parser(config_cls, "x", "x")
    dests = [a.dest for a in parser._actions if a.dest not in ("help", "log_level")]
    assert dests == [f.name for f in dataclasses.fields(config_cls)]  # one-to-one, in field order
    assert all(f.metadata.get("help") for f in dataclasses.fields(config_cls))
    assert config_from_args(config_cls, parser.parse_args([])) == config_cls()


@pytest.mark.parametrize("job", [caption, annotate, evaluate, train_demo_model])
def test_every_job_has_log_level(job, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    assert exit_info.value.code == 0 and "--log-level" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["decoder", "pipeline"])
def test_every_benchmark_has_log_level(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main([command, "--help"])
    assert exit_info.value.code == 0 and "--log-level" in capsys.readouterr().out


def test_run_main_prints_one_json_line_and_logs_to_stderr(capsys) -> None:
    def body() -> dict:
        logging.getLogger("pipeline.somewhere").info("[step] working")
        logging.getLogger("pipeline.somewhere").debug("hidden at info")
        logging.getLogger("botocore").info("third-party noise")
        logging.getLogger("pipeline.somewhere").warning("careful")
        return {"status": "ok", "n": 1}

    assert run_main(body) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [json.dumps({"status": "ok", "n": 1})]
    assert "[step] working" in err and "warning: careful" in err
    assert "hidden at info" not in err and "third-party noise" not in err

    assert run_main(lambda: (_ for _ in ()).throw(ValueError("bad value")), "debug") == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"status": "error", "error": "bad value"} and "error: bad value" in err


def test_configure_logging_installs_one_handler() -> None:
    configure_logging("debug")
    configure_logging("warning")
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, _cli._StderrHandler)]
    assert len(handlers) == 1
    assert logging.getLogger("pipeline").level == logging.WARNING
    configure_logging("info")


def _code_lines(path: Path) -> tuple[ast.Module, int]:
    """The module, and its lines that are code (docstring, comments and blank lines left out)."""
    source = path.read_text()
    tree = ast.parse(source)
    start = tree.body[0].end_lineno if isinstance(tree.body[0], ast.Expr) else 0
    lines = [ln.strip() for ln in source.splitlines()[start:]]
    return tree, sum(1 for ln in lines if ln and not ln.startswith("#"))


@pytest.mark.parametrize("name", ["annotate", "benchmark", "caption", "evaluate", "train_demo_model"])
def test_jobs_are_thin(name: str) -> None:
    tree, code = _code_lines(JOBS_DIR / f"{name}.py")
    assert ast.get_docstring(tree) and code <= 40, code
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(functions) <= {"main", "build_parser"}
    calls = [n.func for n in ast.walk(functions["main"]) if isinstance(n, ast.Call)]
    assert [c.id for c in calls if isinstance(c, ast.Name) and c.id == "run_main"] == ["run_main"]
    assert len(functions["main"].body) <= 8
