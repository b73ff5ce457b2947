"""The annotate stage called directly (no cluster), with a small random model of the demo architecture.

Method: the model is randomly initialised (``initializer_range`` raised, so it writes varied tokens) and
runs in fp32 on CPU, where StD is exact: every row decoded both ways must match dense decoding token for
token (``dense_match``), with the same text. A tiny sparse budget makes drafts wrong often enough that
the match is earned by verification, not by a draft identical to the dense model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pipeline.annotator import Annotator, AnnotatorSettings
from pipeline.frames import FrameDecoder, FrameSampling
from pipeline.prompts import CAPTION_PROMPT, chat_prompt
from pipeline.schema import SCHEMA
from pipeline.sources import Item, items_to_json
from pipeline.storage import StorageOptions
from std_core import StdConfig

MAX_NEW = 12
SPARSE_BUDGET = 4  # far below the prompt: the sparse drafts get rejected sometimes, so matching is earned


@pytest.fixture(scope="module")
def annotator(model_dir: Path) -> Annotator:
    settings = AnnotatorSettings(
        model=str(model_dir),
        model_label="tiny",
        run_id="t1",
        dense_sample=-1,
        max_new_tokens=MAX_NEW,
        std=StdConfig(gamma=3, sparse_budget=SPARSE_BUDGET),
    )
    return Annotator(settings)


def _batch(tmp_path: Path, clip_bytes: dict[str, bytes], videos: dict[str, list[Item]]) -> dict:
    for name in videos:
        (tmp_path / name).write_bytes(clip_bytes[name])
    rows = {
        "video_id": np.array(list(videos), dtype=object),
        "video_uri": np.array([str(tmp_path / n) for n in videos], dtype=object),
        "items": np.array([items_to_json(items) for items in videos.values()], dtype=object),
    }
    return FrameDecoder(FrameSampling(num_frames=4, max_pixels=64 * 64), StorageOptions())(rows)


def _item(video: str, task: str = "caption", **fields: object) -> Item:
    base = {
        "id": f"{video}:{task}",
        "video_id": video,
        "video_uri": video,
        "task": task,
        "prompt": "Describe the video.",
    }
    return Item(**{**base, **fields})


def test_rows_for_good_and_bad_videos(annotator: Annotator, tmp_path: Path, clip_bytes: dict) -> None:
    mcq = _item("green-right.mp4", "mcq", id="g:mcq:0", question="What colour?", options=["red", "green"],
                answer="B", prompt="What colour?\nA. red\nB. green\nAnswer with the option's letter.")  # fmt: skip
    batch = _batch(tmp_path, clip_bytes, {
        "red-left.mp4": [_item("red-left.mp4")],
        "green-right.mp4": [_item("green-right.mp4"), mcq],
        "empty.mp4": [_item("empty.mp4")],
        "short.mp4": [_item("short.mp4", error="no question for task qa")],
    })  # fmt: skip
    table = annotator(batch)
    assert table.schema == SCHEMA
    rows = {r["id"]: r for r in table.to_pylist()}
    assert len(rows) == 5
    assert (
        rows["empty.mp4:caption"]["status"] == "error" and "empty file" in rows["empty.mp4:caption"]["error"]
    )
    assert rows["short.mp4:caption"]["error"] == "no question for task qa"
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 3
    for row in ok:
        assert row["num_frames"] == 4 and row["visual_tokens"] > 0
        assert row["prompt_tokens"] > row["visual_tokens"]
        assert 1 <= row["generated_tokens"] <= MAX_NEW
        assert row["generated_tokens"] <= 1 + row["accepted_tokens"] + row["rounds"]
        assert 0 <= row["accepted_tokens"] <= row["drafted_tokens"]
        assert row["dense_match"] is True and row["dense_text"] == row["text"]  # lossless in fp32
        assert row["decode_seconds"] > 0 and row["dense_decode_seconds"] > 0
        assert (row["decoder"], row["model"], row["run_id"]) == ("std", "tiny", "t1")
    assert sum(r["drafted_tokens"] for r in ok) > sum(r["accepted_tokens"] for r in ok) > 0
    scored = rows["g:mcq:0"]
    assert scored["correct"] == (scored["predicted"] == "B") and scored["options"] == ["red", "green"]


def test_a_failing_item_does_not_take_its_batch_down(
    annotator: Annotator, tmp_path: Path, clip_bytes: dict
) -> None:
    batch = _batch(
        tmp_path, clip_bytes, {"red-left.mp4": [_item("red-left.mp4")], "blue-up.mp4": [_item("blue-up.mp4")]}
    )
    frames = list(batch["frames"])
    frames[1] = np.zeros((2, 2, 600, 3), dtype=np.uint8)  # aspect ratio 300: the processor refuses it
    batch["frames"] = frames
    rows = {r["id"]: r for r in annotator(batch).to_pylist()}
    assert rows["red-left.mp4:caption"]["status"] == "ok"
    assert rows["blue-up.mp4:caption"]["status"] == "error"
    assert rows["blue-up.mp4:caption"]["error"].startswith("generation failed: ValueError")


def test_dense_sample_only_on_the_first_batches(model_dir: Path, tmp_path: Path, clip_bytes: dict) -> None:
    settings = AnnotatorSettings(
        model=str(model_dir), model_label="tiny", run_id="t2", dense_sample=1, max_new_tokens=4
    )
    annotator = Annotator(settings)
    batch = _batch(tmp_path, clip_bytes, {"red-left.mp4": [_item("red-left.mp4")]})
    first, second = annotator(batch).to_pylist()[0], annotator(batch).to_pylist()[0]
    assert first["dense_match"] is True and second["dense_match"] is None
    assert second["dense_decode_seconds"] is None and second["text"] == first["text"]


class _FlipSecondToken:
    """A dense decoder whose row-0 output differs from StD's at generated position 1 (as a bf16 near-tie
    flip would), to check how a divergence is reported."""

    def __init__(self, decoder, prompt_len: int) -> None:
        self.decoder, self.prompt_len = decoder, prompt_len

    def generate(self, **kwargs):
        result = self.decoder.generate(**kwargs)
        sequences = result.sequences.clone()
        sequences[0, self.prompt_len + 1] = (sequences[0, self.prompt_len + 1] + 1) % 50
        return type(result)(sequences=sequences, stats=result.stats)


def test_a_divergence_is_reported_with_position_and_margin(
    annotator: Annotator, tmp_path: Path, clip_bytes
) -> None:
    batch = _batch(
        tmp_path, clip_bytes, {"red-left.mp4": [_item("red-left.mp4")], "blue-up.mp4": [_item("blue-up.mp4")]}
    )
    prompt_len = annotator.processor(
        text=[chat_prompt(annotator.processor, CAPTION_PROMPT)] * 2, videos=[np.array(f) for f in batch["frames"]],
        padding=True, return_tensors="pt")["input_ids"].shape[1]  # fmt: skip
    original = annotator.dense
    annotator.dense = _FlipSecondToken(original, prompt_len)
    try:
        rows = annotator(batch).to_pylist()
    finally:
        annotator.dense = original
    assert [r["dense_match"] for r in rows] == [False, True]
    assert rows[0]["divergence_position"] == 1 and rows[0]["divergence_margin"] >= 0
    assert rows[1]["divergence_position"] is None and rows[0]["text"] != rows[0]["dense_text"]


def test_sampling_is_seeded_and_skips_the_greedy_match_check(
    model_dir: Path, tmp_path: Path, clip_bytes
) -> None:
    settings = AnnotatorSettings(model=str(model_dir), model_label="tiny", run_id="s", dense_sample=-1,
                                 max_new_tokens=8, temperature=1.5, seed=0)  # fmt: skip
    annotator = Annotator(settings)
    batch = _batch(tmp_path, clip_bytes, {"red-left.mp4": [_item("red-left.mp4")]})
    first, again = annotator(batch).to_pylist()[0], annotator(batch).to_pylist()[0]
    annotator.settings = dataclasses.replace(settings, seed=1)
    other = annotator(batch).to_pylist()[0]
    assert first["status"] == "ok" and first["text"] == again["text"]  # the seed fixes the draws
    assert other["text"] != first["text"]
    assert first["dense_match"] is None and first["dense_decode_seconds"] > 0  # timed, not compared


def test_shared_prefill_gives_the_same_rows_as_one_prefill_per_question(
    model_dir: Path, tmp_path: Path, clip_bytes: dict
) -> None:
    """Several questions on each of two videos: with the prefill shared the texts and token counts equal
    one prefill per question (greedy fp32), every row says which path it took, and the dense re-run of
    the shared path agrees token for token."""
    questions = ["What colour is the square?", "Which way does it move?", "Is it a square or a circle?"]

    def items(video: str) -> list[Item]:
        return [
            _item(video, "qa", id=f"{video}:qa:{i}", question=q, prompt=q) for i, q in enumerate(questions)
        ]

    batch = _batch(
        tmp_path, clip_bytes, {"red-left.mp4": items("red-left.mp4"), "blue-up.mp4": items("blue-up.mp4")}
    )
    rows = {}
    for share in (True, False):
        settings = AnnotatorSettings(model=str(model_dir), model_label="tiny", run_id="q", dense_sample=-1,
                                     max_new_tokens=8, std=StdConfig(gamma=3, sparse_budget=SPARSE_BUDGET),
                                     share_prefill=share)  # fmt: skip
        rows[share] = {r["id"]: r for r in Annotator(settings)(batch).to_pylist()}
    assert sorted(rows[True]) == sorted(rows[False]) and len(rows[True]) == 6
    for row_id, shared in rows[True].items():
        alone = rows[False][row_id]
        assert shared["status"] == alone["status"] == "ok"
        assert shared["shared_prefill"] is True and alone["shared_prefill"] is False
        for column in ("text", "generated_tokens", "prompt_tokens", "visual_tokens"):
            assert shared[column] == alone[column], (row_id, column)
        assert shared["dense_match"] is True and alone["dense_match"] is True
    assert len({r["text"] for r in rows[False].values()}) > 1  # the answers vary, so equality is earned
    assert (
        sum(r["drafted_tokens"] > r["accepted_tokens"] for r in rows[True].values()) >= 1
    )  # some rejections
