"""Prompt formatting and MCQ answer parsing."""

import pytest

from pipeline.prompts import answer_letter, format_mcq_prompt, parse_mcq_answer


def test_mcq_prompt_lists_options_with_letters() -> None:
    prompt = format_mcq_prompt("What colour was the square?", ["red", "blue", "green"])
    assert prompt.splitlines()[:4] == ["What colour was the square?", "A. red", "B. blue", "C. green"]


def test_mcq_prompt_rejects_one_option() -> None:
    with pytest.raises(ValueError, match="options"):
        format_mcq_prompt("q", ["only"])


@pytest.mark.parametrize(
    ("text", "expected"), [("B", "B"), ("B.", "B"), ("(C) green", "C"), ("answer: A", "A"), ("none", None)]
)
def test_parse_mcq_answer(text: str, expected: str | None) -> None:
    assert parse_mcq_answer(text, 3) == expected


def test_parse_mcq_answer_ignores_letters_beyond_the_options() -> None:
    assert parse_mcq_answer("D", 3) is None


def test_answer_letter_accepts_letter_or_option_text() -> None:
    assert answer_letter("b", ["red", "blue"]) == "B"
    assert answer_letter("Blue", ["red", "blue"]) == "B"
    assert answer_letter("purple", ["red", "blue"]) is None
