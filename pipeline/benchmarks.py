"""Video QA benchmarks as users hold them → the pipeline's manifest (``jobs.evaluate --benchmark``).

A reader per layout turns a benchmark's rows into normalised :class:`~pipeline.benchmark_rows.Question`
objects (options without letter prefixes or ``N/A`` slots, the answer as a letter; see
:mod:`pipeline.benchmark_rows`), and :func:`prepare_benchmark` writes the accepted ones as a JSONL
manifest into ``<output>/_benchmark/manifest.jsonl``: one row per video (decoded once), with its
``questions``. Each question carries its ``groups`` (duration, task type, ...), which the report joins
back onto the result rows by their ``id``. Rejected questions go to ``_benchmark/rejected.jsonl`` and
are counted, with their reasons, in the report. The layouts (``/work/shared/benchmark-formats.md``):

- ``videomme``: Parquet (a file or a folder of them) with ``videoID``, ``question``, ``options``
  (``"A. ..."``), ``answer`` (a letter), ``question_id``, ``duration``, ``domain``, ``sub_category``,
  ``task_type``; the video is ``<root>/data/<videoID>`` + the first of ``.mp4``, ``.MP4``, ``.mkv`` found;
- ``mlvu``: either the original folder (``json/<task>.json`` lists of ``video``, ``question``,
  ``candidates``, ``answer`` as the option's text; videos under ``<root>/video/<task>/``) or lmms-eval's
  ``MLVU_dev`` Parquet (``video_name`` under ``<root>``; ``candidates``; ``answer`` a letter; option lines
  that the ``question`` text embeds are dropped, as the pipeline lists the options itself);
- ``generic``: any table (Parquet, JSON, JSONL, CSV) through ``--column-map``.

``--video-root`` defaults to the input's folder (MLVU original: the folder holding ``json/``);
``--video-template`` (``"{root}/videos/{video_idx}.mp4"``: the row's columns plus ``root``) overrides a
layout's own video path rule.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Literal

from pipeline.benchmark_readers import absolute_root, default_root, read_generic, read_mlvu, read_videomme
from pipeline.benchmark_rows import Question, manifest_rows, unique_question_ids
from pipeline.config import flag
from pipeline.errors import PipelineError
from pipeline.storage import StorageOptions, get_fs, join, protocol_of

BenchmarkName = Literal["videomme", "mlvu", "generic"]
PromptPreset = Literal["default", "lmms-eval"]
BENCHMARKS: tuple[str, ...] = ("videomme", "mlvu", "generic")
DEFAULT_GROUPS = {"videomme": ("duration", "domain", "sub_category", "task_type"), "mlvu": ("task_type",)}
# The benchmark's own headline: Video-MME the pooled accuracy, MLVU the mean of the per-task accuracies.
HEADLINES = {"videomme": "accuracy", "mlvu": "mean_task_accuracy", "generic": "accuracy"}
HEADLINE_GROUP = "task_type"  # the groups whose mean is ``mean_task_accuracy``
# lmms-eval's settings for Qwen2-VL on Video-MME; jobs.evaluate makes them the defaults of the preset.
PRESET_SETTINGS = {"lmms-eval": {"num_frames": 32, "max_pixels": 602_112, "max_new_tokens": 16}}
COLUMN_KEYS = ("id", "video", "question", "options", "answer", "group")
MANIFEST_FOLDER = "_benchmark"


@dataclass(frozen=True)
class BenchmarkConfig:
    """``jobs.evaluate``'s benchmark flags (one flag per field)."""

    benchmark: BenchmarkName | None = flag(
        None,
        (
            "Read --input as this benchmark's own layout (videomme, mlvu, or generic with --column-map), "
            "normalise it into <output>/_benchmark/manifest.jsonl and score per group. None: --input is a "
            "manifest of the pipeline's own columns."
        ),
    )
    video_root: str | None = flag(
        None, "Folder the benchmark's videos were unpacked into. None: the input's folder."
    )
    video_template: str | None = flag(
        None,
        (
            'The video path of a row, e.g. "{root}/videos/{video_idx}.mp4": format fields are the row\'s '
            "columns plus root. None: the layout's own rule (generic: the video column, under the root)."
        ),
    )
    column_map: str | None = flag(
        None,
        (
            "generic: key=column pairs for id, video, question, options, answer, group; options and group "
            "take one column or several (options=option0,option1,option2,answer=correct_choice)."
        ),
    )
    group_by: str | None = flag(
        None,
        (
            "Comma-separated columns to report accuracy per value of. None: the benchmark's own groups "
            "(videomme: duration, domain, sub_category, task_type; mlvu: task_type; generic: --column-map's)."
        ),
    )
    prompt_preset: PromptPreset = flag(
        "default",
        (
            "lmms-eval: its Video-MME prompt (instruction line, question, options, answer with the letter) "
            "and answer parsing, and its defaults of 32 frames, 602112 pixels, 16 new tokens, so accuracies "
            "compare with published ones. default: the project's own prompt and parser."
        ),
    )

    def __post_init__(self) -> None:
        if self.benchmark is None:
            given = [
                f for f in ("video_root", "video_template", "column_map", "group_by") if getattr(self, f)
            ]
            if self.prompt_preset != "default":
                given.append("prompt_preset")
            if given:
                flags = ", ".join("--" + name.replace("_", "-") for name in given)
                raise ValueError(f"{flags} only apply to a benchmark: pass --benchmark too")
            return
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark must be one of {', '.join(BENCHMARKS)}; got {self.benchmark!r}")
        if (self.benchmark == "generic") != (self.column_map is not None):
            raise ValueError("--column-map goes with --benchmark generic, and generic needs a --column-map")
        if self.column_map is not None:
            columns = parse_column_map(self.column_map)
            if "video" not in columns and self.video_template is None:
                raise ValueError("--column-map needs a video=<column>, or pass a --video-template")

    @property
    def group_columns(self) -> tuple[str, ...]:
        """The columns the report groups by: ``--group-by``, else the benchmark's own."""
        if self.group_by:
            return tuple(c.strip() for c in self.group_by.split(",") if c.strip())
        if self.benchmark == "generic":
            return tuple(parse_column_map(self.column_map or "").get("group", ()))
        return DEFAULT_GROUPS.get(self.benchmark or "", ())

    @property
    def carried_columns(self) -> tuple[str, ...]:
        """Every column whose values each question carries: the groups, plus the headline's."""
        headline = (HEADLINE_GROUP,) if HEADLINES.get(self.benchmark or "") == "mean_task_accuracy" else ()
        return tuple(dict.fromkeys([*self.group_columns, *headline]))


def parse_column_map(text: str) -> dict[str, list[str]]:
    """``"id=qid,options=a0,a1,answer=ans"`` → ``{"id": ["qid"], "options": ["a0", "a1"], ...}``: a
    name without ``=`` continues the list of the key before it (options and group only)."""
    out: dict[str, list[str]] = {}
    key = None
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if "=" in token:
            key, _, column = (part.strip() for part in token.partition("="))
            key = "group" if key == "groups" else key
            if key not in COLUMN_KEYS or not column or key in out:
                why = "repeated" if key in out else "unknown" if key not in COLUMN_KEYS else "has no column"
                raise ValueError(f"--column-map: key {key!r} {why} (keys: {', '.join(COLUMN_KEYS)})")
            out[key] = [column]
        elif key in ("options", "group"):
            out[key].append(token)
        else:
            raise ValueError(f"--column-map: {token!r} follows {key or 'nothing'}; write key=column pairs")
    missing = [k for k in ("question", "options") if k not in out]
    if missing:
        raise ValueError(f"--column-map needs {' and '.join(k + '=<column>' for k in missing)}")
    return out


def read_benchmark(config: BenchmarkConfig, uri: str, storage: StorageOptions) -> list[Question]:
    """The benchmark's questions at ``uri``, normalised (rejected ones included, with their ``error``)."""
    template, carry = config.video_template, config.carried_columns
    if config.benchmark == "mlvu":
        return unique_question_ids(read_mlvu(uri, config.video_root, storage, template, carry))
    root = absolute_root(config.video_root or default_root(uri, storage))
    if config.benchmark == "videomme":
        return unique_question_ids(read_videomme(uri, root, storage, template, carry))
    columns = parse_column_map(config.column_map or "")
    return unique_question_ids(read_generic(uri, root, storage, template, carry, columns))


# ---------------------------------------------------------------------------------------------------
# The normalised manifest
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedBenchmark:
    """A benchmark read, normalised and written as the pipeline's manifest."""

    name: str
    manifest: str  # the JSONL manifest's URI: --input of the evaluation's run
    questions: list[Question]  # all of them, rejected ones (``error`` set) included
    group_by: tuple[str, ...]
    headline: str  # a key of HEADLINES' values: "accuracy" or "mean_task_accuracy"
    preset: str

    @property
    def groups(self) -> dict[str, dict[str, str]]:
        """Result row id → the question's group values: the side table the report joins on."""
        return {q.row_id: q.groups for q in self.questions if q.error is None}

    @property
    def rejected(self) -> list[Question]:
        return [q for q in self.questions if q.error is not None]


def prepare_benchmark(
    config: BenchmarkConfig, input_uri: str, output: str, storage: StorageOptions
) -> PreparedBenchmark:
    """Read ``input_uri`` as ``config.benchmark``, write ``<output>/_benchmark/manifest.jsonl`` (and
    ``rejected.jsonl``); PipelineError where no question is left to ask."""
    questions = read_benchmark(config, input_uri, storage)
    rows = manifest_rows(questions, config.prompt_preset)
    prepared = PreparedBenchmark(
        config.benchmark or "",
        join(output, MANIFEST_FOLDER, "manifest.jsonl"),
        questions,
        config.group_columns,
        HEADLINES[config.benchmark or "generic"],
        config.prompt_preset,
    )
    if not rows:
        reasons = sorted({q.error or "" for q in prepared.rejected})[:5]
        raise PipelineError(
            f"benchmark {input_uri}: none of its {len(questions)} questions can be asked ({'; '.join(reasons)})"
        )
    rejected = [{"id": q.row_id, "error": q.error} for q in prepared.rejected]
    _write_lines(prepared.manifest, rows, storage)
    _write_lines(join(output, MANIFEST_FOLDER, "rejected.jsonl"), rejected, storage)
    return prepared


def _write_lines(uri: str, rows: list[dict], storage: StorageOptions) -> None:
    fs, path = get_fs(uri, storage)
    try:
        if protocol_of(uri) == "file":
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    except OSError as exc:
        raise PipelineError(f"cannot write the benchmark's manifest {uri} ({exc}): check --output") from exc
