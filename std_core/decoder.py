"""SparseToDenseDecoder: prefill → select once → rounds of draft / verify / accept / roll back.

The decoder runs inside ``model.generate(custom_generate=...)``: transformers prepares the generation
config, the logits processors, the stopping criteria, the prompt positions and the vision features
exactly as for plain decoding, then hands over. Then:

1. **Prefill** the prompt with the model's own attention into the dense :class:`SlotCache`, while
   the selection observer scores the visual tokens from the prefill's post-RoPE text queries.
2. **Select once**: gather the sparse cache (non-visual prompt tokens + top-K visual per layer and
   KV head, ascending positions).
3. **Rounds** until every row stops: *draft* γ tokens with the sparse cache, *verify*
   ``[pending] + drafts`` with the dense cache, *accept* the agreeing prefix plus the bonus token,
   and *roll back*: both caches keep exactly ``pending + accepted`` (the dense states of committed
   tokens), per row. ``mode="dense"`` is the same loop with γ = 0; each round's γ comes from a
   :class:`~std_core.auto.RoundSchedule` (fixed, or ``mode="auto"``'s).

Rows are independent: each has its own accepted length, committed count and cache length, so one
row's rejection never discards another row's accepted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from std_core.acceptance import (
    accepted_length,
    greedy_agreement,
    greedy_bonus,
    residual_distribution,
    sample,
    sampling_agreement,
)
from std_core.attention import attention_phase, install
from std_core.auto import AutoSchedule, FixedSchedule, RoundSchedule, StepCosts, shape_bucket, time_forward
from std_core.config import StdConfig
from std_core.kv_cache import SlotCache
from std_core.models import ModelSpec, decode_position_ids, inspect_model, next_positions
from std_core.processing import Scorer, StopRule
from std_core.rows import Rows
from std_core.selection import PromptLayout, SelectionObserver, keep_index, sink_window_scores
from std_core.stats import DecodeStats, PhaseTimer, RowStats
from std_core.validation import validate_generate_inputs


@dataclass(frozen=True)
class GenerateResult:
    """``sequences [B, prompt_len + new]`` laid out as ``model.generate`` returns them, and the stats."""

    sequences: torch.Tensor
    stats: DecodeStats


class SparseToDenseDecoder:
    """Lossless self-speculative decoding for a loaded Video-LLM (see the module docstring).

    ``model`` is a loaded ``...ForConditionalGeneration`` of a supported architecture. Construction
    routes its language model's attention through StD's registered function, which behaves exactly
    like the original outside this decoder's calls.
    """

    def __init__(self, model: torch.nn.Module, config: StdConfig | None = None) -> None:
        self.spec: ModelSpec = inspect_model(model)
        self.model = model
        self.config = config or StdConfig()
        install(model)

    def generate(
        self, *, max_new_tokens: int | None = None, generator: torch.Generator | None = None, **inputs: object
    ) -> GenerateResult:
        """Decode a batch of processor inputs; greedy unless ``do_sample=True`` (then temperature,
        top_p, top_k warp as in ``generate``, and ``generator`` seeds the draws)."""
        validate_generate_inputs(self.model, self.spec, inputs, max_new_tokens)
        if max_new_tokens is not None:
            inputs["max_new_tokens"] = max_new_tokens
        with torch.inference_mode():
            return self.model.generate(**inputs, custom_generate=_CustomGenerate(self, generator))

    def step_costs(self, *, repeats: int = 2, **inputs: object) -> StepCosts:
        """Measure, on these inputs, the seconds of a dense step, a draft step and a verify of γ + 1
        tokens (what ``mode="auto"`` calibrates): prefill and selection run, then timed forwards that
        are rolled back. Generates nothing."""
        validate_generate_inputs(self.model, self.spec, inputs, None)
        if self.config.mode == "dense":
            raise ValueError("step costs need the sparse cache: use mode='std' or 'auto'")
        inputs.setdefault("max_new_tokens", 2)
        with torch.inference_mode():
            return self.model.generate(
                **inputs, custom_generate=_CustomGenerate(self, None, calibrate=repeats)
            )


@dataclass(frozen=True)
class _CustomGenerate:
    """The ``custom_generate`` callable: ``model.generate`` hands over its prepared inputs, logits
    processors and stopping criteria; this decodes them, or with ``calibrate`` > 0 measures the step
    costs (fastest of that many repeats) and generates nothing."""

    decoder: SparseToDenseDecoder
    generator: torch.Generator | None
    calibrate: int = 0

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
    ) -> GenerateResult | StepCosts:
        decode = _Decode(
            self, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs
        )
        return decode.measure_costs(self.calibrate) if self.calibrate else decode.run()


class _Decode:
    """One ``generate`` call: its whole state, set up (prefill, selection, first token) in
    ``__init__``, and the round loop."""

    def __init__(
        self,
        call: _CustomGenerate,
        input_ids: torch.Tensor,  # [B, L] the prompt, left padded
        logits_processor: object,
        stopping_criteria: object,
        generation_config: object,
        model_kwargs: dict,
    ) -> None:
        spec, config = call.decoder.spec, call.decoder.config
        self.model: torch.nn.Module = call.decoder.model
        self.spec: ModelSpec = spec  # layers, KV heads, visual token ids, RoPE kind
        self.config: StdConfig = config
        self.generator = call.generator  # seeds every draw when sampling
        self.do_sample = bool(generation_config.do_sample)  # rejection sampling; else greedy
        self.gamma = 0 if config.mode == "dense" else config.gamma  # drafts per round (auto: the most)
        self.timer = PhaseTimer(input_ids.device)  # seconds per phase, without host syncs
        self.scorer = Scorer(logits_processor)  # generate's logits processors, per position
        # where each row ends: generate's stopping criteria (max length, EOS, ...)
        self.stop = StopRule(stopping_criteria, input_ids.shape[1], generation_config.max_length)
        pad = generation_config._pad_token_tensor
        pad_id = int(pad) if pad is not None else 0  # fills each row's output after its end
        self.rows = Rows(input_ids, self.stop, pad_id, spare=self.gamma + 2)  # committed tokens, counts
        # which prompt positions are real, visual, scoring text; how many the sparse cache keeps
        self.layout = self.prompt_layout(input_ids, model_kwargs)
        capacity = input_ids.shape[1] + self.stop.max_new_tokens + self.gamma + 1
        self.dense = SlotCache(spec.num_layers, capacity)  # every prompt and committed token
        text_topk = self.gamma and config.selection == "text_topk"
        # scores the visual tokens from the prefill's text queries (None: no sparse cache, sink_window)
        self.observer = self.selection_observer() if text_topk else None
        logits = self.prefill(input_ids, model_kwargs)  # [B, 1, V]
        self.sparse = self.select() if self.gamma else None  # the kept prompt + committed tokens
        self.sparse_behind = [0] * input_ids.shape[0]  # committed tokens not yet in the sparse cache
        self.base_positions = next_positions(spec, model_kwargs["position_ids"])  # [R, B] first new token
        self.round_gammas: list[int] = []  # γ of every round so far
        self.pending = self.first_token(input_ids, logits)  # [B] last committed token, not yet cached
        self.schedule: RoundSchedule = self.round_schedule(call.calibrate > 0)  # γ of each round

    def run(self) -> GenerateResult:
        """Rounds until every row stops."""
        while not self.rows.all_finished:
            self.round()
        self.schedule.finish()
        return GenerateResult(self.rows.sequences(), self.stats())

    # ------------------------------------------------------------------------------ prefill, select
    def prompt_layout(self, input_ids: torch.Tensor, model_kwargs: dict) -> PromptLayout:
        """The prompt in dense-cache slots: here the left-padded prompt itself."""
        return _prompt_layout(self.spec, self.config, input_ids, model_kwargs.get("attention_mask"))

    def selection_observer(self) -> SelectionObserver:
        """Scores the visual tokens during :meth:`prefill` (one forward over the whole prompt)."""
        return SelectionObserver(self.layout, self.timer)

    def prefill(self, input_ids: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """Dense prefill with the model's own attention; returns the last position's logits [B, 1, V]."""
        length = input_ids.shape[1]
        model_kwargs["past_key_values"] = self.dense
        with self.timer.phase("prefill"), attention_phase("prefill", self.observer):
            inputs = self.model.prepare_inputs_for_generation(
                input_ids, is_first_iteration=True, **model_kwargs
            )
            logits = self.model(**inputs, return_dict=True).logits[:, -1:]
        starts = (~self.layout.valid).sum(dim=1)
        self.dense.reset_rows(starts, torch.full_like(starts, length))
        return logits

    def select(self) -> SlotCache:
        """The sparse cache: kept prompt slots of every layer gathered once from the dense cache."""
        with self.timer.phase("select"):
            if self.observer is not None:
                index = [self.observer.index[i] for i in range(self.spec.num_layers)]
                starts = self.observer.starts
            else:  # sink + recent window: the same slots in every layer and head
                scores = sink_window_scores(self.layout, self.spec.num_kv_heads, self.config.sink_tokens)
                shared, starts = keep_index(scores, self.layout)
                index = [shared] * self.spec.num_layers
            kept = index[0].shape[-1]
            capacity = kept + self.stop.max_new_tokens + self.gamma + 1
            return SlotCache.gathered(self.dense, index, starts, capacity)

    def first_token(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Commit every row's first token (from the prefill logits); returns it ``[B]``."""
        scores = self.scorer(logits, self.rows.tokens, self.rows.lengths(), input_ids[:, :0])
        first = self.pick(scores[:, 0])
        self.rows.commit(first[:, None].cpu(), [0] * len(first))
        return first

    def round_schedule(self, calibrating: bool) -> RoundSchedule:
        """γ per round: fixed for mode std and dense (and when calibrating, which runs no round);
        auto's from the model's cached round costs, calibrated on this call's caches if missing."""
        if self.config.mode != "auto" or calibrating:
            return FixedSchedule(self.gamma)
        bucket = shape_bucket(len(self.pending), self.dense.max_cursor(), self.sparse.max_cursor())
        return AutoSchedule.for_model(self.model, self.gamma, bucket, calibrate=self.measure_costs)

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """The next token from processed scores ``[B, V]``: argmax, or a draw when sampling."""
        if self.do_sample:
            return sample(torch.softmax(scores, dim=-1), self.generator)
        return scores.argmax(dim=-1)

    # ---------------------------------------------------------------------------------- the round
    def round(self) -> None:
        """One round of the paper, for every live row at once."""
        gamma = self.schedule.next_gamma(self.rows.remaining() - 1)  # choose γ (within the token budget)
        uniforms = self.uniforms(gamma)  # sampling: the acceptance rule's u ~ U(0, 1), [B, γ]
        drafts, q = self.draft(gamma)  # 1. draft γ tokens with the sparse cache
        p = self.verify(drafts, q, uniforms)  # 2. verify [pending] + drafts with the dense cache
        accepted, bonus = self.accept(drafts, p, q, uniforms)  # 3. accept prefix + bonus
        outcomes = self.roll_back(drafts, accepted, bonus, gamma)  # 4. roll back to pending + accepted
        self.schedule.record(gamma, outcomes)

    def draft(self, gamma: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """γ sparse forwards, each fed the previous token: drafts ``[B, γ]``, their q ``[B, γ, V]``."""
        if gamma:
            self.catch_up_sparse()
        drafts = self.pending.new_empty((self.pending.shape[0], gamma))
        q = []
        token = self.pending[:, None]
        with self.timer.phase("draft"):
            for i in range(gamma):
                logits = self.forward(self.sparse, token)
                scores = self.scorer(logits, self.rows.tokens, self.rows.lengths(), drafts, offset=i)[:, 0]
                if self.do_sample:
                    q.append(torch.softmax(scores, dim=-1))
                    drafts[:, i] = sample(q[-1], self.generator)
                else:
                    drafts[:, i] = scores.argmax(dim=-1)
                token = drafts[:, i : i + 1]
        return drafts, (torch.stack(q, dim=1) if q else None)

    def catch_up_sparse(self) -> None:
        """Copy into the sparse cache the committed tokens that dense-only rounds (γ = 0, ``mode="auto"``)
        left out of it, so a draft attends to every committed token."""
        if any(self.sparse_behind):
            self.sparse.append_from(self.dense, self.sparse_behind)
            self.sparse_behind = [0] * len(self.sparse_behind)

    def verify(
        self, drafts: torch.Tensor, q: torch.Tensor | None, uniforms: torch.Tensor | None
    ) -> torch.Tensor:
        """Dense scores of ``[pending] + drafts``: ``[B, m, V]`` (m = γ + 1, or fewer when a
        sequential verify stopped once every row had disagreed)."""
        tokens = torch.cat([self.pending[:, None], drafts], dim=1)
        history, lengths = self.rows.tokens, self.rows.lengths()
        with self.timer.phase("verify"):
            if self.config.verify == "parallel" or drafts.shape[1] == 0:
                return self.scorer(self.forward(self.dense, tokens), history, lengths, drafts)
            scores, alive = [], torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            for j in range(tokens.shape[1]):
                scores.append(
                    self.scorer(self.forward(self.dense, tokens[:, j : j + 1]), history, lengths, drafts, j)
                )
                if j == drafts.shape[1]:
                    break
                alive &= self.agreement(drafts[:, j : j + 1], scores[-1], q, uniforms, j)[:, 0]
                if not bool(alive.any()):
                    break
            return torch.cat(scores, dim=1)

    def agreement(
        self,
        drafts: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor | None,
        uniforms: torch.Tensor | None,
        at: int = 0,
    ) -> torch.Tensor:
        """``[B, n]`` bool: which drafts the dense scores ``p [B, >= n, V]`` accept."""
        if not self.do_sample:
            return greedy_agreement(drafts, p.argmax(dim=-1))
        n = drafts.shape[1]
        if n == 0:
            return drafts.new_zeros(drafts.shape, dtype=torch.bool)
        return sampling_agreement(drafts, torch.softmax(p, -1), q[:, at : at + n], uniforms[:, at : at + n])

    def accept(
        self, drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None, uniforms: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accepted lengths ``[B]`` and bonus tokens ``[B]``."""
        accepted = accepted_length(self.agreement(drafts[:, : p.shape[1]], p, q, uniforms))
        if not self.do_sample:
            return accepted, greedy_bonus(p.argmax(dim=-1), accepted)
        q = q if q is not None else p[:, :0]
        return accepted, sample(residual_distribution(torch.softmax(p, -1), q, accepted), self.generator)

    def roll_back(
        self, drafts: torch.Tensor, accepted: torch.Tensor, bonus: torch.Tensor, gamma: int
    ) -> list[RowStats]:
        """Commit ``drafts[:accepted] + bonus`` per row; both caches keep ``pending + accepted``
        (the sparse cache lazily after a dense-only round: see :meth:`catch_up_sparse`). Returns the
        live rows' round counts."""
        new = torch.cat([drafts, bonus[:, None]], dim=1).scatter(1, accepted[:, None], bonus[:, None])
        host = torch.cat([accepted[:, None], new], dim=1).cpu()  # the round's one host sync
        self.round_gammas.append(gamma)
        keep, outcomes = self.rows.commit(host[:, 1:], host[:, 0].tolist(), gamma=gamma)
        keep_t = torch.tensor(keep, device=drafts.device)
        if self.sparse is not None and gamma:
            self.sparse.adopt_tentative(self.dense)
            self.sparse.commit(keep_t, keep)
        elif self.sparse is not None:
            self.sparse_behind = [a + b for a, b in zip(self.sparse_behind, keep, strict=True)]
        self.dense.commit(keep_t, keep)
        self.pending = bonus
        return outcomes

    # ------------------------------------------------------------------------------------ step costs
    def measure_costs(self, repeats: int = 3) -> StepCosts:
        """Step costs of this call's own caches (each timed forward is rolled back at once)."""

        def timed(cache: SlotCache, q: int) -> float:
            tokens = self.pending[:, None].expand(-1, q).contiguous()
            none = torch.zeros_like(self.pending)
            return time_forward(
                lambda: self.forward(cache, tokens), lambda: cache.commit(none, [0] * len(none)), repeats
            )

        dense, q = timed(self.dense, 1), self.gamma + 1
        return StepCosts.from_measurements(dense, timed(self.sparse, 1), dense, timed(self.dense, q), q)

    # ------------------------------------------------------------------------------------- helpers
    def forward(self, cache: SlotCache, tokens: torch.Tensor) -> torch.Tensor:
        """One decode forward of ``tokens [B, q]`` at each row's next positions; logits ``[B, q, V]``."""
        q = tokens.shape[1]
        offsets = self.rows.cached[:, None] + cache.pending + torch.arange(q, device=tokens.device)[None]
        positions = decode_position_ids(self.spec, self.base_positions, offsets)
        mask = cache.begin_forward(q, self.spec.groups)
        with attention_phase("decode"):
            out = self.model(
                input_ids=tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        cache.end_forward(q)
        return out.logits

    def uniforms(self, gamma: int) -> torch.Tensor | None:
        """``[B, γ]`` uniform draws for the acceptance rule when sampling; None when greedy or γ = 0."""
        if not self.do_sample or gamma == 0:
            return None
        shape = (self.pending.shape[0], gamma)
        return torch.rand(shape, generator=self.generator, device=self.pending.device)

    def stats(self) -> DecodeStats:
        """The call's per-row counts, phase seconds and cache sizes."""
        seconds = self.timer.seconds()
        select = seconds.get("select", 0.0)
        prefill_select = select if self.observer is not None else 0.0
        gathered_bytes = self.sparse.nbytes() if self.sparse is not None else 0
        return DecodeStats(
            mode=self.config.mode,
            gamma=self.gamma,
            rows=tuple(self.rows.stats),
            prefill_seconds=seconds.get("prefill", 0.0) - prefill_select,
            select_seconds=select,
            draft_seconds=seconds.get("draft", 0.0),
            verify_seconds=seconds.get("verify", 0.0),
            batch_rounds=len(self.round_gammas),
            round_gammas=tuple(self.round_gammas),
            visual_tokens=tuple(int(x) for x in self.layout.visual.sum(dim=1).tolist()),
            kept_prompt_tokens=tuple(int(x) for x in self.layout.keep_counts.tolist()),
            sparse_cache_bytes=gathered_bytes,
            dense_cache_bytes=self.dense.nbytes(),
        )


def _prompt_layout(
    spec: ModelSpec, config: StdConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> PromptLayout:
    """Which prompt positions are real, which visual, which text scores them, and how many are kept."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    visual = torch.isin(input_ids, torch.tensor(spec.visual_token_ids, device=input_ids.device))
    return PromptLayout.build(valid, visual, config.sparse_budget, config.selection_queries)
