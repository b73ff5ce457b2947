"""The prompts of the three annotation tasks and the chat turn around them, defined once.

The pipeline builds every prompt here, and the demo model is trained on exactly these strings, so a
caption, question or multiple-choice item reads the same at training, annotation and evaluation time.
:func:`chat_prompt` wraps one prompt in the model's own chat template (a user turn holding the video,
then the prompt, then the assistant header): the annotator, the demo's evaluation and training, and the
benchmarks all build the model's text through it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

CAPTION_PROMPT = "Describe the video."
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


def user_message(prompt: str, with_video: bool = True) -> dict:
    """One user turn: the video (first, where ``with_video``), then the prompt's text."""
    content = [{"type": "text", "text": prompt}]
    if with_video:
        content.insert(0, {"type": "video"})
    return {"role": "user", "content": content}


def chat_prompt(processor: object, prompt: str) -> str:
    """The chat-template text of one user turn holding the video and ``prompt``, ready for generation."""
    return processor.apply_chat_template([user_message(prompt)], add_generation_prompt=True, tokenize=False)


def format_mcq_prompt(question: str, options: Sequence[str]) -> str:
    """``question`` then one ``"A. option"`` line per option, then the answer instruction."""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"an MCQ item needs 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [question.strip()]
    lines += [f"{LETTERS[i]}. {option.strip()}" for i, option in enumerate(options)]
    lines.append(MCQ_INSTRUCTION)
    return "\n".join(lines)


# A letter token: an uppercase option letter with no letter on either side (today's case rule).
_LETTER = r"(?<![A-Za-z])([{valid}])(?![A-Za-z])"
_ANSWER_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?:is\s*)?[:\-]?\s*\(?$")
_WORDS = "AI"  # letters that are also English words ("A dog", "I think"): they count only when anchored


def parse_mcq_answer(text: str, num_options: int) -> str | None:
    """The first option letter of a model's answer that reads as an answer, or None.

    A letter token (uppercase, no letter beside it) is *anchored* when it is in parentheses (``"(C)"``),
    followed by ``.``, ``)`` or ``:`` and a space or the end (``"B."``, ``"A) dog"``, ``"A. A dog"``),
    the last token of the text (``"B"``, ``"it is C"``), or after answer-like phrasing (``"answer: A"``,
    ``"the answer is (B)"``, ``"option C"``). The letters that are English words, ``A`` and ``I``, count
    only when anchored: ``"A dog"`` → None and ``"I think it is (C)"`` → ``C`` (with 9+ options, where
    ``I`` is an option); any other letter counts wherever it stands (``"B is correct"`` → ``B``).
    """
    text = text.strip()
    for match in re.finditer(_LETTER.format(valid=LETTERS[:num_options]), text):
        letter, before, after = match.group(1), text[: match.start()], text[match.end() :]
        anchored = (
            (before.endswith("(") and after.startswith(")"))
            or re.match(r"[.):](\s|$)", after) is not None
            or not after.strip(" .!)")
            or _ANSWER_PHRASE.search(before) is not None
        )
        if anchored or letter not in _WORDS:
            return letter
    return None


def answer_letter(answer: str | int, options: Sequence[str]) -> str | None:
    """Normalise a ground-truth answer to its option letter, or None where it names no option.

    In this order: a letter (``"b"`` → ``B``); an option's text (case-insensitive); a 0-based index, as
    an int or a string of digits (``1`` or ``"1"`` → ``B``). An option's text wins over an index: with
    options ``["1", "2", "3"]``, ``"2"`` is ``B`` (the option "2"), not ``C``.
    """
    if isinstance(answer, bool):  # True is an int, but no index
        return None
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in LETTERS[: len(options)]:
        return text.upper()
    for i, option in enumerate(options):
        if str(option).strip().lower() == text.lower():
            return LETTERS[i]
    if text.isascii() and text.isdigit() and int(text) < len(options):
        return LETTERS[int(text)]
    return None


# --- the lmms-eval preset (``jobs.evaluate --prompt-preset lmms-eval``) ----------------------------------
# lmms-eval's Video-MME prompt for Qwen2-VL: this instruction line, the question, the lettered options
# one per line, then MCQ_INSTRUCTION, which is format_mcq_prompt's layout with the instruction in front.
LMMS_EVAL_INSTRUCTION = (
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter ({letters}) of the correct option."
)
LMMS_EVAL_ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
)


def lmms_eval_question(question: str, num_options: int) -> str:
    """The question as lmms-eval's Video-MME prompt opens it: the instruction line, then ``question``;
    ``format_mcq_prompt`` of it gives lmms-eval's whole text (``"(A, B, C, or D)"`` for four options)."""
    letters = list(LETTERS[:num_options])
    named = ", ".join(letters[:-1]) + f", or {letters[-1]}" if len(letters) > 2 else " or ".join(letters)
    return LMMS_EVAL_INSTRUCTION.format(letters=named) + "\n" + question.strip()


def parse_lmms_eval_answer(text: str, num_options: int) -> str | None:
    """lmms-eval's Video-MME answer parsing: strip phrases like "The best answer is", then the first
    option letter anywhere in the text (uppercase; ``"Based on"`` reads as ``B``, as there). None where
    no letter is found, or the text is over ten words without one (lmms-eval's ``""``): never a guess."""
    for prefix in LMMS_EVAL_ANSWER_PREFIXES:
        text = text.replace(prefix, "")
    match = re.search(f"[{LETTERS[:num_options]}]", text.strip())
    return match.group(0) if match else None


McqParser = Callable[[str, int], str | None]
#: How a model's answer text becomes an option letter: the project's own rule, or lmms-eval's (so that
#: benchmark accuracies compare with published ones). ``--mcq-parser`` names one.
MCQ_PARSERS: dict[str, McqParser] = {"default": parse_mcq_answer, "lmms-eval": parse_lmms_eval_answer}
