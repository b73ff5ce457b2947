"""The annotate stage: a callable class for ``map_batches`` that hosts one model and its StD decoder.

Ray builds one :class:`Annotator` per actor (the model loads once, in ``__init__``) and calls it with
batches of decoded videos. Each video carries its task items (one caption, or one item per question);
all items of a batch are generated together, left padded. Output: one row of
:data:`pipeline.schema.SCHEMA` per item, errors included:

- a video that failed to decode gives one error row per item, with the decoder's reason;
- an item that cannot run (an MCQ without options) gives an error row;
- if a whole generate call raises (say, out of memory), its items are retried one at a time, and an
  item that still fails becomes an error row. Nothing raises out of ``__call__``, so Ray never fails the
  job for one bad video; a *crash* of the actor process is Ray's to handle (restart, retry the batch).

Dense sample: for the first ``dense_sample`` batches of each actor (every batch with -1), the same
inputs are decoded again with ``mode="dense"``, giving ``dense_decode_seconds`` (the speedup) and
``dense_match`` (the lossless check) on those rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import AnnotatorSettings
from pipeline.models import load_model, resolve_model
from pipeline.prompts import MCQ_PARSERS, chat_prompt
from pipeline.questions import processor_kwargs, question_inputs
from pipeline.schema import STATUS_ERROR, STATUS_OK, to_table
from pipeline.sources import Item, items_from_json
from std_core.config import StdConfig


@dataclass
class _Work:
    """One runnable item with its video's frames and the video-level columns."""

    item: Item
    frames: np.ndarray  # [T, H, W, 3] uint8
    base: dict


class Annotator:
    """Callable class for ``map_batches``: loads the model once, turns video batches into result rows."""

    def __init__(self, settings: AnnotatorSettings) -> None:
        from std_core import SparseToDenseDecoder

        self.settings = settings
        self.device = "cuda" if settings.use_gpu and torch.cuda.is_available() else "cpu"
        path = resolve_model(settings.model, settings.storage)
        self.model, self.processor = load_model(path, settings.dtype, self.device)
        self.decoder = SparseToDenseDecoder(self.model, settings.std)
        self.dense = SparseToDenseDecoder(self.model, StdConfig(mode="dense"))
        self.batches_done = 0
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny generate per decoder, so one-time costs (allocator, kernels) do not land in the
        first batch's timing and bias the dense-sample speedup."""
        frames = np.random.default_rng(0).integers(0, 255, size=(2, 56, 56, 3), dtype=np.uint8)
        inputs = self.inputs(
            [_Work(Item(id="", video_id="", video_uri="", task="caption", prompt="."), frames, {})]
        )
        for decoder in (self.decoder, self.dense):
            decoder.generate(**inputs, max_new_tokens=2)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows, work = [], []
        for i in range(len(batch["video_id"])):
            base = {
                "num_frames": int(batch["num_frames"][i]),
                "frame_seconds": float(batch["frame_seconds"][i]),
                "decoder": self.settings.std.mode,
                "model": self.settings.model_label,
                "run_id": self.settings.run_id,
            }
            for item in items_from_json(str(batch["items"][i])):
                problem = item.error or str(batch["frame_error"][i])
                if problem:
                    rows.append(_error_row(item, base, problem))
                else:
                    work.append(_Work(item, np.array(batch["frames"][i]), base))  # a writable copy
        sample = self.settings.dense_sample
        compare = self.settings.std.mode != "dense" and (sample < 0 or self.batches_done < sample)
        step = self.settings.max_items_per_call
        for start in range(0, len(work), step):
            rows += self._run_safely(work[start : start + step], compare)
        self.batches_done += 1
        return to_table(rows)

    def _run_safely(self, work: list[_Work], compare: bool) -> list[dict]:
        """Generate for ``work`` at once; if that raises, item by item, so one failure stays one row."""
        try:
            return self.run(work, compare)
        except Exception as exc:
            if len(work) == 1:
                return [
                    _error_row(work[0].item, work[0].base, f"generation failed: {type(exc).__name__}: {exc}")
                ]
        return [row for one in work for row in self._run_safely([one], compare)]

    def run(self, work: list[_Work], compare: bool) -> list[dict]:
        """Result rows for ``work`` (generated together); with ``compare``, also decoded densely. With
        ``share_prefill``, where a video has several questions here, each video is prefilled once."""
        videos = _by_video(work)
        if self.settings.share_prefill and len(videos) < len(work):
            return self._run_shared(videos, compare)
        inputs = self.inputs(work)

        def padded(decoder: object, **kwargs: object) -> object:
            return decoder.generate(**inputs, **kwargs)

        result, seconds = self._generate(padded, self.decoder)
        prompt_tokens = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        rows = self._rows(work, result, seconds, inputs["input_ids"].shape[1], prompt_tokens, shared=False)
        if compare:
            dense, dense_seconds = self._generate(padded, self.dense)
            greedy = self.settings.temperature == 0
            divergences = (
                _divergences(self.model, inputs, result.sequences, dense.sequences) if greedy else None
            )
            self._compare_dense(
                result.sequences, dense, dense_seconds, inputs["input_ids"].shape[1], rows, divergences
            )
        return rows

    def _run_shared(self, videos: list[list[_Work]], compare: bool) -> list[dict]:
        """Every video's questions from one prefill of the video (``std_core.generate_shared``)."""
        from std_core import generate_shared

        prompts = [question_inputs(self.processor, group[0].frames, [w.item.prompt for w in group], self.device)
                   for group in videos]  # fmt: skip
        work = [one for group in videos for one in group]

        def shared(decoder: object, **kwargs: object) -> object:
            return generate_shared(decoder, prompts, **kwargs)

        result, seconds = self._generate(shared, self.decoder)
        prompt_tokens = [int(q["input_ids"].shape[1]) for group in prompts for q in group]
        prompt_len = max(prompt_tokens)  # the outputs are left padded to the longest prompt
        rows = self._rows(work, result, seconds, prompt_len, prompt_tokens, shared=True)
        if compare:
            dense, dense_seconds = self._generate(shared, self.dense)
            self._compare_dense(result.sequences, dense, dense_seconds, prompt_len, rows, None)
        return rows

    def _rows(
        self,
        work: list[_Work],
        result: object,
        seconds: float,
        prompt_len: int,
        prompt_tokens: list[int],
        shared: bool,
    ) -> list[dict]:
        """One ok row per item of ``work`` from a ``GenerateResult`` whose prompts are ``prompt_len`` wide."""
        texts = self.processor.batch_decode(result.sequences[:, prompt_len:], skip_special_tokens=True)
        share = seconds / len(work)
        rows = []
        for i, one in enumerate(work):
            row_stats = result.stats.rows[i]
            rows.append(
                {
                    **_item_columns(one.item),
                    **one.base,
                    **_answer_columns(one.item, texts[i].strip(), self.settings.mcq_parser),
                    "status": STATUS_OK,
                    "visual_tokens": result.stats.visual_tokens[i],
                    "prompt_tokens": prompt_tokens[i],
                    "generated_tokens": row_stats.generated,
                    "drafted_tokens": row_stats.drafted,
                    "accepted_tokens": row_stats.accepted,
                    "rounds": row_stats.rounds,
                    "decode_seconds": share,
                    "shared_prefill": shared,
                    "created_at": datetime.now(timezone.utc),
                }
            )
        return rows

    def inputs(self, work: list[_Work]) -> dict:
        """Processor inputs for ``work``: the chat template around each prompt, frames as videos."""
        texts = [chat_prompt(self.processor, one.item.prompt) for one in work]
        videos = [one.frames for one in work]
        batch = self.processor(
            text=texts, videos=videos, padding=True, return_tensors="pt", **processor_kwargs(self.processor)
        )
        return {key: value.to(self.device) for key, value in batch.items()}

    def _generate(self, call: Callable[..., object], decoder: object) -> tuple[object, float]:
        """``call(decoder, **generation kwargs)``, timed (synchronised on CUDA)."""
        kwargs: dict = {"max_new_tokens": self.settings.max_new_tokens}
        if self.settings.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(self.settings.seed)
            kwargs.update(do_sample=True, temperature=self.settings.temperature, generator=generator)
        _sync(self.device)
        start = time.perf_counter()
        result = call(decoder, **kwargs)
        _sync(self.device)
        return result, time.perf_counter() - start

    def _compare_dense(
        self, sequences: torch.Tensor, dense: object, seconds: float, prompt_len: int, rows: list[dict],
        divergences: list | None,
    ) -> None:  # fmt: skip
        """Per-row dense time share, token equality with the dense decode, first divergence."""
        greedy = self.settings.temperature == 0
        texts = self.processor.batch_decode(dense.sequences[:, prompt_len:], skip_special_tokens=True)
        for i, row in enumerate(rows):
            row["dense_decode_seconds"] = seconds / len(rows)
            row["dense_text"] = texts[i].strip()
            if not greedy:
                continue
            row["dense_match"] = _same_tokens(sequences[i], dense.sequences[i], self.processor)
            found = divergences[i] if divergences else None
            if found is not None:
                row["divergence_position"] = int(found.position)
                row["divergence_margin"] = float(found.margin)


def _by_video(work: list[_Work]) -> list[list[_Work]]:
    """``work`` grouped by video, in first-seen order (the items of one video share its frames)."""
    groups: dict[str, list[_Work]] = {}
    for one in work:
        groups.setdefault(one.item.video_id, []).append(one)
    return list(groups.values())


def _divergences(model: torch.nn.Module, inputs: dict, a: torch.Tensor, b: torch.Tensor) -> list | None:
    """``std_core.first_divergence`` per row, or None where this std_core does not provide it."""
    try:
        from std_core import first_divergence
    except ImportError:
        return None
    with torch.inference_mode():
        return first_divergence(model, inputs, a, b)


def _same_tokens(a: torch.Tensor, b: torch.Tensor, processor: object) -> bool:
    """Equal up to trailing padding (rows of a batch end at different lengths)."""
    pad = processor.tokenizer.pad_token_id
    a, b = a.tolist(), b.tolist()
    while a and a[-1] == pad:
        a.pop()
    while b and b[-1] == pad:
        b.pop()
    return a == b


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _item_columns(item: Item) -> dict:
    return {
        "id": item.id,
        "video_id": item.video_id,
        "video_uri": item.video_uri,
        "task": item.task,
        "question": item.question,
        "options": item.options or None,
        "answer": item.answer,
    }


def _answer_columns(item: Item, text: str, parser: str = "default") -> dict:
    if item.task != "mcq":
        return {"text": text}
    predicted = MCQ_PARSERS[parser](text, len(item.options))
    correct = None if item.answer is None else predicted == item.answer
    return {"text": text, "predicted": predicted, "correct": correct}


def _error_row(item: Item, base: dict, error: str) -> dict:
    return {
        **_item_columns(item),
        **base,
        "status": STATUS_ERROR,
        "error": error,
        "created_at": datetime.now(timezone.utc),
    }
