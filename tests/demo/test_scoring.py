"""Scoring of the demo world's tasks: each metric rewards the right answer and only the right answer."""

from __future__ import annotations

import pytest

from pipeline import evaluation
from pipeline.demo import scoring, world

TRUTH = "A red circle moves left, then a blue square moves up."


def test_parse_caption_reads_each_clause() -> None:
    mentions = scoring.parse_caption(TRUTH)
    assert [(m.colour, m.shape, m.motion) for m in mentions] == [
        ("red", "circle", "left"),
        ("blue", "square", "up"),
    ]
    assert scoring.parse_caption("") == [] and scoring.parse_caption("<|unk|> . ,") == []


def test_perfect_caption_scores_everything() -> None:
    tally = scoring.Tally()
    tally.add_caption(TRUTH, TRUTH)
    assert tally.summary() == {
        "caption_attributes": 1.0,
        "caption_colour": 1.0,
        "caption_motion": 1.0,
        "caption_order": 1.0,
        "caption_shape": 1.0,
    }


@pytest.mark.parametrize(
    ("generated", "expected"),
    [
        ("A blue square moves up, then a red circle moves left.", (1, 1, 1, 0)),  # order swapped
        ("A red circle moves right, then a blue square moves up.", (1, 1, 0.5, 1)),  # one motion wrong
        ("A red square moves left, then a blue square moves up.", (1, 0.5, 1, 1)),  # one shape wrong
        ("A red circle moves left.", (0.5, 0.5, 0.5, 0)),  # a shape missing
        ("A red circle moves left, then a blue square moves up, then a green square moves up.", (1, 1, 1, 0)),
        ("nothing here", (0, 0, 0, 0)),
    ],
)
def test_caption_errors_cost_the_right_attribute(generated: str, expected: tuple) -> None:
    tally = scoring.Tally()
    tally.add_caption(generated, TRUTH)
    s = tally.summary()
    assert (s["caption_colour"], s["caption_shape"], s["caption_motion"], s["caption_order"]) == expected


def test_qa_and_mcq_scoring() -> None:
    assert scoring.score_qa(" Red.", "red") and not scoring.score_qa("red circle", "red")
    assert scoring.score_mcq("B", "B", 4) and not scoring.score_mcq("(b) is it", "b", 4)
    assert scoring.score_mcq("B.", "b", 4) and not scoring.score_mcq("E", "E", 4)


def test_ground_truth_scores_perfectly_on_world_items() -> None:
    tally = scoring.Tally()
    for seed in world.heldout_seeds(20):
        item = world.eval_item(seed)
        scoring.score_item(
            tally, item, {"caption": item.caption, "qa": item.qa.reply, "mcq": item.mcq.answer}
        )
    assert all(v == 1.0 for v in tally.summary().values())
    assert tally.summary()["qa"] == 1.0 and len(tally.hits["qa"]) == 20


def test_a_led_question_is_scored_on_its_whole_reply() -> None:
    """ "What shape was the blue one?" wants "blue triangle": the bare word "triangle" is scored wrong."""
    items = [world.eval_item(seed) for seed in world.heldout_seeds(60)]
    led = [i for i in items if i.qa.lead]
    assert led and len(led) < len(items)  # both kinds were drawn
    for item in led:
        tally = scoring.Tally()
        scoring.score_item(
            tally, item, {"caption": item.caption, "qa": item.qa.answer, "mcq": item.mcq.answer}
        )
        assert tally.summary()["qa"] == 0.0


def test_generic_metrics_are_defined_once_in_the_evaluation() -> None:
    assert scoring.score_qa is evaluation.score_qa and scoring.score_mcq is evaluation.score_mcq
    assert scoring.normalise_answer is evaluation.normalise_answer
    assert issubclass(scoring.Tally, evaluation.Tally)
