"""The prompts of the three annotation tasks and the chat turn around them, defined once.

The pipeline builds every prompt here, and the demo model is trained on exactly these strings, so a
caption, question or multiple-choice item reads the same at training, annotation and evaluation time.
:func:`chat_prompt` wraps one prompt in the model's own chat template (a user turn holding the video,
then the prompt, then the assistant header): the annotator, the demo's evaluation and training, and the
benchmarks all build the model's text through it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

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


def parse_mcq_answer(text: str, num_options: int) -> str | None:
    """The first standalone option letter in a model's answer (``"B"``, ``"B."``, ``"(B)"``), or None."""
    valid = LETTERS[:num_options]
    match = re.search(rf"(?<![A-Za-z])([{valid}])(?![A-Za-z])", text.strip())
    return match.group(1) if match else None


def answer_letter(answer: str, options: Sequence[str]) -> str | None:
    """Normalise a ground-truth answer given as a letter or as the option text to its letter."""
    answer = answer.strip()
    if len(answer) == 1 and answer.upper() in LETTERS[: len(options)]:
        return answer.upper()
    for i, option in enumerate(options):
        if option.strip().lower() == answer.lower():
            return LETTERS[i]
    return None
