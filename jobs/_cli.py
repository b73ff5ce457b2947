"""The flags every job shares, generated from :class:`pipeline.config.PipelineConfig`.

Each config field is one ``--flag`` (underscores become dashes) with the field's help text, its type,
and its allowed values as ``choices``, so an unknown value fails in argparse, before anything runs.
A job may hide fields (``fixed``: values it sets itself) or change defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable
from typing import Any

from pipeline.config import DECODERS, DTYPES, IF_EXISTS, TASKS, PipelineConfig
from pipeline.errors import PipelineError

CHOICES = {"task": TASKS, "decoder": DECODERS, "if_exists": IF_EXISTS, "dtype": DTYPES}


def build_parser(
    prog: str, description: str, fixed: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> argparse.ArgumentParser:
    """An argparse parser with one flag per PipelineConfig field, except those in ``fixed``."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(PipelineConfig)
    for field in dataclasses.fields(PipelineConfig):
        if field.name in (fixed or {}):
            continue
        default = (defaults or {}).get(field.name, field.default)
        flag = "--" + field.name.replace("_", "-")
        help_text = field.metadata.get("help", "")
        if hints[field.name] is bool:
            parser.add_argument(flag, action="store_true", default=default, help=help_text)
            continue
        parser.add_argument(
            flag,
            type=_scalar_type(hints[field.name]),
            default=default,
            choices=CHOICES.get(field.name),
            help=help_text,
            metavar=None if field.name in CHOICES else field.name.upper(),
        )
    return parser


def _scalar_type(hint: Any) -> Callable[[str], Any]:
    """``int`` for ``int | None``, ``float`` for ``float``, ``str`` for strings and Literals."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    return base if base in (int, float) else str


def config_from_args(args: argparse.Namespace, fixed: dict[str, Any] | None = None) -> PipelineConfig:
    """The PipelineConfig of parsed flags plus a job's fixed values (ValueError if invalid)."""
    values = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(PipelineConfig) if hasattr(args, f.name)
    }
    return PipelineConfig(**{**values, **(fixed or {})})


def run_main(body: Callable[[], dict]) -> int:
    """Run a job body; print its result as the last stdout line (one JSON object).

    Exit codes: 0 done; 1 the run finished with fewer rows than items (``"status": "incomplete"``);
    2 a PipelineError or invalid config, with the reason on stderr and in the JSON line."""
    try:
        result = body()
    except (PipelineError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(json.dumps({"status": "error", "error": str(exc)}))
        return 2
    print(json.dumps(result, default=str))
    return 0 if result.get("status", "ok") == "ok" else 1
