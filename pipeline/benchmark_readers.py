"""The benchmark readers: files on any filesystem → normalised questions, one reader per layout.

Each reader takes the input's URI, the video root (absolute), the storage options, the video template
(None: the layout's own rule) and ``carry``, the columns whose values each question keeps as its
``groups``; it returns every question, rejected ones included (``pipeline.benchmark_rows``). The
layouts are described in :mod:`pipeline.benchmarks`.
"""

from __future__ import annotations

import json
import posixpath
import re

from pipeline.benchmark_rows import Question, normalise_question
from pipeline.errors import PipelineError
from pipeline.sources import parse_manifest, unique_ids
from pipeline.storage import StorageOptions, get_fs, join, permission_denied, protocol_of

VIDEOMME_SUFFIXES = (".mp4", ".MP4", ".mkv")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json", ".csv")
# An option line that a question's own text embeds ("(A) red", "B. blue") or their "Options:" header
_EMBEDDED_OPTION = re.compile(r"^\s*(?:\([A-J]\)|[A-J][.)])\s+\S|^\s*options\s*:?\s*$", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------


def read_tables(uri: str, storage: StorageOptions, suffixes: tuple[str, ...] = TABLE_SUFFIXES) -> list[dict]:
    """The rows of one table file, or of every ``suffixes`` file under a folder (sorted, recursive;
    hidden ``.``/``_`` names skipped), each row with ``_file``: its file's name without the suffix."""
    rows, (fs, _) = [], get_fs(uri, storage)
    for path in _files(uri, storage, suffixes):
        with fs.open(path, "rb") as f:
            data = f.read()
        stem = posixpath.basename(path).rsplit(".", 1)[0]
        rows += [{**row, "_file": stem} for row in parse_manifest(path, data)]
    if not rows:
        raise PipelineError(f"benchmark input {uri} holds no rows ({', '.join(suffixes)} files)")
    return rows


def _files(uri: str, storage: StorageOptions, suffixes: tuple[str, ...]) -> list[str]:
    fs, path = get_fs(uri, storage)
    try:
        kind = _kind(fs, path)
        if kind is None:
            raise PipelineError(f"benchmark input {uri} does not exist: check --input")
        if kind != "directory":
            return [path]
        root = path.rstrip("/")
        found = sorted(
            p
            for p in fs.find(root)
            if p.lower().endswith(suffixes) and not any(s[:1] in "._" for s in p[len(root) :].split("/") if s)
        )
    except PermissionError as exc:
        raise permission_denied(uri, exc, "read") from exc
    if not found:
        raise PipelineError(f"benchmark input {uri}: no {', '.join(suffixes)} files in the folder")
    return found


def _kind(fs: object, path: str) -> str | None:
    try:
        return fs.info(path)["type"]
    except (FileNotFoundError, NotADirectoryError):
        return None


def _folder_names(uri: str, storage: StorageOptions) -> set[str]:
    """The names of the files directly in folder ``uri`` (empty where it does not exist)."""
    fs, path = get_fs(uri, storage)
    try:
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def default_root(uri: str, storage: StorageOptions) -> str:
    """The input itself where it is a folder, else the folder holding it."""
    fs, path = get_fs(uri, storage)
    return uri.rstrip("/") if _kind(fs, path) == "directory" else _parent(uri)


def absolute_root(root: str) -> str:
    return posixpath.abspath(root) if protocol_of(root) == "file" and "://" not in root else root.rstrip("/")


def _require(rows: list[dict], columns: tuple[str, ...], what: str) -> None:
    present = set().union(*(r.keys() for r in rows))
    if missing := [c for c in columns if c not in present]:
        shown = ", ".join(sorted(c for c in present if c != "_file"))
        raise PipelineError(f"{what} has no {', '.join(missing)} column (columns: {shown})")


def _as_list(value: object) -> list:
    """A list column's value as a list: lists stay, a JSON list string is parsed, a scalar is one."""
    if value is None:
        return []
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return list(json.loads(value))
        except json.JSONDecodeError:
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _video(row: dict, root: str, template: str | None, default: str) -> str:
    """The row's video: ``template`` formatted with the row's columns and ``root``, else ``default``
    (relative to ``root``); absolute paths and URIs stay as written."""
    if template is not None:
        try:
            default = template.format_map({**row, "root": root})
        except (KeyError, IndexError, ValueError) as exc:
            columns = ", ".join(sorted(c for c in row if c != "_file"))
            raise PipelineError(
                f"--video-template {template!r}: cannot fill it from a row ({exc!r}); fields are the "
                f"row's columns ({columns}) and root"
            ) from exc
    if "://" in default or default.startswith("/"):
        return default
    return join(root, default)


def video_keys(uris: list[str], root: str) -> dict[str, str]:
    """Each distinct video's id: its path under ``root`` without the suffix (``pipeline.sources``'
    rule, so ``a.mp4`` and ``a.mkv`` keep their suffixes)."""
    distinct = list(dict.fromkeys(uris))
    relative = [u[len(root) :].lstrip("/") if u.startswith(root + "/") else u for u in distinct]
    return dict(zip(distinct, unique_ids(relative), strict=True))


# ---------------------------------------------------------------------------------------------------
# The readers: one benchmark's rows → questions
# ---------------------------------------------------------------------------------------------------


def read_videomme(
    uri: str, root: str, storage: StorageOptions, template: str | None, carry: tuple[str, ...]
) -> list[Question]:
    rows = read_tables(uri, storage)
    _require(rows, ("videoID", "question", "options", "answer"), f"Video-MME input {uri}")
    present = _folder_names(join(root, "data"), storage) if template is None else None
    if present is not None and not present:
        raise PipelineError(
            f"Video-MME: no videos in {join(root, 'data')}: pass the --video-root holding data/"
        )
    out = []
    for n, row in enumerate(rows):
        video_id = str(row["videoID"])
        names = [video_id + s for s in VIDEOMME_SUFFIXES]
        name = next((x for x in names if present is None or x in present), names[0])
        uri_ = _video(row, root, template, f"data/{name}")
        qid = str(row.get("question_id") or f"q{n}")
        groups = {c: row.get(c) for c in carry}
        out.append(normalise_question(video_id, uri_, qid, row.get("question"), _as_list(row.get("options")),
                                      row.get("answer"), groups))  # fmt: skip
    return out


def read_mlvu(
    uri: str, root: str | None, storage: StorageOptions, template: str | None, carry: tuple[str, ...]
) -> list[Question]:
    """MLVU's original folder (``json/*.json``) where ``uri`` holds JSON lists, else lmms-eval's Parquet."""
    fs, path = get_fs(uri, storage)
    json_dir = join(uri, "json") if _kind(fs, join(path, "json")) == "directory" else uri
    original = uri.lower().endswith(".json") or any(
        p.lower().endswith(".json") for p in _files(json_dir, storage, TABLE_SUFFIXES)
    )
    if not original:
        return _read_mlvu_dev(
            uri, absolute_root(root or default_root(uri, storage)), storage, template, carry
        )
    if json_dir != uri:  # <root>/json/*.json
        default = uri
    else:  # the folder of JSON lists, or one of them: the root is the folder above the lists
        default = _parent(_parent(uri)) if _kind(fs, path) != "directory" else _parent(uri)
    return _read_mlvu_original(json_dir, absolute_root(root or default), storage, template, carry)


def _read_mlvu_original(
    uri: str, root: str, storage: StorageOptions, template: str | None, carry: tuple[str, ...]
) -> list[Question]:
    rows = read_tables(uri, storage, (".json",))
    _require(rows, ("video", "question", "candidates", "answer"), f"MLVU input {uri}")
    records = []
    for row in rows:
        task = row.get("question_type") or re.sub(r"^\d+_", "", row["_file"])
        row = {"task_type": task, **row}
        records.append((row, _video(row, root, template, f"video/{row['_file']}/{row.get('video')}")))
    keys, counters, out = video_keys([u for _, u in records], root), {}, []
    for row, video in records:
        n = counters[row["_file"]] = counters.get(row["_file"], -1) + 1
        groups = {c: row.get(c) for c in carry}
        out.append(normalise_question(keys[video], video, f"{row['_file']}_{n}", row.get("question"),
                                      _as_list(row.get("candidates")), row.get("answer"), groups))  # fmt: skip
    return out


def _read_mlvu_dev(
    uri: str, root: str, storage: StorageOptions, template: str | None, carry: tuple[str, ...]
) -> list[Question]:
    rows = read_tables(uri, storage)
    _require(rows, ("video_name", "question", "candidates", "answer"), f"MLVU_dev input {uri}")
    videos = [_video(row, root, template, str(row["video_name"])) for row in rows]
    keys, out = video_keys(videos, root), []
    for n, (row, video) in enumerate(zip(rows, videos, strict=True)):
        question = "\n".join(
            line for line in str(row.get("question") or "").splitlines() if not _EMBEDDED_OPTION.match(line)
        )
        groups = {c: row.get(c) for c in carry}
        out.append(normalise_question(keys[video], video, str(row.get("question_id") or f"q{n}"), question,
                                      _as_list(row.get("candidates")), row.get("answer"), groups))  # fmt: skip
    return out


def read_generic(
    uri: str,
    root: str,
    storage: StorageOptions,
    template: str | None,
    carry: tuple[str, ...],
    columns: dict[str, list[str]],
) -> list[Question]:
    """Any table, through a column map (``pipeline.benchmarks.parse_column_map``) and a template."""
    rows = read_tables(uri, storage)
    needed = [c for key, cs in columns.items() if key != "group" for c in cs]
    _require(rows, tuple(needed), f"benchmark input {uri}")
    video_column = columns.get("video", [None])[0]
    videos = [_video(row, root, template, str(row.get(video_column, ""))) for row in rows]
    keys, out = video_keys(videos, root), []
    for n, (row, video) in enumerate(zip(rows, videos, strict=True)):
        option_columns = columns["options"]
        options = (
            _as_list(row.get(option_columns[0]))
            if len(option_columns) == 1
            else [row.get(c) for c in option_columns]
        )
        qid = str(row.get(columns["id"][0])) if "id" in columns else f"q{n}"
        answer = row.get(columns["answer"][0]) if "answer" in columns else None
        groups = {c: row.get(c) for c in carry}
        out.append(normalise_question(keys[video], video, qid, row.get(columns["question"][0]), options, answer,
                                      groups, has_answers="answer" in columns))  # fmt: skip
    return out
