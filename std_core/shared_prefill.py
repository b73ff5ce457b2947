"""Many questions, one video: prefill each video once, then decode all its questions as one batch.

A question's full chat prompt is a *prefix* (system/user header + the video's tokens, up to and
including the last visual or vision-end token) that every question about that video shares, then its
own *suffix* (question text + assistant header). :func:`generate_shared` runs

1. **once per video**: the vision tower and the dense prefill of the prefix (batch 1, the model's own
   attention), exactly as the first part of the full prompt's prefill;
2. **once for all questions**: the batch's dense cache is a
   :class:`~std_core.prefix_cache.SharedPrefixCache`: it keeps every video's prefix KV where its
   prefill wrote it (once per video) and gives each question a row of its own slots. One forward
   prefills every row's suffix into its own slots, attending to its video's prefix and its own causal
   suffix (two attention parts merged exactly by log-sum-exp, the video's questions' queries stacked
   against its one prefix). Suffixes are right padded in the forward and the padding is rolled back
   at once. Selection and the draft address row b's prompt in *virtual* slots: prefix ``[0, P_b)``,
   suffix ``[P_b, P_b + S_b)``;
3. **per question**: its own top-K visual selection per layer and KV head, from its own text queries
   (:class:`~std_core.selection.SharedPrefixObserver`: the prefix's score queries plus the question's,
   exactly the tokens that score the visual keys in the full prompt);
4. the rounds of draft / verify / accept / roll back of :class:`~std_core.decoder.SparseToDenseDecoder`,
   every question a row with its own acceptance. The draft's sparse cache is gathered once from the
   prefix storage and the own slots; verifies and dense rounds attend to prefix + own slots as the
   suffixes' prefill did (:func:`std_core.attention.shared_prefix`).

Positions: every question's M-RoPE (or 1-D) positions are ``generate``'s own for its full prompt
(``_prepare_position_ids_for_generation``, Qwen's ``get_rope_index``); the prefix and suffix
forwards use the slices of them, so a suffix continues from the video exactly as in the full prompt.

Lossless: in fp32 each question's greedy tokens equal ``model.generate`` on its full prompt. The
prefix and suffix forwards reduce in a different order than one forward over the whole prompt, so in
bf16/fp16 a near-tie may flip; :func:`std_core.first_divergence` on that question's full prompt
reports the dense logit margin there.

Memory: the dense cache holds, per layer, each video's prefix once (``[1, KVH, P_v + 1, D]``, the
prefill's own buffer) and ``[Q, KVH, max S + max_new_tokens + γ + 1, D]`` of own slots, so a call
needs about ``(Σ_v P_v + Q × (S + max_new_tokens)) × KV bytes per token``, plus the sparse cache
(``Q × budget``), one prefix's prefill activations, and transient fp32 attention scores of at most
64 MiB per chunk of rows (``std_core.prefix_cache._ATTEND_CHUNK_BYTES``). ``copy_prefix=True`` keeps
the earlier layout, a copy of the video's prefix in every question's row (``Q × (P + S +
max_new_tokens)``, as Q separate rows would hold), for measuring and as a fallback. A caller still
bounds a call by passing at most ``n`` questions (chunks of a video's questions, each chunk re-running
that video's prefix once); with the shared layout a chunk's dense cache grows by a question's own
slots, not by a prefix.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from std_core.attention import attention_phase, shared_prefix
from std_core.auto import AutoSchedule, RoundSchedule, shape_bucket
from std_core.decoder import GenerateResult, SparseToDenseDecoder, _CustomGenerate, _Decode
from std_core.kv_cache import SlotCache
from std_core.models import ModelSpec
from std_core.prefix_cache import NoCopyPrefixObserver, SharedPrefixCache
from std_core.selection import PromptLayout, SharedPrefixObserver
from std_core.validation import validate_generate_inputs

# Processor outputs that are the prompt's tokens; every other tensor belongs to the video (pixels, grids).
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
# Video tensors that ``generate``'s position computation reads, one entry per video in the batch.
_POSITION_KEYS = ("video_grid_thw", "image_grid_thw", "second_per_grid_ts")

Question = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class SharedPrompt:
    """Q full prompts (rows b, video by video) split into shared prefixes and per-question suffixes.

    "Slots" are the dense cache's: row b holds its prefix in ``[0, P_b)``, its suffix in
    ``[P_b, P_b + S_b)``. Position tensors are ``[R, ..., len]`` (R = 4 for Qwen's M-RoPE, with
    ``generate``'s text row first) or ``[..., len]`` for 1-D RoPE.
    """

    prefix_ids: list[torch.Tensor]  # per video: [1, P_v]
    prefix_kwargs: list[dict]  # per video: its video tensors, mm_token_type_ids, position_ids [.., 1, P_v]
    video_of_row: list[int]  # [Q] the video whose prefix row b continues
    suffix_ids: torch.Tensor  # [Q, S] right padded
    suffix_lengths: list[int]  # [Q] S_b >= 1
    suffix_positions: torch.Tensor  # [(R,) Q, S] each suffix token's position in its full prompt
    slot_ids: torch.Tensor  # [Q, max P + S] the token in each dense-cache slot
    slot_valid: torch.Tensor  # [Q, max P + S] bool: slot holds a prompt token
    input_ids: torch.Tensor  # [Q, L] the full prompts, left padded (the output's prompt part)
    attention_mask: torch.Tensor  # [Q, L]
    position_ids: torch.Tensor  # [(R,) Q, L] generate's prompt positions, left padded

    @property
    def prefix_lengths(self) -> list[int]:
        """``[Q]`` P_b."""
        return [self.prefix_ids[v].shape[1] for v in self.video_of_row]


def generate_shared(
    decoder: SparseToDenseDecoder,
    videos: Sequence[Sequence[Question]],
    *,
    max_new_tokens: int | None = None,
    generator: torch.Generator | None = None,
    copy_prefix: bool = False,
    **generation_kwargs: object,
) -> GenerateResult:
    """Decode every question of every video with one prefill of each video (see the module docstring).

    ``videos[v]`` lists the processor outputs of the full prompts of the questions about video v, one
    prompt each (batch 1): ``input_ids``, ``attention_mask`` and, for Qwen, ``mm_token_type_ids``.
    The video tensors (``pixel_values_videos``, ``video_grid_thw``, ...) are read from
    ``videos[v][0]`` only; the other questions may omit them. The prompts of one video must agree up
    to the end of its visual tokens and continue with text only. Returns ``sequences [Q, L + new]``
    (rows video by video, question by question), laid out as ``model.generate`` returns a left-padded
    batch of the full prompts, with per-row :class:`~std_core.stats.DecodeStats`. ``generation_kwargs``
    go to ``generate`` (``do_sample``, ``temperature``, ``eos_token_id``, ...). The dense cache holds
    each video's prefix once (:class:`~std_core.prefix_cache.SharedPrefixCache`); ``copy_prefix=True``
    copies it into every question's row instead (the earlier layout, kept for measuring and as a
    fallback).
    """
    model = decoder.model
    pad = generation_kwargs.get("pad_token_id", model.generation_config.pad_token_id)
    prompt = split_prompts(model, decoder.spec, videos, pad_token_id=int(pad) if pad is not None else 0)
    checked = {"input_ids": prompt.input_ids, "attention_mask": prompt.attention_mask, **generation_kwargs}
    for kwargs in prompt.prefix_kwargs:
        checked.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
    validate_generate_inputs(model, decoder.spec, checked, max_new_tokens)
    if max_new_tokens is not None:
        generation_kwargs["max_new_tokens"] = max_new_tokens
    with torch.inference_mode():
        return model.generate(
            input_ids=prompt.input_ids,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
            custom_generate=_SharedGenerate(decoder, generator, prompt=prompt, copy_prefix=copy_prefix),
            **generation_kwargs,
        )


# --------------------------------------------------------------------------------------- the split
def split_prompts(
    model: torch.nn.Module, spec: ModelSpec, videos: Sequence[Sequence[Question]], pad_token_id: int
) -> SharedPrompt:
    """Split each video's full prompts after the video and lay them out for the shared prefill."""
    if not videos or any(not questions for questions in videos):
        raise ValueError("generate_shared needs at least one question per video")
    ends = set(spec.visual_token_ids) | {getattr(model.config, "vision_end_token_id", None)} - {None}
    prefix_ids, prefix_kwargs, rows, suffixes, suffix_pos, prompts, positions = [], [], [], [], [], [], []
    for v, questions in enumerate(videos):
        video = {k: x for k, x in questions[0].items() if k not in _TOKEN_KEYS}
        first = _prompt_ids(questions[0])
        cut = _prefix_length(first, ends)
        prefix = first[:cut]
        mm = questions[0].get("mm_token_type_ids")
        prefix_mm = None if mm is None else _prompt_ids(questions[0], "mm_token_type_ids")[:cut]
        for q, question in enumerate(questions):
            ids = _prompt_ids(question)
            if ids.numel() <= cut or not torch.equal(ids[:cut], prefix):
                raise ValueError(
                    f"video {v}, question {q}: its prompt must begin with the same tokens as question 0 up to "
                    f"the end of the video ({cut} tokens) and continue with at least one text token"
                )
            mm_q = None if prefix_mm is None else torch.cat([prefix_mm, torch.zeros_like(ids[cut:])])
            pos = _prompt_positions(model, ids, mm_q, video)  # [(R,) 1, L_q]
            rows.append(v)
            suffixes.append(ids[cut:])
            suffix_pos.append(pos[..., 0, cut:])
            prompts.append(ids)
            positions.append(pos[..., 0, :])
        kwargs = dict(video, position_ids=positions[-1][..., None, :cut])
        if prefix_mm is not None:
            kwargs["mm_token_type_ids"] = prefix_mm[None]
        prefix_ids.append(prefix[None])
        prefix_kwargs.append(kwargs)
    return _lay_out(prefix_ids, prefix_kwargs, rows, suffixes, suffix_pos, prompts, positions, pad_token_id)


def _lay_out(
    prefix_ids: list[torch.Tensor],
    prefix_kwargs: list[dict],
    rows: list[int],
    suffixes: list[torch.Tensor],
    suffix_pos: list[torch.Tensor],
    prompts: list[torch.Tensor],
    positions: list[torch.Tensor],
    pad_token_id: int,
) -> SharedPrompt:
    """Pad the per-question pieces into the batch tensors of a :class:`SharedPrompt`."""
    lengths = [s.numel() for s in suffixes]
    width = max(lengths)
    prefix_len = [prefix_ids[v].shape[1] for v in rows]
    slots = max(prefix_len) + width
    slot_ids = torch.stack(
        [
            _pad(torch.cat([prefix_ids[v][0], s]), slots, pad_token_id)
            for v, s in zip(rows, suffixes, strict=True)
        ]
    )
    device = slot_ids.device
    ends = torch.tensor([p + s for p, s in zip(prefix_len, lengths, strict=True)], device=device)
    slot_valid = torch.arange(slots, device=device)[None] < ends[:, None]
    full = max(p.numel() for p in prompts)
    return SharedPrompt(
        prefix_ids=prefix_ids,
        prefix_kwargs=prefix_kwargs,
        video_of_row=rows,
        suffix_ids=torch.stack([_pad(s, width, pad_token_id) for s in suffixes]),
        suffix_lengths=lengths,
        suffix_positions=torch.stack([_pad(p, width, None) for p in suffix_pos], dim=-2),
        slot_ids=slot_ids,
        slot_valid=slot_valid,
        input_ids=torch.stack([_pad(p, full, pad_token_id, left=True) for p in prompts]),
        attention_mask=torch.stack([_pad(torch.ones_like(p), full, 0, left=True) for p in prompts]),
        position_ids=torch.stack([_pad(p, full, 1, left=True) for p in positions], dim=-2),
    )


def _prompt_ids(question: Question, key: str = "input_ids") -> torch.Tensor:
    """``[L]`` the question's prompt ids (or its ``key`` tensor, aligned with them) without padding."""
    ids = question[key]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(
            f"each question needs the processor output of one prompt (input_ids [1, L]), got {tuple(ids.shape)}"
        )
    mask = question.get("attention_mask")
    return ids[0] if mask is None else ids[0][mask[0].bool()]


def _prefix_length(ids: torch.Tensor, ends: set[int]) -> int:
    """Tokens up to and including the last visual or vision-end token."""
    hits = torch.isin(ids, torch.tensor(sorted(ends), device=ids.device)).nonzero()
    if hits.numel() == 0:
        raise ValueError("no video in the prompt: generate_shared shares the prefill of a video")
    return int(hits.max()) + 1


def _prompt_positions(
    model: torch.nn.Module, ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None, video: dict
) -> torch.Tensor:
    """``generate``'s own prompt positions of one full prompt: ``[4, 1, L]`` (M-RoPE) or ``[1, L]``."""
    kwargs = {"attention_mask": torch.ones_like(ids)[None]}
    if mm_token_type_ids is not None:
        kwargs["mm_token_type_ids"] = mm_token_type_ids[None]
    kwargs.update({k: video[k] for k in _POSITION_KEYS if k in video})
    return model._prepare_position_ids_for_generation(ids[None], kwargs)


def _pad(x: torch.Tensor, width: int, value: int | None, left: bool = False) -> torch.Tensor:
    """Pad the last dim of ``x`` to ``width`` with ``value`` (None: repeat the last entry)."""
    n = width - x.shape[-1]
    fill = x[..., -1:].expand(*x.shape[:-1], n) if value is None else x.new_full((*x.shape[:-1], n), value)
    return torch.cat([fill, x] if left else [x, fill], dim=-1)


# ---------------------------------------------------------------------------------- the decode
@dataclass(frozen=True)
class _SharedGenerate(_CustomGenerate):
    """The ``custom_generate`` callable of :func:`generate_shared`."""

    prompt: SharedPrompt | None = None
    copy_prefix: bool = False  # the dense cache copies each video's prefix into its questions' rows

    def __call__(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        logits_processor: object,
        stopping_criteria: object,
        generation_config: object,
        synced_gpus: bool = False,
        streamer: object = None,
        **model_kwargs: object,
    ) -> GenerateResult:
        args = (input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)
        return _SharedDecode(self, *args).run()


class _SharedDecode(_Decode):
    """A :class:`~std_core.decoder._Decode` whose prefill is shared per video (module docstring)."""

    static_steps_supported = False  # decode forwards stay eager (see std_core.static_steps)

    def __init__(self, call: _SharedGenerate, *args: object) -> None:
        self.prompt: SharedPrompt = call.prompt
        self.copy_prefix = call.copy_prefix
        super().__init__(call, *args)

    def prompt_layout(self, input_ids: torch.Tensor, model_kwargs: dict) -> PromptLayout:
        """The prompts in dense-cache slots: prefix, then suffix, then nothing."""
        ids = self.prompt.slot_ids
        visual = torch.isin(ids, torch.tensor(self.spec.visual_token_ids, device=ids.device))
        return PromptLayout.build(
            self.prompt.slot_valid, visual, self.config.sparse_budget, self.config.selection_queries
        )

    def selection_observer(self) -> SharedPrefixObserver:
        observer = SharedPrefixObserver if self.copy_prefix else NoCopyPrefixObserver
        return observer(self.layout, self.prompt.prefix_lengths, self.prompt.video_of_row, self.timer)

    def prefill(self, input_ids: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """Each video's prefix once, then every suffix; returns each row's last-token logits [Q, 1, V]."""
        with self.timer.phase("prefill"):
            prefixes = [self.prefill_prefix(v) for v in range(len(self.prompt.prefix_ids))]
            rows, dense = self.prompt.video_of_row, self.dense
            if self.copy_prefix:
                self.dense = SlotCache.from_prefixes(
                    prefixes, rows, dense.capacity, dense.max_query, dense.groups
                )
            else:  # own slots: the suffix, the new tokens and one verify, as the copy's past the prefix
                own = self.prompt.suffix_ids.shape[1] + self.stop.max_new_tokens + self.gamma + 1
                self.dense = SharedPrefixCache(prefixes, rows, own, dense.max_query, dense.groups)
            del prefixes
            return self.prefill_suffixes()

    def prefill_prefix(self, video: int) -> SlotCache:
        """Vision tower + dense prefill of one video's prefix (batch 1, the model's own attention)."""
        ids = self.prompt.prefix_ids[video]
        cache = SlotCache(self.spec.num_layers, ids.shape[1] + 1)
        observer = None if self.observer is None else functools.partial(self.observer.prefix, video)
        with attention_phase("prefill", observer):
            inputs = self.model.prepare_inputs_for_generation(
                ids,
                is_first_iteration=True,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **self.prompt.prefix_kwargs[video],
            )
            self.model(**inputs, return_dict=True)
        starts = torch.zeros(1, dtype=torch.long, device=ids.device)
        cache.reset_rows(starts, torch.full_like(starts, ids.shape[1]))
        return cache

    def prefill_suffixes(self) -> torch.Tensor:
        """One dense forward of every row's suffix against its prefix; the padding is rolled back.
        Only each row's last suffix token is projected onto the vocabulary (``[Q, 1, V]``, not
        ``[Q, S, V]``).

        Copying cache: the model's own attention over each row's copied prefix + causal suffix. Shared
        prefix: StD's attention (:meth:`SharedPrefixCache.attend`) over the video's prefix + the row's
        own causal suffix slots, query heads grouped as in a verify."""
        prompt, dense = self.prompt, self.dense
        width = prompt.suffix_ids.shape[1]
        shared = isinstance(dense, SharedPrefixCache)
        # [Q, 1, (G ·) S, slots]: copy: prefix + causal suffix; shared: the causal suffix (own slots)
        allowed = dense.allowed(width, groups=self.spec.groups if shared else 1)
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask = mask.masked_fill(~allowed, float("-inf") if shared else torch.finfo(dtype).min)
        observer = None if self.observer is None else self.observer.suffix
        phase = "decode" if shared else "prefill"
        lengths = torch.tensor(prompt.suffix_lengths, device=mask.device)
        with attention_phase(phase, observer), shared_prefix(dense if shared else None):
            logits = self.model(
                input_ids=prompt.suffix_ids,
                attention_mask=mask,
                position_ids=prompt.suffix_positions,
                past_key_values=dense,
                use_cache=True,
                return_dict=True,
                logits_to_keep=(lengths - 1)[:, None],  # [Q, 1]: each row's last suffix token only
            ).logits
        dense.end_forward(width)
        dense.commit(lengths, prompt.suffix_lengths)
        return logits

    def gather_sparse(self, index: list[torch.Tensor], starts: torch.Tensor, capacity: int) -> SlotCache:
        """The draft's kept slots, from the shared prefix storage and the own slots (no-copy cache)."""
        if isinstance(self.dense, SharedPrefixCache):
            return self.dense.gather_kept(index, starts, capacity, groups=self.spec.groups)
        return super().gather_sparse(index, starts, capacity)

    def forward(self, cache: SlotCache, tokens: torch.Tensor) -> torch.Tensor:
        """A decode forward; over the no-copy dense cache its attention reads the shared prefix too."""
        with shared_prefix(cache if isinstance(cache, SharedPrefixCache) else None):
            return super().forward(cache, tokens)

    def round_schedule(self, calibrating: bool) -> RoundSchedule:
        """As the decoder's, but auto's cost bucket counts the keys a dense row reads (prefix + own
        slots), not the own slots alone."""
        if self.config.mode != "auto" or calibrating or not isinstance(self.dense, SharedPrefixCache):
            return super().round_schedule(calibrating)
        bucket = shape_bucket(len(self.pending), self.dense.attended_length(), self.sparse.max_cursor())
        return AutoSchedule.for_model(self.model, self.gamma, bucket, calibrate=self.measure_costs)
