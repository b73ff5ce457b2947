"""Inputs → task items → one row per video for Ray. No video is opened here.

An input is a prefix/glob of video files on any fsspec filesystem, or a manifest with a ``video_uri``
column and optional ``id``, ``question`` / ``questions``, ``options``, ``answer``: Parquet, CSV, or JSON
(``.json``/``.jsonl``/``.ndjson``: a JSON array of objects or JSON Lines, told apart by the first non-space
character); a UTF-8 byte-order mark is ignored. A path that exists is used literally, even with ``[``,
``*`` or ``?`` in its name; only a path that does not exist is a glob.

Video ids: a listed video's id is its path relative to the input without its suffix (``sub/b`` for
``sub/b.MKV``); files that share that (``clip.mp4``, ``clip.webm``) each keep their suffix (``clip.mp4``,
``clip.webm``), so inputs without such a pair keep their ids, on which resume matches (adding ``clip.webm``
beside ``clip.mp4`` later renames the first one's id). A manifest row's id is its ``id``, else its video's
redacted URI. Ids that still collide are a run-level error. Each (video, task item) is one :class:`Item`:

- caption: ``<video_id>:caption``
- qa / mcq: ``<video_id>:<task>:<i>`` for the i-th question of the video (or the question's own ``id``).

URIs: a relative local ``video_uri`` is resolved against the manifest's folder and written absolute; URIs
with a scheme are kept. A signed URL (``https://...?X-Amz-Signature=...``) is opened as given, but all that
is written (ids, the ``video_uri`` column, messages) is its :func:`pipeline.storage.redact` form: the item
keeps the full URL in ``source_uri``, which is never serialised.

A run-level problem (an unreadable or malformed manifest, no ``video_uri`` column, nothing matched,
duplicate ids, permission denied) raises :class:`PipelineError`. A problem with one item (an MCQ without
options) becomes an item with ``error`` set, which the annotator writes as an error row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.prompts import CAPTION_PROMPT, answer_letter, format_mcq_prompt
from pipeline.storage import StorageOptions, get_fs, join, permission_denied, protocol_of, redact, unstrip

MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json", ".csv")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
JSON_LAYOUTS = "a JSON array of objects, or JSON Lines (one object per line)"


@dataclass(frozen=True)
class Item:
    """One row of output to be: a video and the task to run on it."""

    id: str
    video_id: str
    video_uri: str  # what rows show: redacted (no query string) where it is a signed URL
    task: str
    prompt: str = ""
    question: str | None = None
    options: list[str] = field(default_factory=list)
    answer: str | None = None  # ground-truth letter (mcq) or text (qa), when the manifest has one
    error: str | None = None  # set when the item cannot run; becomes an error row
    source_uri: str | None = None  # what the decoder opens where it differs from video_uri; never serialised

    @property
    def readable_uri(self) -> str:
        """The URI to open: the full (signed) URL where there is one, else ``video_uri``."""
        return self.source_uri or self.video_uri


def items_to_json(items: Iterable[Item]) -> str:
    """The items as JSON, without ``source_uri`` (signatures stay out of everything written)."""
    return json.dumps(
        [{k: v for k, v in asdict(item).items() if k != "source_uri"} for item in items], ensure_ascii=False
    )


def items_from_json(text: str) -> list[Item]:
    return [Item(**fields) for fields in json.loads(text)]


# --- reading records ----------------------------------------------------------------------------------


def is_manifest(uri: str) -> bool:
    return redact(uri).lower().endswith(MANIFEST_SUFFIXES)


def read_records(uri: str, options: StorageOptions) -> list[dict]:
    """Records with at least ``video_uri`` (readable) and ``id``, from a manifest or a listing of ``uri``."""
    records = read_manifest(uri, options) if is_manifest(uri) else list_videos(uri, options)
    if not records:
        raise PipelineError(
            f"no videos found at {redact(uri)}: pass a folder/prefix holding "
            f"{', '.join(VIDEO_SUFFIXES[:4])}... files, a glob, or a manifest with a video_uri column"
        )
    first: dict[str, int] = {}
    for n, record in enumerate(records, 1):
        if record["id"] in first:
            raise PipelineError(
                f"input {redact(uri)}: the id {record['id']!r} appears twice (rows {first[record['id']]} and "
                f"{n}); ids must be unique: give each row its own id"
            )
        first[record["id"]] = n
    return records


def list_videos(uri: str, options: StorageOptions) -> list[dict]:
    """Video files under a prefix (recursive, filtered by suffix), the one file ``uri`` names, or the files
    matching a glob (taken as given) where ``uri`` does not exist."""
    fs, path = get_fs(uri, options)
    try:
        kind = _kind(fs, path)
        if kind == "directory":
            root = path.rstrip("/")
            found = fs.find(path)
            paths = sorted(
                p for p in found if redact(p).lower().endswith(VIDEO_SUFFIXES) and not _hidden(p, root)
            )
        elif kind is not None:
            root, paths = path.rsplit("/", 1)[0], [path]
        elif any(ch in path for ch in "*?["):
            root = re.split(r"[*?\[]", path, maxsplit=1)[0].rsplit("/", 1)[0]
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        else:
            raise PipelineError(f"input {redact(uri)} does not exist: check the path or URI")
    except PermissionError as exc:
        raise permission_denied(uri, exc, "list") from exc
    ids = unique_ids([_relative(redact(p), redact(root)) for p in paths])
    return [{"id": i, "video_uri": unstrip(uri, p)} for i, p in zip(ids, paths, strict=True)]


def unique_ids(relative_paths: list[str]) -> list[str]:
    """Each path without its suffix, except where that is shared: those keep their whole path."""
    ids = [_stem(p) for p in relative_paths]
    while True:
        counts = Counter(ids)
        clashing = [i for i, id_ in enumerate(ids) if counts[id_] > 1 and id_ != relative_paths[i]]
        if not clashing:
            return ids  # unique, unless one path is listed twice (read_records reports that)
        for i in clashing:
            ids[i] = relative_paths[i]


def read_manifest(uri: str, options: StorageOptions) -> list[dict]:
    """The manifest's rows; relative ``video_uri`` values are resolved against the manifest's folder."""
    fs, path = get_fs(uri, options)
    shown = redact(uri)
    try:
        if _kind(fs, path) is None:
            raise PipelineError(f"manifest {shown} does not exist: check the path or URI")
        with fs.open(path, "rb") as f:
            data = f.read()
    except PermissionError as exc:
        raise permission_denied(uri, exc, "read") from exc
    rows = parse_manifest(shown, data)
    if not rows:
        raise PipelineError(f"manifest {shown} has no rows: write one row per video, with its video_uri")
    columns = set().union(*(r.keys() for r in rows))
    if "video_uri" not in columns:
        raise PipelineError(
            f"manifest {shown} has no 'video_uri' column (columns: {', '.join(sorted(columns)) or 'none'}). "
            "Add a video_uri column with one video path or URI per row."
        )
    local = protocol_of(uri) == "file"
    folder = os.path.dirname(path) if local else shown.rsplit("/", 1)[0]
    for i, row in enumerate(rows):
        row["video_uri"] = video = _resolve(str(row.get("video_uri") or "").strip(), folder, local)
        row["id"] = str(row["id"]) if row.get("id") not in (None, "") else (redact(video) or f"row{i}")
    return rows


def parse_manifest(name: str, data: bytes) -> list[dict]:
    """The rows of a manifest's bytes, by ``name``'s suffix; PipelineError, naming the file and the line
    where there is one, for anything that is not a manifest of that format."""
    if name.lower().endswith(".parquet"):
        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise PipelineError(f"manifest {name}: not a readable Parquet file ({exc})") from exc
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, where there is one, is not part of the text
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"manifest {name} is not UTF-8 text (byte {exc.start}): save it as UTF-8"
        ) from exc
    return _parse_csv(name, text) if name.lower().endswith(".csv") else _parse_json(name, text)


def _parse_csv(name: str, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:  # DictReader's key for fields beyond the header's
                raise PipelineError(
                    f"manifest {name}, line {reader.line_num}: more fields than the header's "
                    f"{len(reader.fieldnames or [])} columns (quote values that hold commas)"
                )
            rows.append(row)
    except csv.Error as exc:
        raise PipelineError(f"manifest {name}, line {reader.line_num}: not valid CSV ({exc})") from exc
    return rows


def _parse_json(name: str, text: str) -> list[dict]:
    start = text.lstrip()[:1]
    if start == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PipelineError(
                f"manifest {name}, line {exc.lineno}: not a valid JSON array ({exc.msg}, column {exc.colno})"
            ) from exc
        for n, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise PipelineError(
                    f"manifest {name}: element {n} of the JSON array is {_json_type(row)}, not an object"
                )
        return rows
    if start != "{":
        found = f"it starts with {start!r}" if start else "it is empty"
        raise PipelineError(f"manifest {name}: expected {JSON_LAYOUTS}, but {found}")
    rows = []
    for line_number, line in enumerate(text.split("\n"), 1):  # every line counts, blank ones too
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(
                f"manifest {name}, line {line_number}: not valid JSON ({exc.msg}, column {exc.colno}); "
                "JSON Lines hold one object per line"
            ) from exc
        if not isinstance(row, dict):
            raise PipelineError(
                f"manifest {name}, line {line_number}: {_json_type(row)}, not an object; "
                "JSON Lines hold one object per line"
            )
        rows.append(row)
    return rows


def _json_type(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _kind(fs: object, path: str) -> str | None:
    """``"directory"``, another type name (a file), or None where nothing is at ``path``. fsspec's
    ``isfile``/``isdir`` answer False to a PermissionError; ``info`` lets it through."""
    try:
        return fs.info(path)["type"]
    except (FileNotFoundError, NotADirectoryError):
        return None


def _resolve(video: str, folder: str, local: bool) -> str:
    """``video`` as an absolute path or URI: URIs with a scheme and absolute paths stay as written."""
    if not video or "://" in video or video.startswith("/"):
        return video
    return os.path.abspath(os.path.join(folder, video)) if local else join(folder, video)


def _hidden(path: str, root: str) -> bool:
    return any(part.startswith((".", "_")) for part in path[len(root) :].split("/") if part)


def _relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]


def _stem(relative: str) -> str:
    return relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative


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
        shown = redact(record["video_uri"])
        video = {
            "video_id": record["id"],
            "video_uri": shown,
            "source_uri": record["video_uri"] if record["video_uri"] != shown else None,
        }
        if task == "caption":
            reference = record.get("caption")  # a ground-truth caption, where the manifest has one
            item_id = f"{record['id']}:caption"
            answer = str(reference) if reference not in (None, "") else None
            items.append(Item(id=item_id, task=task, prompt=prompt or CAPTION_PROMPT, answer=answer, **video))
            continue
        try:
            questions = _questions(record, task)
        except ValueError as exc:  # a malformed questions / answers / options field of this row
            items.append(Item(id=f"{record['id']}:{task}", task=task, error=str(exc), **video))
            continue
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
    raw = q.get("answer")
    raw = int(raw) if isinstance(raw, float) and raw.is_integer() else raw  # 1.0: a Parquet int with nulls
    answer = None if raw in (None, "") else str(raw)
    base = Item(id=item_id, task=task, question=question, answer=answer, **video)
    try:
        base = _with(base, options=[str(o) for o in _as_list(q.get("options"), "options")])
    except ValueError as exc:
        return _with(base, error=str(exc))
    if not question:
        return _with(base, error="empty question")
    if task == "qa":
        return _with(base, prompt=question)
    try:
        prompt = format_mcq_prompt(question, base.options)
    except ValueError as exc:
        return _with(base, error=str(exc))
    letter = answer_letter(answer, base.options) if answer is not None else None
    return _with(base, prompt=prompt, answer=letter if letter is not None else answer)


def _questions(record: dict, task: str) -> list[dict]:
    """The record's questions for ``task``, as dicts with ``question`` and optional ``options``,
    ``answer`` and ``id``.

    ``questions`` is a list of strings (answers, if any, in a parallel ``answers`` list) or of dicts.
    For mcq a ``question`` with ``options`` is the item (a manifest may carry free-form ``questions``
    for qa beside one MCQ item); for qa the ``questions`` list comes first.
    """
    many = _as_list(record.get("questions"), "questions")
    single = {k: record.get(k) for k in ("question", "options", "answer")} if record.get("question") else None
    if task == "mcq" and single and _as_list(single.get("options"), "options"):
        return [single]
    if not many:
        return [single] if single else []
    answers = _as_list(record.get("answers"), "answers")
    shared = {"options": record.get("options")} if task == "mcq" else {}
    out = []
    for i, q in enumerate(many):
        fields = dict(q) if isinstance(q, dict) else {**shared, "question": q}
        if "answer" not in fields and i < len(answers):
            fields["answer"] = answers[i]
        out.append(fields)
    return out


def _as_list(value: object, what: str) -> list:
    """Lists stay lists; a JSON list string (CSV manifests) is parsed; ``a|b|c`` is split; any other
    single value is a list of one. ValueError, naming the field ``what``, for a string that starts like a
    JSON list but is not one."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return list(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{what}: not a JSON list: {text[:60]!r} ({exc.msg}, column {exc.colno})"
                ) from exc
        return [part.strip() for part in text.split("|")] if "|" in text else [text]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _with(item: Item, **changes: object) -> Item:
    return Item(**{**asdict(item), **changes})


# --- items → rows for Ray --------------------------------------------------------------------------------


def video_rows(items: Iterable[Item]) -> list[dict]:
    """One row per video (decoded once), carrying its items as JSON strings, in first-seen order.

    ``video_uri`` is what the decode stage opens (the full URL, signature included); the items' own
    ``video_uri``, what rows show, is redacted."""
    rows: dict[str, dict] = {}
    for item in items:
        row = rows.setdefault(
            item.video_id, {"video_id": item.video_id, "video_uri": item.readable_uri, "items": []}
        )
        row["items"].append(item)
    return [{**row, "items": items_to_json(row["items"])} for row in rows.values()]
