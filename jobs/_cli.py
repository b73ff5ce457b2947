"""The flags of every job, generated from a frozen config dataclass, and the way a job ends.

Each field of a config class (``PipelineConfig``, ``DecoderBenchConfig``, ``PipelineBenchConfig``,
``TrainConfig``) is one ``--flag``, from the field's metadata (``pipeline.config.flag``): its help text
and its name (the field's, underscores as dashes, unless the metadata names it). The field's type gives
the rest, so an unknown value fails in argparse, before anything runs:

- ``int`` / ``float`` / ``str`` (or ``X | None``): a value of that type;
- ``Literal[...]``: one of its values (``choices``);
- ``bool``: a switch (``store_true``);
- ``tuple[X, ...]``: one or more values (``nargs="+"``), handed to the config as a tuple.

A job may hide fields (``fixed``: values it sets itself) or change defaults. Every parser also has
``--log-level``; :func:`run_main` configures logging from it, runs the job's one library call and prints
its result as the last stdout line (one JSON object). Everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NoReturn

from pipeline.errors import PipelineError, RunInterrupted, sigterm_raises

LOG_LEVELS = ("debug", "info", "warning", "error")
PROJECT_LOGGERS = ("jobs", "pipeline", "std_core")  # at --log-level; other libraries: warnings and up
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """How one config field reads from the command line."""

    type: Callable[[str], Any]
    choices: tuple | None = None
    nargs: str | None = None  # "+": a tuple field
    switch: bool = False  # a bool field


def flag_spec(hint: Any) -> FlagSpec:
    """The argparse shape of a field's type (see the module docstring); TypeError for anything else."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"a flag's type is one type or that type | None, got {hint!r}")
        return flag_spec(inner[0])
    if hint is bool:
        return FlagSpec(type=bool, switch=True)
    if hint in (int, float, str):
        return FlagSpec(type=hint)
    if typing.get_origin(hint) is Literal:
        return FlagSpec(type=type(args[0]), choices=args)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        item = flag_spec(args[0])
        if item.switch or item.nargs:
            raise TypeError(f"tuple flags hold scalars, got {hint!r}")
        return dataclasses.replace(item, nargs="+")
    raise TypeError(f"no flag for a field of type {hint!r}")


def flag_name(field: dataclasses.Field) -> str:
    """``--budget`` for a field whose metadata names it, else ``--sparse-budget`` for ``sparse_budget``."""
    return "--" + field.metadata.get("flag", field.name).replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_cls: type,
    fixed: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> argparse.ArgumentParser:
    """One flag per field of the dataclass ``config_cls``, except those named in ``fixed`` (a job's own
    values: a dict's keys count); returns ``parser``."""
    hints, hidden = typing.get_type_hints(config_cls), set(fixed or ())
    for field in dataclasses.fields(config_cls):
        if field.name in hidden:
            continue
        spec = flag_spec(hints[field.name])
        default = (defaults or {}).get(field.name, field.default)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": default,
            "help": field.metadata.get("help", ""),
        }
        if spec.switch:
            action = "store_true" if not default else argparse.BooleanOptionalAction
            parser.add_argument(flag_name(field), action=action, **kwargs)
            continue
        metavar = None if spec.choices else flag_name(field)[2:].replace("-", "_").upper()
        parser.add_argument(
            flag_name(field),
            type=spec.type,
            choices=spec.choices,
            nargs=spec.nargs,
            metavar=metavar,
            **kwargs,
        )
    return parser


def add_log_level(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="Messages on stderr at this level and above (stdout only ever holds the final JSON line).",
    )
    return parser


def build_parser(
    config_cls: type,
    prog: str,
    description: str,
    fixed: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> argparse.ArgumentParser:
    """A parser with one flag per field of ``config_cls`` (except ``fixed``), plus ``--log-level``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    return add_log_level(add_config_flags(parser, config_cls, fixed, defaults))


def build_command_parser(
    prog: str, description: str, commands: Mapping[str, tuple[type, str]]
) -> argparse.ArgumentParser:
    """A parser of subcommands, ``{name: (config class, help)}``; the chosen name is ``args.command``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (config_cls, help_text) in commands.items():
        command = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_log_level(add_config_flags(command, config_cls))
    return parser


def config_from_args(
    config_cls: type, args: argparse.Namespace, fixed: Mapping[str, Any] | None = None
) -> Any:
    """The ``config_cls`` of parsed flags plus a job's fixed values (its ``__post_init__`` may raise
    ValueError). Fields without a flag in ``args`` keep their defaults; lists of ``nargs`` flags
    become tuples."""
    values = {
        f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
        for f in dataclasses.fields(config_cls)
        if hasattr(args, f.name)
    }
    return config_cls(**{**values, **(fixed or {})})


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler sets it; the property always reads sys.stderr
        pass


class _Formatter(logging.Formatter):
    """The bare message; ``warning: `` / ``error: `` in front of those."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure_logging(level: str = "info") -> None:
    """One stderr handler on the root logger; this project's loggers at ``level``, other libraries at
    warning (or ``level``, if higher). Calling it again replaces the handler, never adds a second."""
    numeric = getattr(logging, level.upper())
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(max(numeric, logging.WARNING))
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(numeric)


EXIT_OK, EXIT_INCOMPLETE, EXIT_ERROR, EXIT_FAILED = 0, 1, 2, 3


def run_main(body: Callable[[], dict], log_level: str = "info") -> int:
    """Configure logging, run a job's body; print its result as the last stdout line (one JSON object).

    While the body runs, anything written to ``sys.stdout`` (Ray's own messages, a library's prints)
    goes to stderr, so stdout holds exactly the final JSON line. Exit codes:

    - 0: done (``"status": "ok"``, or ``"planned"`` for ``--dry-run``); 1: finished with fewer rows
      than items (``"incomplete"``);
    - 2: the run could not start (a PipelineError or an invalid value: ``"error"``, reason on stderr);
    - 3: the run failed while running (``"failed"``: what was committed stays, ``error`` says why);
    - 128 + the signal's number (130 for SIGINT / Ctrl-C, 143 for SIGTERM): ``"interrupted"``, with
      the rows received so far committed and the summary written."""
    configure_logging(log_level)
    try:
        with contextlib.redirect_stdout(sys.stderr), sigterm_raises():
            result = body()
    except (PipelineError, ValueError) as exc:
        log.error("%s", exc)
        return _finish({"status": "error", "error": str(exc)}, EXIT_ERROR)
    except (KeyboardInterrupt, RunInterrupted) as exc:
        name = exc.signal_name if isinstance(exc, RunInterrupted) else "SIGINT"
        log.warning("interrupted by %s before any row was written", name)
        return _finish({"status": "interrupted", "signal": name}, 128 + signal.Signals[name].value)
    except Exception as exc:  # a bug or an environment fault: the traceback on stderr, the JSON line still
        log.exception("the job failed")
        return _finish({"status": "failed", "error": f"{type(exc).__name__}: {exc}"}, EXIT_FAILED)
    status = result.get("status", "ok")
    if status == "interrupted":
        return _finish(result, 128 + signal.Signals[result.get("signal", "SIGINT")].value)
    codes = {"ok": EXIT_OK, "planned": EXIT_OK, "incomplete": EXIT_INCOMPLETE, "failed": EXIT_FAILED}
    return _finish(result, codes.get(status, EXIT_INCOMPLETE))


def _finish(result: dict, code: int) -> int:
    print(json.dumps(result, default=str), flush=True)
    return code


def exit_process(code: int) -> NoReturn:
    """End a job's process with ``code`` once :func:`run_main` has printed the JSON line (and the run
    has committed its rows, written its summary and released its lease).

    Ray is shut down here (it stops a local cluster the job started), the log handlers and both
    streams are flushed, and the process ends with ``os._exit``: no interpreter finalisation, in which a
    native library's thread can abort the process after a finished run (CI saw a run that had written
    its summary exit with SIGABRT, "terminate called without an active exception"), and a scheduler
    would then see a failure. Whatever Ray prints while it shuts down (a worker's last lines, relayed
    late) goes to stderr, so the JSON line stays the last line of stdout."""
    sys.stdout.flush()
    sys.stdout = sys.stderr
    ray = sys.modules.get("ray")
    try:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
    finally:
        logging.shutdown()
        sys.__stdout__.flush()
        sys.__stderr__.flush()
        os._exit(code)
