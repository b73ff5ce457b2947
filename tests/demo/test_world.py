"""The procedural world: deterministic from a seed, consistent ground truth, real decodable video files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.demo import world
from pipeline.frames import FrameSampling, sample_indices, segment_centres
from pipeline.prompts import LETTERS, format_mcq_prompt


def test_same_seed_same_clip_and_frames() -> None:
    a, b = world.make_clip(7), world.make_clip(7)
    assert a == b
    assert np.array_equal(world.render_frames(a), world.render_frames(b))
    assert world.caption(a) == world.caption(b) and world.mcq_items(a) == world.mcq_items(b)


def test_different_seeds_differ() -> None:
    captions = {world.caption(world.make_clip(s)) for s in range(20)}
    assert len(captions) > 15


def test_clip_lengths_and_frame_shape() -> None:
    lengths = {world.make_clip(s).num_frames for s in range(200)}
    assert min(lengths) == world.MIN_FRAMES and max(lengths) == world.MAX_FRAMES
    assert all(t % world.FRAME_STEP == 0 for t in lengths)
    frames = world.render_frames(world.make_clip(3, num_frames=48))
    assert frames.shape == (48, world.FRAME_HEIGHT, world.FRAME_WIDTH, 3) and frames.dtype == np.uint8
    with pytest.raises(ValueError, match="even"):
        world.make_clip(3, num_frames=33)


@pytest.mark.parametrize("seed", range(30))
def test_events_are_separated_and_inside_the_clip(seed: int) -> None:
    clip = world.make_clip(seed)
    appear = [t.appear for t in clip.tracks]
    disappear = sorted(t.disappear for t in clip.tracks)
    assert appear == sorted(appear) and len({t.colour for t in clip.tracks}) == len(clip.tracks)
    assert all(b - a >= 2 for a, b in zip(appear[:-1], appear[1:], strict=True))
    assert all(b - a >= 2 for a, b in zip(disappear[:-1], disappear[1:], strict=True))
    assert all(0 <= t.appear < t.disappear < clip.num_frames for t in clip.tracks)
    assert [e.frame for e in clip.events] == sorted(e.frame for e in clip.events)


def _colour_pixels(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frame == np.array(world.COLOURS[colour], dtype=np.uint8), axis=-1)


def test_shapes_visible_exactly_while_alive_and_move_their_way() -> None:
    clip = world.make_clip(11)
    frames = world.render_frames(clip)
    for track in clip.tracks:
        visible = [bool(_colour_pixels(f, track.colour).any()) for f in frames]
        assert visible == [track.appear <= f < track.disappear for f in range(clip.num_frames)]
        first, last = (_colour_pixels(frames[f], track.colour) for f in (track.appear, track.disappear - 1))
        ys0, xs0 = np.nonzero(first)
        ys1, xs1 = np.nonzero(last)
        dx, dy = xs1.mean() - xs0.mean(), ys1.mean() - ys0.mean()
        expected = {"left": dx < -30, "right": dx > 30, "up": dy < -30, "down": dy > 30}
        assert expected[track.motion], (track, dx, dy)


def test_ground_truth_matches_the_script() -> None:
    clip = world.make_clip(5)
    text = world.caption(clip)
    for t in clip.tracks:
        assert f"{t.colour} {t.shape} moves {t.motion}" in text
    answers = {p.question: p.answer for p in world.qa_pairs(clip)}
    assert answers["What colour was the shape that appeared first?"] == clip.tracks[0].colour
    assert answers["What colour was the shape that appeared last?"] == clip.tracks[-1].colour
    assert answers["How many shapes appeared?"] == world.COUNT_WORDS[len(clip.tracks)]
    first_gone = min(clip.tracks, key=lambda t: t.disappear)
    assert answers["What colour was the shape that disappeared first?"] == first_gone.colour


def test_replies_lead_keyed_and_appeared_last_answers_and_end_with_the_answer() -> None:
    """The colour-keyed replies start with their key, the appeared-last reply with the colours before it
    in the caption's order; every other reply is the one-word answer."""
    shapes = set()
    for seed in range(20):
        clip = world.make_clip(seed)
        shapes.add(len(clip.tracks))
        colours = [t.colour for t in clip.tracks]
        replies = {p.question: p.reply for p in world.qa_pairs(clip)}
        for pair in world.qa_pairs(clip):
            assert pair.reply.split()[-1] == pair.answer
        last = "What colour was the shape that appeared last?"
        assert replies[last] == " then ".join(colours)  # "purple then blue", or "purple" alone
        assert replies["What colour was the shape that appeared first?"] == colours[0]
        for t in clip.tracks:
            assert replies[f"What shape was the {t.colour} one?"] == f"{t.colour} {t.shape}"
            assert replies[f"Which way did the {t.colour} shape move?"] == f"{t.colour} {t.motion}"
    assert shapes == {1, 2}  # both kinds of clip were checked


def test_mcq_items_hold_the_answer_once() -> None:
    for seed in range(20):
        clip = world.make_clip(seed)
        for pair, item in zip(world.qa_pairs(clip), world.mcq_items(clip), strict=True):
            assert item.question == pair.question and len(set(item.options)) == len(item.options)
            assert item.options[LETTERS.index(item.answer)] == pair.answer
            assert item.prompt == format_mcq_prompt(item.question, item.options)


def test_heldout_seeds_never_overlap_training_seeds() -> None:
    assert min(world.heldout_seeds(300)) >= world.HELDOUT_SEED_BASE
    assert world.eval_item(world.heldout_seeds(1)[0]) == world.eval_item(world.heldout_seeds(1)[0])


def test_encoded_file_decodes_with_pyav_and_decord(tmp_path) -> None:
    decord = pytest.importorskip("decord")
    frames = world.render_frames(world.make_clip(2, num_frames=32))
    path = world.encode_video(frames, tmp_path / "clip.mp4")
    decoded = world.decode_video(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 4  # lossy, but close
    reader = decord.VideoReader(str(path))
    assert len(reader) == 32 and reader[0].shape == frames.shape[1:]


def test_encode_rejects_odd_sizes(tmp_path) -> None:
    with pytest.raises(ValueError, match="even"):
        world.encode_video(np.zeros((4, 15, 16, 3), dtype=np.uint8), tmp_path / "odd.mp4")


def test_write_sample_dataset(tmp_path) -> None:
    manifest = world.write_sample_dataset(tmp_path / "sample", num_clips=3, seed=0)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["clip_0000", "clip_0001", "clip_0002"]
    for row in rows:
        frames = world.decode_video(row["video_uri"])
        assert frames.shape[0] >= world.MIN_FRAMES and row["video_uri"].startswith("/")
        assert row["answer"] in LETTERS[: len(row["options"])] and len(row["questions"]) == len(
            row["answers"]
        )
    again = world.write_sample_dataset(tmp_path / "again", num_clips=3, seed=0)
    strip = [
        {k: v for k, v in json.loads(line).items() if k != "video_uri"}
        for line in again.read_text().splitlines()
    ]
    assert strip == [{k: v for k, v in r.items() if k != "video_uri"} for r in rows]


def test_events_stay_legible_in_the_pipelines_default_sample() -> None:
    """With PIPELINE_FRAMES frames at segment centres, every shape shows twice and every order is visible."""
    for seed in range(400):
        clip = world.make_clip(seed)
        picks = segment_centres(clip.num_frames, world.PIPELINE_FRAMES)
        for track in clip.tracks:
            assert sum(track.appear <= f < track.disappear for f in picks) >= 2, (seed, track)
        by_disappear = sorted(clip.tracks, key=lambda t: t.disappear)
        for a, b in zip(clip.tracks[:-1], clip.tracks[1:], strict=True):
            assert any(a.appear <= f < b.appear for f in picks), seed
        for a, b in zip(by_disappear[:-1], by_disappear[1:], strict=True):
            assert any(a.disappear <= f < b.disappear for f in picks), seed


def test_the_world_samples_frames_by_the_pipelines_rule_and_renders_them_partially() -> None:
    assert segment_centres(32, 8) == [2, 6, 10, 14, 18, 22, 26, 30]
    assert segment_centres(5, 8) == [0, 1, 2, 3, 4]
    for total in (32, 100, 256):
        assert sample_indices(total, 16.0, FrameSampling(num_frames=8)) == segment_centres(total, 8)
    clip = world.make_clip(4)
    picks = segment_centres(clip.num_frames, 8)
    assert np.array_equal(world.render_frames(clip, picks), world.render_frames(clip)[picks])
    assert np.array_equal(world.sample_frames(world.render_frames(clip), 8), world.render_frames(clip, picks))


def test_a_moving_shape_leaves_its_trail_behind_it() -> None:
    for seed in range(10):
        clip = world.make_clip(seed)
        for track in clip.tracks:
            f = (track.appear + track.disappear) // 2
            bare = world.render_frames(world.Clip(clip.seed, clip.num_frames, tracks=()), [f])[0]
            alone = world.render_frames(world.Clip(clip.seed, clip.num_frames, tracks=(track,)), [f])[0]
            shape = _colour_pixels(alone, track.colour) | _shaded_pixels(alone, track.colour)
            changed = np.any(alone != bare, axis=-1) & ~shape
            ys, xs = np.nonzero(changed)
            cx, cy = track.centre(f)
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[track.motion]
            along = (xs - cx) * dx + (ys - cy) * dy
            assert len(xs) > 50 and np.all(along < 0), (seed, track.motion)


@pytest.mark.parametrize("seed", range(20))
def test_answers_are_sparse_in_time_and_space(seed: int) -> None:
    """Each shape is visible on a minority of the frames, and covers a small part of each frame it is on:
    what an answer depends on is a few visual tokens of a few frames."""
    clip = world.make_clip(seed)
    frames = world.render_frames(clip)
    bare = world.render_frames(world.Clip(clip.seed, clip.num_frames, tracks=()))
    for track in clip.tracks:
        assert track.disappear - track.appear <= world.MAX_LIFE * clip.num_frames + 1
        visible = range(track.appear, track.disappear)
        # a shape covers 4 of the 36 cells (a square 11% of the frame), its trail 1 more
        assert max(_colour_pixels(frames[f], track.colour).mean() for f in visible) <= 1 / 9, (seed, track)
    changed = np.any(frames != bare, axis=-1).mean(axis=(1, 2))  # shapes and trails, per frame
    assert changed.max() <= 5 / 36 * len(clip.tracks) + 1e-9  # under 28% with both shapes on


def _cell_pattern(alone: np.ndarray, track: world.Track) -> tuple[tuple[int, int], np.ndarray]:
    """(the shape's top-left cell, its 2 x 2 cells' colour masks) in ``alone``, a frame of the shape alone."""
    mask = _colour_pixels(alone, track.colour) | _shaded_pixels(alone, track.colour)
    ys, xs = np.nonzero(mask)
    col, row = xs.min() // world.CELL, ys.min() // world.CELL
    box = mask[row * world.CELL : (row + 2) * world.CELL, col * world.CELL : (col + 2) * world.CELL]
    assert box.sum() == mask.sum()  # the whole shape lies inside its 2 x 2 cells
    return (row, col), box


def _shaded_pixels(frame: np.ndarray, colour: str) -> np.ndarray:
    return np.all(frame == np.array(world.shaded_colour(colour), dtype=np.uint8), axis=-1)


def test_shapes_sit_on_the_token_grid_so_each_token_shows_a_fixed_quarter_of_its_form() -> None:
    """The property the world's legibility rests on: a shape's 2 x 2 cells (one merged visual token each)
    hold the same pixels wherever it is, and the three forms' quarters differ; it moves a cell at a time,
    and the trailing half of each of its cells is shaded (so one token shows its direction too)."""
    patterns: dict[str, np.ndarray] = {}
    for seed in range(12):
        clip = world.make_clip(seed)
        for track in clip.tracks:
            cells = []
            for f in range(track.appear, track.disappear):
                alone = world.render_frames(world.Clip(clip.seed, clip.num_frames, tracks=(track,)), [f])[0]
                cell, box = _cell_pattern(alone, track)
                cells.append(cell)
                reference = patterns.setdefault(track.shape, box)
                assert np.array_equal(box, reference), (seed, track.shape, f)
                shaded = _shaded_pixels(alone, track.colour)
                ys, xs = np.nonzero(shaded)
                lead_x, lead_y = xs % world.CELL >= world.CELL // 2, ys % world.CELL >= world.CELL // 2
                trailing = {"right": ~lead_x, "left": lead_x, "down": ~lead_y, "up": lead_y}[track.motion]
                assert shaded.sum() > 0 and trailing.all(), (seed, track.motion)
            steps = {(b[0] - a[0], b[1] - a[1]) for a, b in zip(cells[:-1], cells[1:], strict=True)}
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[track.motion]
            assert steps <= {(0, 0), (dy, dx)} and (dy, dx) in steps, (seed, track)
            travelled = np.abs(np.subtract(cells[-1], cells[0])).sum() * world.CELL
            assert world.MIN_TRAVEL <= travelled <= world.MAX_TRAVEL
    assert set(patterns) == set(world.SHAPES)
    c = world.CELL
    quarters = {
        shape: [box[r * c : (r + 1) * c, q * c : (q + 1) * c].mean() for r in (0, 1) for q in (0, 1)]
        for shape, box in patterns.items()
    }
    assert quarters["square"] == [1.0] * 4
    assert all(0.7 < v < 0.85 for v in quarters["circle"])
    assert all(v < 0.3 for v in quarters["triangle"][:2]) and all(v > 0.7 for v in quarters["triangle"][2:])


def test_mcq_reply_names_the_option_then_its_letter_and_parses_to_the_letter() -> None:
    from pipeline.prompts import parse_mcq_answer

    letters, led = set(), 0
    for seed in range(30):
        clip = world.make_clip(seed)
        for pair, item in zip(world.qa_pairs(clip), world.mcq_items(clip), strict=True):
            word, letter = item.reply.rsplit(" ", 1)
            assert letter == item.answer and word == item.options["ABCD".index(item.answer)] == pair.answer
            assert parse_mcq_answer(item.reply, len(item.options)) == item.answer
            letters.add(item.answer)
            led += bool(pair.lead)  # the QA reply of the same question is led; the MCQ reply is not
    assert letters == set("ABCD") and led > 0  # the answers vary
