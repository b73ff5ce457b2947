"""Offline evaluation of StD against dense decoding on rows where both ran (``dense_sample=-1``).

Reported, over the ``ok`` rows of one run:

- ``accuracy``: per decoder, the metrics of ``pipeline.demo_eval`` over the rows with an answer: for
  mcq the option letter parsed from the text, for qa a normalised exact match, for caption (the
  manifest's ``caption`` as reference) the attribute hits ``caption_colour`` / ``_shape`` / ``_motion`` /
  ``_order`` and their mean ``caption_attributes``. StD is lossless, so the two decoders agree wherever
  their outputs are identical;
- ``exact_match_rate``: rows whose StD tokens equal the dense tokens. Greedy fp32 must give 1.0; in
  bf16/fp16 a parallel verify can flip a near-tie, and each ``divergences`` entry gives the first
  differing position and the dense top-1 minus top-2 logit margin there (a tiny margin means a tie);
- ``acceptance_rate``, ``mean_accepted_per_round`` and ``speedup`` (dense / StD decode seconds).
"""

from __future__ import annotations

import statistics

import pyarrow as pa

from pipeline.demo_eval import Tally, score_mcq, score_qa
from pipeline.schema import STATUS_OK

MAX_LISTED_DIVERGENCES = 20


def evaluation_report(table: pa.Table) -> dict:
    """The report for the rows of one evaluation run (see the module docstring)."""
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == STATUS_OK]
    compared = [r for r in ok if r["dense_match"] is not None]
    diverged = [r for r in compared if not r["dense_match"]]
    margins = [r["divergence_margin"] for r in diverged if r["divergence_margin"] is not None]
    drafted = sum(r["drafted_tokens"] or 0 for r in ok)
    rounds = sum(r["rounds"] or 0 for r in ok)
    committed = sum((r["generated_tokens"] or 1) - 1 for r in ok if r["rounds"])
    std_seconds = sum(r["decode_seconds"] or 0.0 for r in compared)
    dense_seconds = sum(r["dense_decode_seconds"] or 0.0 for r in compared)
    return {
        "rows": len(rows),
        "rows_ok": len(ok),
        "rows_error": len(rows) - len(ok),
        "accuracy": _accuracy(ok),
        "compared_rows": len(compared),
        "exact_match_rate": _ratio(len(compared) - len(diverged), len(compared)),
        "divergences": [
            {"id": r["id"], "position": r["divergence_position"], "margin": r["divergence_margin"]}
            for r in diverged[:MAX_LISTED_DIVERGENCES]
        ],
        "divergence_margin_min": min(margins) if margins else None,
        "divergence_margin_median": statistics.median(margins) if margins else None,
        "acceptance_rate": _ratio(sum(r["accepted_tokens"] or 0 for r in ok), drafted),
        "mean_accepted_per_round": _ratio(committed, rounds),
        "std_decode_seconds": round(std_seconds, 4),
        "dense_decode_seconds": round(dense_seconds, 4),
        "speedup": _ratio(dense_seconds, std_seconds),
    }


def _accuracy(rows: list[dict]) -> dict:
    """Per decoder, the ``demo_eval`` metrics of the rows that have an answer (see the module docstring)."""
    scored = [r for r in rows if r["answer"] is not None]
    std, dense = Tally(), Tally()
    for row in scored:
        _score(std, row, row["text"])
        if row["dense_text"] is not None:
            _score(dense, row, row["dense_text"])
    return {"scored": len(scored), "std": std.summary(), "dense": dense.summary()}


def _score(tally: Tally, row: dict, text: str | None) -> None:
    if row["task"] == "caption":
        tally.add_caption(text or "", row["answer"])
    elif row["task"] == "mcq":
        tally.add("mcq", [text is not None and score_mcq(text, row["answer"], len(row["options"] or []))])
    else:
        tally.add(row["task"], [text is not None and score_qa(text, row["answer"])])


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None
