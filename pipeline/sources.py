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
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.prompts import CAPTION_PROMPT, answer_letter, format_mcq_prompt
from pipeline.storage import (
    StorageOptions,
    get_fs,
    join,
    permission_denied,
    protocol_of,
    redact,
    redact_array,
    unstrip,
)  # fmt: skip

MANIFEST_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json", ".csv")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
JSON_LAYOUTS = "a JSON array of objects, or JSON Lines (one object per line)"
RECORD_CHUNK = (
    65_536  # records read, checked and expanded at a time (the planner holds a chunk, not the input)
)
ARROW_JSON_BLOCK = 16 << 20  # bytes of JSON Lines that Arrow parses at a time


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
    ordinal: int | None = None  # the item's place in its run's plan, set by the read stage (row-loss check)

    @property
    def readable_uri(self) -> str:
        """The URI to open: the full (signed) URL where there is one, else ``video_uri``."""
        return self.source_uri or self.video_uri


Chunk = list[dict] | pa.Table  # records read at a time (see iter_records)
_SHOWN_FIELDS = tuple(f.name for f in fields(Item) if f.name != "source_uri")


def items_to_json(items: Iterable[Item]) -> str:
    """The items as JSON, without ``source_uri`` (signatures stay out of everything written)."""
    return json.dumps([{k: getattr(item, k) for k in _SHOWN_FIELDS} for item in items], ensure_ascii=False)


def items_from_json(text: str) -> list[Item]:
    return [Item(**fields) for fields in json.loads(text)]


# --- reading records ----------------------------------------------------------------------------------


def is_manifest(uri: str) -> bool:
    return redact(uri).lower().endswith(MANIFEST_SUFFIXES)


def read_records(uri: str, options: StorageOptions) -> list[dict]:
    """Records with at least ``video_uri`` (readable) and ``id``, from a manifest or a listing of ``uri``
    (all of them: :func:`iter_records` reads them in chunks)."""
    return [record for chunk in iter_records(uri, options) for record in _dicts(chunk)]


def iter_records(
    uri: str, options: StorageOptions, columns: tuple[str, ...] | None = None
) -> Iterator[Chunk]:
    """The input's records in order, in chunks of up to :data:`RECORD_CHUNK`: lists of dicts, or Arrow
    tables where a Parquet or JSON Lines manifest reads as one (``columns``: the only columns the caller
    needs, which lets a JSON Lines manifest be parsed by Arrow). Every record has a string ``id`` and a
    resolved ``video_uri``.

    The run-level checks over the whole input (nothing found, an id twice) raise PipelineError when the
    last chunk has been read: a caller acts on the records only after reading them all."""
    ids = _IdCheck()
    chunks = _manifest_chunks(uri, options, columns) if is_manifest(uri) else _listing_chunks(uri, options)
    for chunk in chunks:
        ids.add(chunk)
        yield chunk
    if not ids.count:
        raise PipelineError(
            f"no videos found at {redact(uri)}: pass a folder/prefix holding "
            f"{', '.join(VIDEO_SUFFIXES[:4])}... files, a glob, or a manifest with a video_uri column"
        )
    repeated = ids.repeated()
    if repeated:
        _raise_repeated_id(uri, options, repeated)


class _IdCheck:
    """Are the records' ids unique? Keeps 8 bytes per record (a hash of its id), not the ids: equal
    hashes are confirmed against the ids themselves by :func:`_raise_repeated_id`, a second read."""

    def __init__(self) -> None:
        self.hashes: list[np.ndarray] = []
        self.count = 0

    def add(self, chunk: Chunk) -> None:
        ids = chunk.column("id").to_pylist() if isinstance(chunk, pa.Table) else [r["id"] for r in chunk]
        self.hashes.append(np.fromiter(map(hash, ids), dtype=np.int64, count=len(ids)))
        self.count += len(ids)

    def repeated(self) -> set[int]:
        """The hashes seen more than once (almost always: an id given twice)."""
        if not self.hashes:
            return set()
        hashes = np.sort(np.concatenate(self.hashes))
        return set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())


def _raise_repeated_id(uri: str, options: StorageOptions, hashes: set[int]) -> None:
    """Read the input again to name the first id that appears twice, and its rows."""
    first: dict[str, int] = {}
    n = 0
    chunks = _manifest_chunks(uri, options, None) if is_manifest(uri) else _listing_chunks(uri, options)
    for chunk in chunks:
        for record in _dicts(chunk):
            n += 1
            if hash(record["id"]) not in hashes:
                continue
            if record["id"] in first:
                raise PipelineError(
                    f"input {redact(uri)}: the id {record['id']!r} appears twice (rows {first[record['id']]} "
                    f"and {n}); ids must be unique: give each row its own id"
                )
            first[record["id"]] = n


def _dicts(chunk: Chunk) -> list[dict]:
    return chunk.to_pylist() if isinstance(chunk, pa.Table) else chunk


def _in_chunks(rows: list[dict]) -> Iterator[list[dict]]:
    for start in range(0, len(rows), RECORD_CHUNK):
        yield rows[start : start + RECORD_CHUNK]


def _listing_chunks(uri: str, options: StorageOptions) -> Iterator[list[dict]]:
    yield from _in_chunks(list_videos(uri, options))


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
    return [record for chunk in _manifest_chunks(uri, options, None) for record in _dicts(chunk)]


def _manifest_chunks(uri: str, options: StorageOptions, columns: tuple[str, ...] | None) -> Iterator[Chunk]:
    """The manifest's rows in chunks, ids set and video URIs resolved (see :func:`iter_records`).

    Parquet is read a row group batch at a time; JSON Lines, where ``columns`` are given, by Arrow's
    streaming JSON reader (anything it cannot type as strings, a byte-order mark say, is read again by the
    line parser from where Arrow stopped); JSON arrays and CSV are parsed whole."""
    fs, path = get_fs(uri, options)
    shown = redact(uri)
    local = protocol_of(uri) == "file"
    folder = os.path.dirname(path) if local else shown.rsplit("/", 1)[0]
    count = 0
    try:
        if _kind(fs, path) is None:
            raise PipelineError(f"manifest {shown} does not exist: check the path or URI")
        for chunk in _raw_manifest_chunks(fs, path, shown, columns):
            if isinstance(chunk, pa.Table) and not _arrow_normalizable(chunk):
                chunk = chunk.to_pylist()
            if isinstance(chunk, pa.Table):
                chunk = _normalize_table(chunk, folder, local, count)
            else:
                _check_has_video_uri(shown, chunk)
                _normalize_rows(chunk, folder, local, count)
            count += len(chunk) if isinstance(chunk, list) else chunk.num_rows
            if count:
                yield chunk
    except PermissionError as exc:
        raise permission_denied(uri, exc, "read") from exc
    if not count:
        raise PipelineError(f"manifest {shown} has no rows: write one row per video, with its video_uri")


def _raw_manifest_chunks(
    fs: object, path: str, name: str, columns: tuple[str, ...] | None
) -> Iterator[Chunk]:
    lower = name.lower()
    if lower.endswith(".parquet"):
        yield from _parquet_chunks(fs, path, name)
    elif not lower.endswith(".csv") and _json_lines(fs, path):
        yield from (
            _arrow_json_chunks(fs, path, name, columns) if columns else _json_line_chunks(fs, path, name)
        )
    else:
        with fs.open(path, "rb") as f:
            data = f.read()
        yield from _in_chunks(parse_manifest(name, data))


def _json_lines(fs: object, path: str) -> bool:
    """Does the file's first non-space character (after a byte-order mark) open an object?"""
    with fs.open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf")
        while head and not head.strip():
            head = f.read(1 << 16)
    return head.lstrip()[:1] == b"{"


def _json_line_chunks(fs: object, path: str, name: str, skip: int = 0) -> Iterator[list[dict]]:
    """JSON Lines read a line at a time (the first ``skip`` objects left out)."""
    rows: list[dict] = []
    offset = 0
    with fs.open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):  # every line counts, blank ones too
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise PipelineError(
                    f"manifest {name} is not UTF-8 text (byte {offset + exc.start}): save it as UTF-8"
                ) from exc
            offset += len(raw)
            if not line.strip():
                continue
            row = _json_line(name, line, line_number)
            if skip:
                skip -= 1
                continue
            rows.append(row)
            if len(rows) == RECORD_CHUNK:
                yield rows
                rows = []
    if rows:
        yield rows


def _parquet_chunks(fs: object, path: str, name: str) -> Iterator[pa.Table]:
    try:
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=RECORD_CHUNK):
                yield pa.Table.from_batches([batch])
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise PipelineError(f"manifest {name}: not a readable Parquet file ({exc})") from exc


def _arrow_json_chunks(fs: object, path: str, name: str, columns: tuple[str, ...]) -> Iterator[Chunk]:
    """JSON Lines through Arrow, reading only ``columns`` as strings; where Arrow refuses a line (another
    type, a byte-order mark, a line that is not JSON), the rest is read by :func:`parse_manifest`, which
    also names the faulty line."""
    schema = pa.schema([(c, pa.string()) for c in columns])
    parse = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    done = 0
    try:
        with fs.open(path, "rb") as f:
            reader = pa_json.open_json(
                f, read_options=pa_json.ReadOptions(block_size=ARROW_JSON_BLOCK), parse_options=parse
            )
            for batch in reader:
                table = pa.Table.from_batches([batch])
                if table.column("video_uri").null_count:  # Arrow's null and the line parser's "" differ
                    break
                for start in range(0, table.num_rows, RECORD_CHUNK):
                    piece = table.slice(start, RECORD_CHUNK)
                    yield piece
                    done += piece.num_rows
            else:
                return
    except pa.ArrowException:
        pass
    yield from _json_line_chunks(fs, path, name, skip=done)


def _arrow_normalizable(table: pa.Table) -> bool:
    """Arrow columns whose values the vectorised path turns into exactly what the row path would."""
    names = table.column_names
    if "video_uri" not in names or not pa.types.is_string(table.schema.field("video_uri").type):
        return False
    if table.column("video_uri").null_count:
        return False
    return "id" not in names or _stringy(table.schema.field("id").type)


def _stringy(kind: pa.DataType) -> bool:
    """Types whose Arrow cast to string is Python's ``str`` of the value."""
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)


def _normalize_table(table: pa.Table, folder: str, local: bool, offset: int) -> pa.Table:
    """:func:`_normalize_rows` on Arrow columns: strip and resolve ``video_uri``, default the ``id``."""
    video = pc.utf8_trim_whitespace(table.column("video_uri"))
    relative = pc.invert(pc.or_(pc.match_substring(video, "://"), pc.starts_with(video, "/")))
    relative = pc.and_(relative, pc.not_equal(video, ""))
    if pc.any(relative).as_py():
        values = video.to_pylist()
        flags = relative.to_pylist()
        video = pa.chunked_array(
            [[_resolve(v, folder, local) if f else v for v, f in zip(values, flags, strict=True)]]
        )
    ids = table.column("id").cast(pa.string()) if "id" in table.column_names else None
    missing = pc.fill_null(pc.equal(ids, ""), True) if ids is not None else None
    if ids is None or pc.any(missing).as_py():
        shown = redact_array(video).to_pylist()
        given = ids.to_pylist() if ids is not None else [None] * len(shown)
        ids = pa.chunked_array([[
            i if i not in (None, "") else (s or f"row{offset + n}") for n, (i, s) in enumerate(zip(given, shown, strict=True))
        ]], type=pa.string())  # fmt: skip
    table = table.drop_columns([c for c in ("id", "video_uri") if c in table.column_names])
    return table.append_column("id", ids).append_column("video_uri", video)


def _check_has_video_uri(name: str, rows: list[dict]) -> None:
    if not rows or any("video_uri" in r for r in rows):
        return
    columns = set().union(*(r.keys() for r in rows))
    raise PipelineError(
        f"manifest {name} has no 'video_uri' column (columns: {', '.join(sorted(columns)) or 'none'}). "
        "Add a video_uri column with one video path or URI per row."
    )


def _normalize_rows(rows: list[dict], folder: str, local: bool, offset: int) -> None:
    for i, row in enumerate(rows, offset):
        row["video_uri"] = video = _resolve(str(row.get("video_uri") or "").strip(), folder, local)
        row["id"] = str(row["id"]) if row.get("id") not in (None, "") else (redact(video) or f"row{i}")


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
    lines = enumerate(text.split("\n"), 1)  # every line counts, blank ones too
    return [_json_line(name, line, n) for n, line in lines if line.strip()]


def _json_line(name: str, line: str, line_number: int) -> dict:
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
    return row


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
    return [item for table in iter_items([list(records)], task, prompt) for item in items_from_table(table)]


def iter_items(chunks: Iterable[Chunk], task: str, prompt: str | None = None) -> Iterator[pa.Table]:
    """The items of each chunk of records (:func:`iter_records`), as tables of :data:`ITEM_SCHEMA`.

    Captions of an Arrow chunk are built column-wise; other chunks go row by row. For ``qa`` and ``mcq``,
    an input in which no record has a question raises PipelineError after its last chunk."""
    asked = False
    for chunk in chunks:
        if task == "caption" and isinstance(chunk, pa.Table) and _caption_columns_fit(chunk):
            yield _caption_items(chunk, prompt or CAPTION_PROMPT)
            continue
        rows = _dicts(chunk)
        asked = asked or task == "caption" or any(r.get("question") or r.get("questions") for r in rows)
        yield _records_table(_expand_rows(rows, task, prompt))
    if task in ("qa", "mcq") and not asked:
        raise PipelineError(
            f"task {task} needs questions: use a manifest with a 'question' or 'questions' column "
            "(or --task caption)"
        )


# Item fields as Arrow columns; task and prompt repeat (one prompt per caption run), so they are
# dictionary-encoded: a million caption items hold the prompt once.
_TEXT = pa.string()
_REPEATED = pa.dictionary(pa.int32(), pa.string())
ITEM_SCHEMA = pa.schema(
    [("id", _TEXT), ("video_id", _TEXT), ("video_uri", _TEXT), ("task", _REPEATED), ("prompt", _REPEATED),
     ("question", _TEXT), ("options", pa.list_(_TEXT)), ("answer", _TEXT), ("error", _TEXT),
     ("source_uri", _TEXT)]
)  # fmt: skip


def items_table(items: Iterable[Item]) -> pa.Table:
    """Items as a table of :data:`ITEM_SCHEMA` (no options: null)."""
    items = list(items)
    return _columns_table({name: [getattr(item, name) for item in items] for name in ITEM_SCHEMA.names})


_ITEM_DEFAULTS = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                  for f in fields(Item)}  # fmt: skip


def _records_table(records: list[dict]) -> pa.Table:
    """:func:`items_table` of items given as dicts of :class:`Item` fields (a missing field takes its
    default): planning builds a million of these, and a dict costs an eighth of a frozen ``Item``."""
    return _columns_table(
        {name: [r.get(name, _ITEM_DEFAULTS[name]) for r in records] for name in ITEM_SCHEMA.names}
    )


def _columns_table(columns: dict[str, list]) -> pa.Table:
    columns["options"] = [options or None for options in columns["options"]]
    return pa.table(
        {
            name: pa.array(values, type=_TEXT).dictionary_encode()
            if ITEM_SCHEMA.field(name).type == _REPEATED
            else pa.array(values, type=ITEM_SCHEMA.field(name).type)
            for name, values in columns.items()
        },
        schema=ITEM_SCHEMA,
    )


def items_from_table(table: pa.Table, first_ordinal: int | None = None) -> list[Item]:
    """The items of a table of :data:`ITEM_SCHEMA`; with ``first_ordinal``, numbered from it."""
    rows = table.select(ITEM_SCHEMA.names).to_pylist()
    return [
        Item(**{**row, "options": row["options"] or []},
             ordinal=None if first_ordinal is None else first_ordinal + i)
        for i, row in enumerate(rows)
    ]  # fmt: skip


def _caption_columns_fit(table: pa.Table) -> bool:
    return "caption" not in table.column_names or _stringy(table.schema.field("caption").type)


def _caption_items(records: pa.Table, prompt: str) -> pa.Table:
    """:func:`_expand_rows` for captions, column-wise."""
    n = records.num_rows
    video = records.column("video_uri")
    shown = redact_array(video)
    signed = pc.not_equal(shown, video)
    reference = records.column("caption").cast(_TEXT) if "caption" in records.column_names else None
    answer = (
        pc.if_else(pc.equal(reference, ""), None, reference) if reference is not None else pa.nulls(n, _TEXT)
    )
    nothing = pa.nulls(n, _TEXT)
    return pa.table(
        {
            "id": pc.binary_join_element_wise(records.column("id"), ":caption", ""),
            "video_id": records.column("id"),
            "video_uri": shown,
            "task": _constant("caption", n),
            "prompt": _constant(prompt, n),
            "question": nothing,
            "options": pa.nulls(n, pa.list_(_TEXT)),
            "answer": answer,
            "error": nothing,
            # the URI to read where it was redacted; all null (no copy of the URIs) when none was
            "source_uri": pc.if_else(signed, video, None) if pc.any(signed).as_py() else nothing,
        },
        schema=ITEM_SCHEMA,
    )


def _constant(value: str, n: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value]))


def _expand_rows(records: list[dict], task: str, prompt: str | None) -> list[dict]:
    """The items of ``records`` as dicts of :class:`Item` fields (see :func:`_records_table`)."""
    items: list[dict] = []
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
            items.append({"id": item_id, "task": task, "prompt": prompt or CAPTION_PROMPT, "answer": answer,
                          **video})  # fmt: skip
            continue
        if task == "qa" and _plain_questions(record):  # the common case, ~40% faster (same items)
            items += [
                _plain_question_item(record["id"], i, q, video) for i, q in enumerate(record["questions"])
            ]
            continue
        try:
            questions = _questions(record, task)
        except ValueError as exc:  # a malformed questions / answers / options field of this row
            items.append({"id": f"{record['id']}:{task}", "task": task, "error": str(exc), **video})
            continue
        if not questions:
            items.append(
                {
                    "id": f"{record['id']}:{task}",
                    "task": task,
                    "error": f"no question for task {task}",
                    **video,
                }
            )
        for i, q in enumerate(questions):
            item_id = f"{record['id']}:{task}:{q.get('id', i)}"
            items.append(_question_item(item_id, task, q, video))
    return items


def _plain_questions(record: dict) -> bool:
    """``questions`` is a non-empty list of strings and there are no ``answers``: for qa, each question
    is then an item of its own with no answer and no options (what :func:`_questions` and
    :func:`_question_item` make of it, without their per-question dicts)."""
    questions = record.get("questions")
    return (
        isinstance(questions, list)
        and bool(questions)
        and record.get("answers") in (None, "", [])
        and all(isinstance(q, str) for q in questions)
    )


def _plain_question_item(record_id: str, i: int, question: str, video: dict) -> dict:
    question = question.strip()
    fields = {"id": f"{record_id}:qa:{i}", "task": "qa", "question": question, "answer": None, "options": []}
    if not question:
        return {**fields, **video, "error": "empty question"}
    return {**fields, **video, "prompt": question}


def _question_item(item_id: str, task: str, q: dict, video: dict) -> dict:
    question = str(q.get("question") or "").strip()
    raw = q.get("answer")
    raw = int(raw) if isinstance(raw, float) and raw.is_integer() else raw  # 1.0: a Parquet int with nulls
    answer = None if raw in (None, "") else str(raw)
    fields = {"id": item_id, "task": task, "question": question, "answer": answer, **video}
    try:
        options = [str(o) for o in _as_list(q.get("options"), "options")]
    except ValueError as exc:
        return {**fields, "error": str(exc)}
    if not question:
        return {**fields, "options": options, "error": "empty question"}
    if task == "qa":
        return {**fields, "options": options, "prompt": question}
    try:
        prompt = format_mcq_prompt(question, options)
    except ValueError as exc:
        return {**fields, "options": options, "error": str(exc)}
    letter = answer_letter(answer, options) if answer is not None else None
    fields["answer"] = letter if letter is not None else answer
    return {**fields, "options": options, "prompt": prompt}


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
