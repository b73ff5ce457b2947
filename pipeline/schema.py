"""The output schema, defined once: one Parquet row per video × task item.

Vocabulary of the decoder columns (as in ``std_core``): a *draft* token is proposed by the sparse pass,
an *accepted* token is a draft the dense verify agreed with, a *round* is draft γ → verify → accept.
Every round also commits one dense *bonus* token, and the first token comes from the prefill, so
``generated_tokens = 1 + accepted_tokens + rounds`` for StD rows (when no stop cut a round short);
dense rows have no drafts and no accepted tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

STATUS_OK = "ok"
STATUS_ERROR = "error"

# (column, type, meaning). The README's output-schema table is generated from the same words.
COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("id", pa.string(), "the row's id: <video_id>:caption or <video_id>:<task>:<question>"),
    ("video_id", pa.string(), "the video's id (manifest id, or path relative to the input prefix)"),
    ("video_uri", pa.string(), "where the video came from"),
    ("task", pa.string(), "caption, qa or mcq"),
    ("question", pa.string(), "the question, where there is one"),
    ("options", pa.list_(pa.string()), "the MCQ options, where there are some"),
    ("answer", pa.string(), "the ground truth from the manifest (a letter for mcq), where given"),
    ("predicted", pa.string(), "mcq: the letter parsed from text (null if none)"),
    ("correct", pa.bool_(), "mcq with an answer: predicted == answer"),
    ("text", pa.string(), "the caption or answer"),
    ("status", pa.string(), '"ok" or "error"'),
    ("error", pa.string(), "what went wrong, where something did"),
    ("num_frames", pa.int32(), "frames sampled"),
    ("visual_tokens", pa.int32(), "visual tokens in the prompt"),
    ("prompt_tokens", pa.int32(), "all prompt tokens"),
    ("generated_tokens", pa.int32(), "tokens produced (EOS included, padding not)"),
    ("drafted_tokens", pa.int32(), "tokens the sparse draft proposed"),
    ("accepted_tokens", pa.int32(), "drafted tokens that were accepted"),
    ("rounds", pa.int32(), "StD rounds (draft, verify, accept)"),
    ("shared_prefill", pa.bool_(), "qa/mcq: the video was prefilled once for several of its questions"),
    ("frame_seconds", pa.float64(), "CPU time spent reading and decoding the video"),
    ("decode_seconds", pa.float64(), "this row's share of its batch's generate time (batch time / rows)"),
    ("dense_decode_seconds", pa.float64(), "the same share for a dense re-run, where sampled"),
    ("dense_text", pa.string(), "the dense re-run's text, where one was sampled"),
    ("dense_match", pa.bool_(), "where a dense re-run was sampled: identical tokens"),
    ("divergence_position", pa.int32(), "first generated position where StD and dense differ"),
    ("divergence_margin", pa.float64(), "the dense top-1 minus top-2 logit there"),
    ("decoder", pa.string(), '"std" or "dense"'),
    ("model", pa.string(), "the model used"),
    ("run_id", pa.string(), "the run that wrote the row"),
    ("created_at", pa.timestamp("us", tz="UTC"), "when the row was produced"),
)

SCHEMA = pa.schema([(name, dtype) for name, dtype, _ in COLUMNS])
NAMES: tuple[str, ...] = tuple(SCHEMA.names)


def to_table(rows: Iterable[dict]) -> pa.Table:
    """Rows (dicts, any missing column null) as a table of exactly :data:`SCHEMA`."""
    rows = list(rows)
    unknown = {key for row in rows for key in row} - set(NAMES)
    assert not unknown, f"columns outside the schema: {sorted(unknown)}"
    return pa.Table.from_pylist([{name: row.get(name) for name in NAMES} for row in rows], schema=SCHEMA)


def conform(table: pa.Table) -> pa.Table:
    """``table`` cast to :data:`SCHEMA` (Ray may hand back blocks with equivalent but looser types)."""
    return table.select(list(NAMES)).cast(SCHEMA)
