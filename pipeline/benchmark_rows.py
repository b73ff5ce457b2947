"""One benchmark question, normalised: its options without letter prefixes or placeholders, its answer
as a letter, and its group values; and the manifest rows the pipeline reads, one per video.

The readers (:mod:`pipeline.benchmarks`) turn each benchmark's own row into :func:`normalise_question`'s
arguments. Normalising, in this order:

1. options: a letter prefix that matches the option's position (``"A. "``, ``"(A) "``, ``"A) "``,
   ``"A:"`` on the first option, ``B`` on the second, ...) is stripped; ``"N/A"`` and empty slots are
   placeholders;
2. the answer names a slot of the options as given (placeholders still in place): a letter (``"b"``,
   ``"(B)"``, ``"B."``), an option's text, or a 0-based integer index (``1``, ``1.0``, ``"1"``);
3. the placeholders are dropped and the answer's letter follows its option.

A question that cannot be asked or scored (no question text, fewer than 2 or more than 10 options, an
answer naming no option or a placeholder) is *rejected*: it stays out of the manifest, and the report
counts it with its reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pipeline.prompts import LETTERS, answer_letter, lmms_eval_question

PLACEHOLDERS = ("", "n/a")  # option slots that hold no option (compared lower-cased, stripped)
MIN_OPTIONS = 2
_ANSWER_LETTER = re.compile(r"^\(?([A-Ja-j])\)?[.:)]?$")  # "B", "(B)", "B.", "b)"


@dataclass(frozen=True)
class Question:
    """One benchmark question after normalising; ``error`` is why it was rejected, else None."""

    video_key: str  # the video's id in the manifest: one manifest row per video
    video_uri: str  # absolute path or URI
    id: str  # the question's id, unique within its video
    question: str
    options: list[str]
    answer: str | None  # the option letter; None where the benchmark holds no answers
    groups: dict[str, str] = field(default_factory=dict)  # group column → value, e.g. duration → short
    error: str | None = None

    @property
    def row_id(self) -> str:
        """The id of the pipeline's row for this question (``pipeline.sources``: ``<video>:mcq:<q>``)."""
        return f"{self.video_key}:mcq:{self.id}"


def strip_option_prefix(option: str, position: int) -> str:
    """``option`` without a letter prefix naming ``position`` (0 → ``A``): ``"B. red"`` → ``"red"`` at 1,
    kept whole at 0. The letter must be the option's own, so ``"A dog"`` or ``"I. e."`` elsewhere stay."""
    if position >= len(LETTERS):
        return option.strip()
    letter = LETTERS[position]
    pattern = rf"^\s*(?:\({letter}\)|{letter}[):]|{letter}\.(?=\s|$))\s*"
    return re.sub(pattern, "", option, count=1).strip()


def is_placeholder(option: object) -> bool:
    return option is None or str(option).strip().lower() in PLACEHOLDERS


def normalise_options(raw: Iterable[object]) -> tuple[list[str], list[int]]:
    """The options without prefixes or placeholders, and each kept option's slot in ``raw``."""
    kept, slots = [], []
    for slot, option in enumerate(raw):
        if is_placeholder(option):
            continue
        kept.append(strip_option_prefix(str(option), slot))
        slots.append(slot)
    return kept, slots


def answer_slot(answer: object, raw_options: Sequence[object]) -> int | None:
    """The 0-based slot of ``raw_options`` that ``answer`` names (a letter, an option's text or an
    index; see the module docstring), or None."""
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # a Parquet integer column with nulls reads as floats
    if answer is None or isinstance(answer, bool):
        return None
    text = str(answer).strip()
    if match := _ANSWER_LETTER.match(text):
        text = match.group(1)
    texts = [("" if o is None else strip_option_prefix(str(o), i)) for i, o in enumerate(raw_options)]
    letter = answer_letter(text, texts) or answer_letter(text, [str(o) for o in raw_options])
    return None if letter is None else LETTERS.index(letter)


def normalise_question(
    video_key: str,
    video_uri: str,
    question_id: str,
    question: object,
    raw_options: Sequence[object],
    answer: object,
    groups: dict[str, object] | None = None,
    has_answers: bool = True,
) -> Question:
    """A :class:`Question` from one benchmark row's fields, rejected (``error`` set) where it cannot be
    asked or scored. ``has_answers=False``: the benchmark holds none, so no answer is no fault."""
    options, slots = normalise_options(raw_options)
    text = "" if question is None else str(question).strip()
    values = {k: "" if v is None else str(v) for k, v in (groups or {}).items()}
    base = Question(video_key, video_uri, question_id, text, options, None, values)
    if not text:
        return _rejected(base, "empty question")
    if not MIN_OPTIONS <= len(options) <= len(LETTERS):
        return _rejected(base, f"not {MIN_OPTIONS} to {len(LETTERS)} options: {len(options)}")
    if not has_answers:
        return base
    if answer is None or str(answer).strip() == "":
        return _rejected(base, "no answer")
    slot = answer_slot(answer, raw_options)
    if slot is None:
        return _rejected(base, f"answer names no option: {str(answer)[:40]!r}")
    if slot not in slots:
        return _rejected(base, f"answer names an empty (N/A) option: {str(answer)[:40]!r}")
    return _replace(base, answer=LETTERS[slots.index(slot)])


def _rejected(question: Question, reason: str) -> Question:
    return _replace(question, error=reason)


def _replace(question: Question, **changes: object) -> Question:
    return Question(**{**question.__dict__, **changes})


def unique_question_ids(questions: list[Question]) -> list[Question]:
    """The questions with ids unique within each video: a repeated id gets ``_2``, ``_3``, ..."""
    seen: dict[tuple[str, str], int] = {}
    out = []
    for q in questions:
        n = seen[(q.video_key, q.id)] = seen.get((q.video_key, q.id), 0) + 1
        out.append(q if n == 1 else _replace(q, id=f"{q.id}_{n}"))
    return out


def manifest_rows(questions: Iterable[Question], preset: str = "default") -> list[dict]:
    """One manifest row per video, ``{"id", "video_uri", "questions": [...]}``, in first-seen order;
    rejected questions stay out. Each question: ``id``, ``question``, ``options``, ``answer`` (a
    letter), ``groups``. With ``preset="lmms-eval"`` the question text opens with lmms-eval's instruction
    line, so the pipeline's own MCQ layout (``format_mcq_prompt``) gives lmms-eval's prompt."""
    rows: dict[str, dict] = {}
    for q in questions:
        if q.error is not None:
            continue
        text = lmms_eval_question(q.question, len(q.options)) if preset == "lmms-eval" else q.question
        row = rows.setdefault(q.video_key, {"id": q.video_key, "video_uri": q.video_uri, "questions": []})
        assert row["video_uri"] == q.video_uri, f"video {q.video_key} names two files"
        entry = {"id": q.id, "question": text, "options": q.options, "groups": q.groups}
        row["questions"].append(entry if q.answer is None else {**entry, "answer": q.answer})
    return list(rows.values())
