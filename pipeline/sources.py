"""Inputs → task items → one row per video for Ray. No video is opened here.

An input is either a prefix/glob of video files on any fsspec filesystem, or a manifest (Parquet, JSONL
or CSV) with a ``video_uri`` column and optional ``id``, ``question`` / ``questions``, ``options``,
``answer``. Each (video, task item) becomes one :class:`Item` with a stable id:

- caption: ``<video_id>:caption``
- qa / mcq: ``<video_id>:<task>:<i>`` for the i-th question of the video (or the question's own ``id``).

A run-level problem (no ``video_uri`` column, nothing matched, duplicate ids) raises
:class:`PipelineError`. A problem with one item (an MCQ without options) becomes an item with ``error``
set, which the annotator writes as an error row.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.prompts import CAPTION_PROMPT, answer_letter, format_mcq_prompt
from pipeline.storage import StorageOptions, get_fs, join, unstrip

MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json", ".csv")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")


@dataclass(frozen=True)
class Item:
    """One row of output to be: a video and the task to run on it."""

    id: str
    video_id: str
    video_uri: str
    task: str
    prompt: str = ""
    question: str | None = None
    options: list[str] = field(default_factory=list)
    answer: str | None = None  # ground-truth letter (mcq) or text (qa), when the manifest has one
    error: str | None = None  # set when the item cannot run; becomes an error row


def items_to_json(items: Iterable[Item]) -> str:
    return json.dumps([asdict(item) for item in items], ensure_ascii=False)


def items_from_json(text: str) -> list[Item]:
    return [Item(**fields) for fields in json.loads(text)]


# --- reading records ----------------------------------------------------------------------------------


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def read_records(uri: str, options: StorageOptions) -> list[dict]:
    """Records with at least ``video_uri`` and ``id``, from a manifest or a listing of ``uri``."""
    records = read_manifest(uri, options) if is_manifest(uri) else list_videos(uri, options)
    if not records:
        raise PipelineError(
            f"no videos found at {uri}: pass a folder/prefix holding {', '.join(VIDEO_SUFFIXES[:4])}... "
            "files, a glob, or a manifest with a video_uri column"
        )
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen:
            raise PipelineError(f"input {uri}: the id {record['id']!r} appears twice; ids must be unique")
        seen.add(record["id"])
    return records


def list_videos(uri: str, options: StorageOptions) -> list[dict]:
    """Video files under a prefix (recursive, filtered by suffix) or matching a glob (taken as given)."""
    fs, path = get_fs(uri, options)
    if any(ch in path for ch in "*?["):
        root = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0].rsplit("/", 1)[0]
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isfile(path):
        root, paths = path.rsplit("/", 1)[0], [path]
    elif fs.isdir(path):
        root = path.rstrip("/")
        paths = sorted(
            p for p in fs.find(path) if p.lower().endswith(VIDEO_SUFFIXES) and not _hidden(p, root)
        )
    else:
        raise PipelineError(f"input {uri} does not exist: check the path or URI")
    return [{"id": _video_id(p, root), "video_uri": unstrip(uri, p)} for p in paths]


def read_manifest(uri: str, options: StorageOptions) -> list[dict]:
    """The manifest's rows; relative ``video_uri`` values are resolved against the manifest's folder."""
    fs, path = get_fs(uri, options)
    if not fs.isfile(path):
        raise PipelineError(f"manifest {uri} does not exist: check the path or URI")
    with fs.open(path, "rb") as f:
        data = f.read()
    rows = _parse_manifest(uri, data)
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    if "video_uri" not in columns:
        raise PipelineError(
            f"manifest {uri} has no 'video_uri' column (columns: {', '.join(sorted(columns)) or 'none'}). "
            "Add a video_uri column with one video path or URI per row."
        )
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    for i, row in enumerate(rows):
        video = str(row.get("video_uri") or "").strip()
        if video and "://" not in video and not video.startswith("/"):
            video = join(base, video)
        row["video_uri"] = video
        row["id"] = str(row["id"]) if row.get("id") not in (None, "") else (video or f"row{i}")
    return rows


def _parse_manifest(uri: str, data: bytes) -> list[dict]:
    lower = uri.lower()
    if lower.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pylist()
    text = data.decode("utf-8")
    if lower.endswith(".csv"):
        return [dict(row) for row in csv.DictReader(io.StringIO(text))]
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise PipelineError(
            f"manifest {uri}: not JSON Lines ({exc}); write one JSON object per line"
        ) from exc


def _hidden(path: str, root: str) -> bool:
    return any(part.startswith((".", "_")) for part in path[len(root) :].split("/") if part)


def _video_id(path: str, root: str) -> str:
    rel = path[len(root) :].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


# --- records → items -----------------------------------------------------------------------------------


def expand_items(records: Iterable[dict], task: str, prompt: str | None = None) -> list[Item]:
    """One item per video for ``caption``, one per question for ``qa`` and ``mcq``."""
    records = list(records)
    if task in ("qa", "mcq") and not any(r.get("question") or r.get("questions") for r in records):
        raise PipelineError(
            f"task {task} needs questions: use a manifest with a 'question' or 'questions' column "
            "(or --task caption)"
        )
    items: list[Item] = []
    for record in records:
        video = {"video_id": record["id"], "video_uri": record["video_uri"]}
        if task == "caption":
            reference = record.get("caption") or None  # a ground-truth caption, where the manifest has one
            item_id = f"{record['id']}:caption"
            items.append(
                Item(id=item_id, task=task, prompt=prompt or CAPTION_PROMPT, answer=reference, **video)
            )
            continue
        questions = _questions(record, task)
        if not questions:
            items.append(
                Item(id=f"{record['id']}:{task}", task=task, error=f"no question for task {task}", **video)
            )
        for i, q in enumerate(questions):
            item_id = f"{record['id']}:{task}:{q.get('id', i)}"
            items.append(_question_item(item_id, task, q, video))
    return items


def _question_item(item_id: str, task: str, q: dict, video: dict) -> Item:
    question = str(q.get("question") or "").strip()
    options = [str(o) for o in _as_list(q.get("options"))]
    answer = None if q.get("answer") in (None, "") else str(q["answer"])
    base = Item(id=item_id, task=task, question=question, options=options, answer=answer, **video)
    if not question:
        return _with(base, error="empty question")
    if task == "qa":
        return _with(base, prompt=question)
    try:
        prompt = format_mcq_prompt(question, options)
    except ValueError as exc:
        return _with(base, error=str(exc))
    letter = answer_letter(answer, options) if answer is not None else None
    return _with(base, prompt=prompt, answer=letter if letter is not None else answer)


def _questions(record: dict, task: str) -> list[dict]:
    """The record's questions for ``task``, as dicts with ``question`` and optional ``options``,
    ``answer`` and ``id``.

    ``questions`` is a list of strings (answers, if any, in a parallel ``answers`` list) or of dicts.
    For mcq a ``question`` with ``options`` is the item (a manifest may carry free-form ``questions``
    for qa beside one MCQ item); for qa the ``questions`` list comes first.
    """
    many = _as_list(record.get("questions"))
    single = {k: record.get(k) for k in ("question", "options", "answer")} if record.get("question") else None
    if task == "mcq" and single and _as_list(single.get("options")):
        return [single]
    if not many:
        return [single] if single else []
    answers = _as_list(record.get("answers"))
    shared = {"options": record.get("options")} if task == "mcq" else {}
    out = []
    for i, q in enumerate(many):
        fields = dict(q) if isinstance(q, dict) else {**shared, "question": q}
        if "answer" not in fields and i < len(answers):
            fields["answer"] = answers[i]
        out.append(fields)
    return out


def _as_list(value: object) -> list:
    """Lists stay lists; a JSON list string (CSV manifests) is parsed; ``a|b|c`` is split."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return list(json.loads(text))
        return [part.strip() for part in text.split("|")] if "|" in text else [text]
    return list(value)


def _with(item: Item, **changes: object) -> Item:
    return Item(**{**asdict(item), **changes})


# --- items → rows for Ray --------------------------------------------------------------------------------


def video_rows(items: Iterable[Item]) -> list[dict]:
    """One row per video (decoded once), carrying its items as JSON strings, in first-seen order."""
    rows: dict[str, dict] = {}
    for item in items:
        row = rows.setdefault(
            item.video_id, {"video_id": item.video_id, "video_uri": item.video_uri, "items": []}
        )
        row["items"].append(item)
    return [{**row, "items": items_to_json(row["items"])} for row in rows.values()]
