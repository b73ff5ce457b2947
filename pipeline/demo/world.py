"""The procedural video world of the demo model: coloured shapes appear, move and disappear.

A clip is fully determined by its seed (``make_clip(seed)``). It holds 1 or 2 shape tracks; each track
appears at a known frame, moves in a straight line (left, right, up or down) and disappears at a known
frame, before the clip ends. Appearance and disappearance times are distinct and well separated, so
"first" and "last" are unambiguous even after temporal subsampling, and concurrent shapes never overlap.

Every answer depends on specific frames and regions: a shape's colour and form on the frames where it is
visible, its motion on the first and last of those frames, the order of events on when each one happens.
That is what makes a trained model's attention over the visual tokens sparse.

Legibility at the scale the language model reads: a merged visual token covers one CELL (28 px: patch 14,
merge 2). A shape is 2 x 2 cells and sits on the cell grid, moving a whole cell at a time, so each of its
four tokens always shows the same quarter of its form (a square's quarter is solid, a circle's a quarter
disc, a triangle's a thin or a wide wedge): a token's content tells the shape without context. Its
motion is as local: the trailing half of each of its cells is drawn in a darker tone of its colour
(speed shading), and it leaves a dim trail one cell long behind it (like motion blur), so one frame and
one token show which way it goes. The dark background's green level rises steadily through the clip
(like a timestamp overlay).

Outputs: frame arrays (``render_frames``: uint8 ``[T, H, W, 3]``) for training, and H.264 files
(``encode_video``: libx264, yuv420p) plus a manifest (``write_sample_dataset``) for the pipeline.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.frames import segment_centres
from pipeline.prompts import CAPTION_PROMPT, format_mcq_prompt

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 215, 40),
    "purple": (175, 60, 210),
    "white": (235, 235, 235),
}
SHAPES = ("square", "circle", "triangle")
MOTIONS = ("left", "right", "up", "down")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

WORLD_VERSION = 4  # bumped when the world's clips or answers change: cached sample datasets are per version
FRAME_HEIGHT = 168  # 6 x 6 merged tokens of 28 px per temporal patch: 36 visual tokens per 2 frames
FRAME_WIDTH = 168
MIN_FRAMES = 32
MAX_FRAMES = 256
FRAME_STEP = 16  # clip lengths are multiples of this, so clips of one length batch without padding
SHAPE_COUNTS, SHAPE_COUNT_WEIGHTS = (1, 2), (0.4, 0.6)  # shapes per clip and their odds
CELL = 28  # the pixels one merged visual token covers (patch 14 x merge 2), on each side
SHAPE_RADIUS = CELL  # half the side of a shape's bounding box: a shape covers 2 x 2 cells (tokens)
MIN_TRAVEL, MAX_TRAVEL = 2 * CELL, 3 * CELL  # pixels a shape moves over its lifetime (whole cells)
TRAIL_LENGTH = CELL  # a moving shape leaves a dim trail this long behind it (its motion, legible per frame)
MIN_SEPARATION = 3 * CELL  # concurrent shapes' centres stay this far apart along x or y (a cell between)
MIN_GAP = 0.15  # minimum separation of two appearances (or disappearances), as a fraction of the clip
MIN_LIFE, MAX_LIFE = 0.3, 0.5  # a shape's lifetime, as a fraction of the clip
PIPELINE_FRAMES = 8  # the pipeline's default sample: events 1/8 of a clip apart stay in order there
HELDOUT_SEED_BASE = 1_000_000_000  # training seeds lie below, held-out seeds at and above
SAMPLE_SEED_BASE = 2_000_000_000  # seeds of the sample dataset the pipeline embeds


@dataclass(frozen=True)
class Track:
    """One shape: visible on frames ``appear <= f < disappear``, centre moving from ``start`` to ``end``."""

    colour: str
    shape: str
    motion: str
    appear: int
    disappear: int
    start: tuple[float, float]  # (x, y) pixel centre on frame ``appear``
    end: tuple[float, float]  # (x, y) pixel centre on frame ``disappear - 1``

    def centre(self, frame: int) -> tuple[float, float]:
        """Pixel centre (x, y) on ``frame``: on the cell grid, a whole cell at a time, evenly through the
        shape's life (only meaningful while visible)."""
        u = (frame - self.appear) / max(1, self.disappear - 1 - self.appear)
        cells = max(abs(self.end[0] - self.start[0]), abs(self.end[1] - self.start[1])) / CELL
        moved = min(round(u * cells + 1e-9), cells) / max(
            cells, 1
        )  # +1e-9: a half cell rounds up, not to even
        return (
            self.start[0] + moved * (self.end[0] - self.start[0]),
            self.start[1] + moved * (self.end[1] - self.start[1]),
        )


@dataclass(frozen=True)
class Event:
    frame: int
    kind: str  # "appears" or "disappears"
    colour: str
    shape: str


@dataclass(frozen=True)
class QAPair:
    """A question, its one-word answer (what an MCQ option holds) and the words said before it (``lead``).

    The colour-keyed questions ("What shape was the blue one?") are answered with their key first
    (``reply``: "blue triangle"), the order the caption names a shape in ("a blue triangle moves left").
    That splits the keyed lookup in two steps a tiny model learns: copy the key from the question, then
    the word that follows the key in the video. Answered in one word, the lookup stays near guessing
    between the clip's two shapes: measured from scratch on text (caption then question, batch 64),
    0.73-0.84 after 1,600 steps against 0.99 after 400 led; fine-tuning the previous weights on video
    (batch 8), 0.64 after 200 steps against 1.00 led (the model card's probes). The appeared-last
    question is led by the colours before it (:func:`qa_pairs`). Trained so, the committed model answers
    99% of held-out questions, against 82-84% with one-word answers (its card)."""

    question: str
    answer: str
    lead: str = ""

    @property
    def reply(self) -> str:
        """The full expected answer: ``lead`` then ``answer`` ("blue triangle"), or ``answer`` alone."""
        return f"{self.lead} {self.answer}" if self.lead else self.answer


@dataclass(frozen=True)
class MCQItem:
    question: str
    options: tuple[str, ...]
    answer: str  # the option letter

    @property
    def prompt(self) -> str:
        return format_mcq_prompt(self.question, self.options)

    @property
    def reply(self) -> str:
        """The demo model's answer: the option's text, then its letter (``"purple D"``; parsers read the
        last token ``D``). Naming the answer first makes the letter a copy from the matching option line
        (the letter two tokens before that option's text) instead of a lookup in one step, and predicting
        the letter right after the word leaves the copy one step fewer than ``"purple (D)"`` (the letter
        after a ``(``). Measured, text-only drills of this copy from scratch (batch 64, teacher-forced
        letter accuracy on 256 held-out items): ``"purple (D)"`` 30% after 400 steps (chance 27%);
        ``"purple D"`` 73% after 800; ``"purple D"`` with the next-token loss on the whole prompt 92% after
        800, which is what :func:`pipeline.demo.training.drill_batch` trains. Unlike QA replies
        (``QAPair.lead``), MCQ replies are not led: with the QA leads in MCQ replies too (``"blue triangle
        C"``, ``"purple then blue C"``), a run's drill reached 84% letter accuracy instead of 98%, and its
        teacher-forced held-out MCQ stayed at 0.25 through 1,000 video steps (0.84 without; the model
        card)."""
        return f"{self.options['ABCD'.index(self.answer)]} {self.answer}"


@dataclass(frozen=True)
class Clip:
    """A clip's script: everything needed to render it and to state its ground truth."""

    seed: int
    num_frames: int
    tracks: tuple[Track, ...]  # sorted by appearance
    height: int = FRAME_HEIGHT
    width: int = FRAME_WIDTH

    @property
    def events(self) -> list[Event]:
        """Appearances and disappearances, in time order."""
        events = [Event(t.appear, "appears", t.colour, t.shape) for t in self.tracks]
        events += [Event(t.disappear, "disappears", t.colour, t.shape) for t in self.tracks]
        return sorted(events, key=lambda e: e.frame)


# ---------------------------------------------------------------------------------------------------
# Sampling a clip's script
# ---------------------------------------------------------------------------------------------------


def make_clip(seed: int, num_frames: int | None = None) -> Clip:
    """The clip of ``seed`` (deterministic). ``num_frames`` overrides the sampled length (any even T >= 16)."""
    rng = np.random.default_rng(seed)
    lengths = np.arange(MIN_FRAMES, MAX_FRAMES + 1, FRAME_STEP)
    sampled_length = int(rng.choice(lengths))
    length = sampled_length if num_frames is None else num_frames
    if length < 16 or length % 2:
        raise ValueError(f"num_frames must be an even number >= 16, got {length}")
    n = int(rng.choice(list(SHAPE_COUNTS), p=SHAPE_COUNT_WEIGHTS))
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    spans = _sample_spans(rng, n, length)
    tracks: list[Track] = []
    while len(tracks) < n:  # a track that finds no clear path sends the clip back to its first track
        appear, disappear = spans[len(tracks)]
        track = _place_track(rng, str(colours[len(tracks)]), appear, disappear, tracks)
        tracks = [*tracks, track] if track is not None else []
    return Clip(seed=seed, num_frames=length, tracks=tuple(tracks))


def _sample_spans(rng: np.random.Generator, n: int, length: int) -> list[tuple[int, int]]:
    """``n`` (appear, disappear) frame pairs: appearances and disappearances each separated by MIN_GAP."""
    while True:
        appear = np.sort(rng.uniform(0.0, 0.6, size=n))
        life = rng.uniform(MIN_LIFE, MAX_LIFE, size=n)
        disappear = np.minimum(appear + life, 0.97)
        if _separated(appear) and _separated(np.sort(disappear)):
            return [(int(a * length), int(d * length)) for a, d in zip(appear, disappear, strict=True)]


def _separated(times: np.ndarray) -> bool:
    return bool(np.all(np.diff(times) >= MIN_GAP))


def _place_track(
    rng: np.random.Generator, colour: str, appear: int, disappear: int, others: list[Track]
) -> Track | None:
    """A track with a random shape, direction and path on the cell grid that stays in frame and clear of
    ``others``; None when 100 tries find none (``others`` leave it no room)."""
    cols, rows = FRAME_WIDTH // CELL, FRAME_HEIGHT // CELL
    for _ in range(100):
        motion = str(rng.choice(MOTIONS))
        cells = int(rng.integers(MIN_TRAVEL // CELL, MAX_TRAVEL // CELL + 1))
        dx, dy = _STEP[motion]
        # the shape's top-left cell; it spans 2 cells and moves ``cells`` cells along (dx, dy)
        x0 = int(rng.integers(max(0, -dx) * cells, cols - 2 - max(0, dx) * cells + 1))
        y0 = int(rng.integers(max(0, -dy) * cells, rows - 2 - max(0, dy) * cells + 1))
        start = (float((x0 + 1) * CELL), float((y0 + 1) * CELL))
        track = Track(
            colour=colour,
            shape=str(rng.choice(SHAPES)),
            motion=motion,
            appear=appear,
            disappear=disappear,
            start=start,
            end=(start[0] + dx * cells * CELL, start[1] + dy * cells * CELL),
        )
        if all(_clear(track, other) for other in others):
            return track
    return None


def _clear(a: Track, b: Track) -> bool:
    """True when ``a`` and ``b`` keep a free cell between them (and their trails) on every frame both are
    visible."""
    frames = range(max(a.appear, b.appear), min(a.disappear, b.disappear))
    return all(np.max(np.abs(np.subtract(a.centre(f), b.centre(f)))) >= MIN_SEPARATION for f in frames)


# ---------------------------------------------------------------------------------------------------
# Rendering and encoding
# ---------------------------------------------------------------------------------------------------


def render_frames(clip: Clip, indices: Sequence[int] | None = None) -> np.ndarray:
    """The clip's frames (all, or those at ``indices``), uint8 ``[T, H, W, 3]`` RGB."""
    indices = range(clip.num_frames) if indices is None else indices
    yy, xx = np.mgrid[0 : clip.height, 0 : clip.width].astype(np.float32)
    frames = np.empty((len(indices), clip.height, clip.width, 3), dtype=np.uint8)
    for i, f in enumerate(indices):
        frame = _background(yy, xx, f / max(1, clip.num_frames - 1))
        visible = [t for t in clip.tracks if t.appear <= f < t.disappear]
        for track in visible:  # trails first, so no trail ever covers a shape
            trail = _trail_mask(track.motion, *track.centre(f), yy, xx)
            frame[trail] = (frame[trail] + np.array(COLOURS[track.colour])) // 2
        for track in visible:
            cx, cy = track.centre(f)
            mask = shape_mask(track.shape, cx, cy, yy, xx)
            shaded = mask & _shading_mask(track.motion, yy, xx)
            frame[mask & ~shaded] = COLOURS[track.colour]
            frame[shaded] = shaded_colour(track.colour)
        frames[i] = frame
    return frames


SHADE = 0.55  # the trailing half of each of a moving shape's cells is drawn at this share of its colour


def shaded_colour(colour: str) -> tuple[int, int, int]:
    """The darker tone of ``colour`` on the trailing half of each of a shape's cells (same hue)."""
    return tuple(int(SHADE * c) for c in COLOURS[colour])


def _shading_mask(motion: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The trailing half of every cell for a shape moving ``motion`` (left: each cell's right half)."""
    dx, dy = _STEP[motion]
    x_in, y_in = xx % CELL, yy % CELL
    if dx:
        return x_in < CELL // 2 if dx > 0 else x_in >= CELL // 2
    return y_in < CELL // 2 if dy > 0 else y_in >= CELL // 2


def _background(yy: np.ndarray, xx: np.ndarray, progress: float) -> np.ndarray:
    """Flat dark background whose green level rises with clip progress (the clip's clock)."""
    frame = np.empty((*yy.shape, 3), dtype=np.uint8)
    frame[..., 0] = 20
    frame[..., 1] = 15 + 50 * progress
    frame[..., 2] = 20
    return frame


def _trail_mask(motion: str, cx: float, cy: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A band half a shape wide and TRAIL_LENGTH long behind a shape moving ``motion`` from (cx, cy)."""
    dx, dy = _STEP[motion]
    px, py = xx + 0.5 - cx, yy + 0.5 - cy  # pixel centres relative to the shape's centre
    along = px * dx + py * dy  # > 0 ahead of the centre, < 0 behind it
    across = np.abs(px * dy - py * dx)
    return (along <= 0) & (along >= -(SHAPE_RADIUS + TRAIL_LENGTH)) & (across <= SHAPE_RADIUS / 2)


def shape_mask(shape: str, cx: float, cy: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The pixels (``yy``, ``xx`` grids) of ``shape`` centred at (cx, cy); its bounding box is exactly 2 x 2
    cells when (cx, cy) lies on the cell grid."""
    r = SHAPE_RADIUS
    px, py = xx + 0.5 - cx, yy + 0.5 - cy  # pixel centres relative to the shape's centre
    if shape == "square":
        return (np.abs(px) <= r) & (np.abs(py) <= r)
    if shape == "circle":
        return px**2 + py**2 <= r**2
    if shape == "triangle":  # apex up, base down; half-width grows linearly from 0 to r
        return (np.abs(py) <= r) & (np.abs(px) <= (py + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def encode_video(frames: np.ndarray, target: str | Path | io.BytesIO, fps: int = 16) -> Path | io.BytesIO:
    """Write ``frames`` (uint8 ``[T, H, W, 3]``, even H and W) as H.264 (libx264, yuv420p) MP4."""
    import av

    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    is_buffer = isinstance(target, io.BytesIO)
    with av.open(target if is_buffer else str(target), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "fast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return target if is_buffer else Path(target)


def sample_frames(frames: np.ndarray, count: int | None) -> np.ndarray:
    """``count`` frames picked as the pipeline picks them (``segment_centres``); ``None`` keeps all."""
    return frames if count is None else frames[segment_centres(len(frames), count)]


def decode_video(source: str | Path | io.BytesIO) -> np.ndarray:
    """Every frame of a video file (path or file object) decoded with PyAV, uint8 ``[T, H, W, 3]`` RGB."""
    import av

    with av.open(source if isinstance(source, io.BytesIO) else str(source)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def codec_roundtrip(frames: np.ndarray) -> np.ndarray:
    """``frames`` as the pipeline sees them: encoded to H.264 in memory and decoded back."""
    buffer = io.BytesIO()
    encode_video(frames, buffer)
    buffer.seek(0)
    return decode_video(buffer)


# ---------------------------------------------------------------------------------------------------
# Ground truth: caption, QA pairs, MCQ items
# ---------------------------------------------------------------------------------------------------


def caption(clip: Clip) -> str:
    """The shapes in order of appearance: ``"A red circle moves left, then a blue square moves up."``."""
    parts = [f"a {t.colour} {t.shape} moves {t.motion}" for t in clip.tracks]
    text = ", then ".join(parts) + "."
    return text[0].upper() + text[1:]


def qa_pairs(clip: Clip) -> list[QAPair]:
    """Every question the world asks about ``clip``, each with its one-word answer and what is said before
    it (``lead``): a colour-keyed question's key ("blue triangle"), and before the shape that appeared last
    the colours that appeared before it ("purple then blue"), the caption's order, which the model gets
    right, so the question's "last" decides only whether the reply goes on after the first colour."""
    by_appear = clip.tracks
    by_disappear = sorted(clip.tracks, key=lambda t: t.disappear)
    earlier = " then ".join(t.colour for t in by_appear[:-1]) + " then" if len(by_appear) > 1 else ""
    pairs = [
        QAPair("What colour was the shape that appeared first?", by_appear[0].colour),
        QAPair("What colour was the shape that appeared last?", by_appear[-1].colour, lead=earlier),
        QAPair("What colour was the shape that disappeared first?", by_disappear[0].colour),
        QAPair("How many shapes appeared?", COUNT_WORDS[len(clip.tracks)]),
    ]
    for t in clip.tracks:
        pairs.append(QAPair(f"Which way did the {t.colour} shape move?", t.motion, lead=t.colour))
        pairs.append(QAPair(f"What shape was the {t.colour} one?", t.shape, lead=t.colour))
    return pairs


def mcq_items(clip: Clip) -> list[MCQItem]:
    """One multiple-choice item per QA pair, options shuffled deterministically from the clip's seed."""
    rng = np.random.default_rng([clip.seed, 1])
    clip_colours = [t.colour for t in clip.tracks]
    items = []
    for pair in qa_pairs(clip):
        options = _options(rng, pair.answer, clip_colours)
        items.append(MCQItem(pair.question, options, "ABCD"[options.index(pair.answer)]))
    return items


def _options(rng: np.random.Generator, answer: str, clip_colours: list[str]) -> tuple[str, ...]:
    """Four options (three for shapes) holding ``answer``; colour distractors prefer the clip's colours."""
    if answer in SHAPES:
        pool = list(SHAPES)
    elif answer in MOTIONS:
        pool = list(MOTIONS)
    elif answer in COUNT_WORDS:
        pool = list(COUNT_WORDS[1:])
    else:
        others = [c for c in clip_colours if c != answer]
        rest = [c for c in rng.permutation(list(COLOURS)) if c != answer and c not in others]
        pool = [answer, *others, *rest][:4]
    return tuple(str(o) for o in rng.permutation(pool))


# ---------------------------------------------------------------------------------------------------
# Held-out items and the sample dataset
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One held-out clip with one item of each task (chosen deterministically from its seed)."""

    clip: Clip
    caption: str
    qa: QAPair
    mcq: MCQItem

    @property
    def prompts(self) -> dict[str, str]:
        return {"caption": CAPTION_PROMPT, "qa": self.qa.question, "mcq": self.mcq.prompt}


def eval_item(seed: int, num_frames: int | None = None) -> EvalItem:
    """The clip of ``seed`` with its caption, one QA pair and one MCQ item."""
    clip = make_clip(seed, num_frames)
    rng = np.random.default_rng([seed, 2])
    pairs, items = qa_pairs(clip), mcq_items(clip)
    return EvalItem(clip, caption(clip), pairs[rng.integers(len(pairs))], items[rng.integers(len(items))])


def heldout_seeds(count: int, offset: int = 0) -> list[int]:
    """Seeds of held-out clips: never used by training (which draws seeds below HELDOUT_SEED_BASE)."""
    return [HELDOUT_SEED_BASE + offset + i for i in range(count)]


def write_sample_dataset(out_dir: str | Path, num_clips: int = 8, seed: int = 0, questions: int = 3) -> Path:
    """Write ``num_clips`` clips as ``.mp4`` plus ``manifest.jsonl``; return the manifest's path.

    Each row: ``video_uri`` (absolute path), ``id``, ``questions`` (up to ``questions`` of those the
    world asks about the clip) with their ground-truth
    ``answers``, ``caption`` (ground truth), and one MCQ item as ``question``, ``options``, ``answer``
    (a letter). The clips are held-out clips of the world (seeds never used in training).
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_clips):
        item = eval_item(SAMPLE_SEED_BASE + seed * 100_000 + i)
        video = encode_video(render_frames(item.clip), out / f"clip_{i:04d}.mp4")
        pairs = qa_pairs(item.clip)[:questions]
        rows.append(
            {
                "video_uri": str(video),
                "id": f"clip_{i:04d}",
                "caption": item.caption,
                "questions": [p.question for p in pairs],
                "answers": [p.reply for p in pairs],
                "question": item.mcq.question,
                "options": list(item.mcq.options),
                "answer": item.mcq.answer,
            }
        )
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest
