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


@pytest.mark.parametrize(
    ("text", "num_options", "expected"),
    [
        ("I think it is (C)", 10, "C"),  # the pronoun is no answer, even where I is an option
        ("I think it is C", 10, "C"),
        ("I", 10, "I"),
        ("I.", 10, "I"),
        ("A dog", 3, None),  # the article is no answer
        ("A dog runs left", 3, None),
        ("A", 3, "A"),
        ("A.", 3, "A"),
        ("A) dog", 3, "A"),
        ("A. A dog", 3, "A"),
        ("The answer is A", 3, "A"),
        ("the answer is (B).", 3, "B"),
        ("Answer: A dog", 3, "A"),
        ("Option A, a dog", 3, "A"),
        ("It is A.", 3, "A"),
        ("B is correct", 3, "B"),  # letters that are no English word count wherever they stand
        ("A.M. is when", 3, None),
        ("b", 3, None),  # lowercase letters are words, as before
    ],
)
def test_parse_mcq_answer_reads_whole_option_letters_only(
    text: str, num_options: int, expected: str | None
) -> None:
    assert parse_mcq_answer(text, num_options) == expected


def test_answer_letter_maps_a_zero_based_index() -> None:
    assert [answer_letter(a, ["red", "blue", "green"]) for a in (0, 2, "1", " 2 ")] == ["A", "C", "B", "C"]
    assert answer_letter(3, ["red", "blue", "green"]) is None  # out of range
    assert answer_letter(True, ["red", "blue"]) is None  # a bool is no index
    assert answer_letter("-1", ["red", "blue"]) is None


def test_answer_letter_prefers_an_option_s_text_over_an_index() -> None:
    assert answer_letter("2", ["1", "2", "3"]) == "B"  # the option "2", not index 2
    assert answer_letter(0, ["1", "2", "3"]) == "A"  # no option reads "0": the index


def test_the_mcq_parser_registry_holds_both_rules_and_they_differ_where_lmms_eval_does() -> None:
    from pipeline.prompts import MCQ_PARSERS

    assert set(MCQ_PARSERS) == {"default", "lmms-eval"}
    text = "Answer: (C) because D is wrong"  # lmms-eval takes the first capital A-D: the A of "Answer"
    assert MCQ_PARSERS["default"](text, 4) == "C" and MCQ_PARSERS["lmms-eval"](text, 4) == "A"
    assert all(parse("The best answer is B.", 4) == "B" for parse in MCQ_PARSERS.values())


def test_the_jobs_mcq_parser_reaches_the_actor_settings() -> None:
    from pipeline.config import PipelineConfig
    from pipeline.run import Plan, annotator_settings
    from pipeline.storage import StorageOptions

    plan = Plan("in", StorageOptions(), "r")
    config = PipelineConfig(mcq_parser="lmms-eval", share_prefill="off")
    settings = annotator_settings(config, plan, 0.0)
    assert settings.mcq_parser == "lmms-eval" and settings.share_prefill is False
    with pytest.raises(ValueError, match="mcq_parser"):
        PipelineConfig(mcq_parser="guess")


def test_the_config_knows_every_parser_by_name() -> None:
    from pipeline.config import MCQ_PARSER_NAMES
    from pipeline.prompts import MCQ_PARSERS

    assert set(MCQ_PARSER_NAMES) == set(MCQ_PARSERS)
