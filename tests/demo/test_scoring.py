"""Scoring of the demo world's tasks: each metric rewards the right answer and only the right answer."""

from __future__ import annotations

import pytest

from pipeline import demo_eval
from pipeline import demo_world as world

TRUTH = "A red circle moves left, then a blue square moves up."


def test_parse_caption_reads_each_clause() -> None:
    mentions = demo_eval.parse_caption(TRUTH)
    assert [(m.colour, m.shape, m.motion) for m in mentions] == [
        ("red", "circle", "left"),
        ("blue", "square", "up"),
    ]
    assert demo_eval.parse_caption("") == [] and demo_eval.parse_caption("<|unk|> . ,") == []


def test_perfect_caption_scores_everything() -> None:
    tally = demo_eval.Tally()
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
    tally = demo_eval.Tally()
    tally.add_caption(generated, TRUTH)
    s = tally.summary()
    assert (s["caption_colour"], s["caption_shape"], s["caption_motion"], s["caption_order"]) == expected


def test_qa_and_mcq_scoring() -> None:
    assert demo_eval.score_qa(" Red.", "red") and not demo_eval.score_qa("red circle", "red")
    assert demo_eval.score_mcq("B", "B", 4) and not demo_eval.score_mcq("(b) is it", "b", 4)
    assert demo_eval.score_mcq("B.", "b", 4) and not demo_eval.score_mcq("E", "E", 4)


def test_ground_truth_scores_perfectly_on_world_items() -> None:
    tally = demo_eval.Tally()
    for seed in world.heldout_seeds(20):
        item = world.eval_item(seed)
        demo_eval.score_item(
            tally, item, {"caption": item.caption, "qa": item.qa.answer, "mcq": item.mcq.answer}
        )
    assert all(v == 1.0 for v in tally.summary().values())
    assert tally.summary()["qa"] == 1.0 and len(tally.hits["qa"]) == 20
