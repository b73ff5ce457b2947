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
    argmax,
    greedy_agreement,
    greedy_bonus,
    residual_distribution,
    sample,
    sampling_agreement,
)
from std_core.attention import attention_phase, install
from std_core.auto import (
    AutoSchedule,
    FixedSchedule,
    RoundSchedule,
    StepCosts,
    shape_bucket,
    time_forwards,
    verify_sizes,
)
from std_core.config import StdConfig
from std_core.kv_cache import SlotCache
from std_core.models import ModelSpec, decode_position_ids, inspect_model, next_positions
from std_core.processing import Scorer, StopRule
from std_core.rows import Rows
from std_core.selection import PromptLayout, SelectionObserver, keep_index, sink_window_scores
from std_core.static_steps import StaticSession, StaticSteps, bucket_capacity, unsupported_reason
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
        self._static: StaticSteps | None = None  # compiled step functions, kept across calls

    def static_session(self, device: torch.device) -> StaticSession | None:
        """Static steps for one ``generate`` call on ``device`` (None: the eager Hugging Face forward),
        per ``config.static_steps``; unsupported architectures fall back to None."""
        kind = self.config.static_steps_on(device.type)
        if kind == "off" or unsupported_reason(self.model) is not None:
            return None
        if self._static is None:
            backend = self.config.compile_backend if kind == "compile" else None
            cuda_graphs = kind == "compile" and device.type == "cuda"
            self._static = StaticSteps(self.model, backend, cuda_graphs=cuda_graphs)
        return self._static.session()

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

    #: whether decode forwards may run as static steps (a subclass with its own cache layout opts out)
    static_steps_supported = True

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
        self.stop = StopRule(
            stopping_criteria, input_ids.shape[1], generation_config.max_length, input_ids.device
        )
        pad = generation_config._pad_token_tensor
        pad_id = int(pad) if pad is not None else 0  # fills each row's output after its end
        self.rows = Rows(input_ids, self.stop, pad_id, spare=self.gamma + 2)  # committed tokens, counts
        # which prompt positions are real, visual, scoring text; how many the sparse cache keeps
        self.layout = self.prompt_layout(input_ids, model_kwargs)
        # static (compiled) decode forwards, or None: the Hugging Face forward over the used prefix
        self.static = call.decoder.static_session(input_ids.device) if self.static_steps_supported else None
        capacity = self.capacity(input_ids.shape[1] + self.stop.max_new_tokens + self.gamma + 1)
        # every prompt and committed token; a forward writes at most γ + 1 (the verify)
        self.dense = SlotCache(spec.num_layers, capacity, max_query=self.gamma + 1, groups=spec.groups)
        text_topk = self.gamma and config.selection == "text_topk"
        # scores the visual tokens from the prefill's text queries (None: no sparse cache, sink_window)
        self.observer = self.selection_observer() if text_topk else None
        logits = self.prefill(input_ids, model_kwargs)  # [B, 1, V]
        self.sparse = self.select() if self.gamma else None  # the kept prompt + committed tokens
        # committed tokens not yet in the sparse cache (after dense-only rounds), on the host and device
        self.behind, self.behind_t = [0] * input_ids.shape[0], torch.zeros_like(self.dense.lengths)
        self.base_positions = next_positions(spec, model_kwargs["position_ids"])  # [R, B] first new token
        self.round_gammas: list[int] = []  # γ of every round so far
        self.pending = self.first_token(input_ids, logits)  # [B] last committed token, not yet cached
        for cache in (self.dense, self.sparse):  # the masks, built once here rather than in a round
            if cache is not None:
                cache.prepare_mask()
        self.schedule: RoundSchedule = self.round_schedule(call.calibrate > 0)  # γ of each round

    def run(self) -> GenerateResult:
        """Rounds until every row stops."""
        with self.timer.phase("rounds"):
            while not self.rows.all_finished:
                self.round()
        self.schedule.finish(budget_reached=max(self.rows.generated) >= self.stop.max_new_tokens)
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
        with self.timer.phase("gather"):
            if self.observer is not None:
                index = [self.observer.index[i] for i in range(self.spec.num_layers)]
                starts = self.observer.starts
            else:  # sink + recent window: the same slots in every layer and head
                scores = sink_window_scores(self.layout, self.spec.num_kv_heads, self.config.sink_tokens)
                shared, starts = keep_index(scores, self.layout)
                index = [shared] * self.spec.num_layers
            kept = index[0].shape[-1]
            capacity = self.capacity(kept + self.stop.max_new_tokens + self.gamma + 1)
            # drafts write one token per forward
            return self.gather_sparse(index, starts, capacity)

    def gather_sparse(self, index: list[torch.Tensor], starts: torch.Tensor, capacity: int) -> SlotCache:
        """The sparse cache of the kept slots ``index[layer]`` of the dense cache."""
        return SlotCache.gathered(self.dense, index, starts, capacity, groups=self.spec.groups)

    def capacity(self, slots: int) -> int:
        """A cache's capacity for ``slots`` needed slots: static steps round it up to a shape bucket,
        so calls with similar lengths share compiled steps."""
        return bucket_capacity(slots) if self.static is not None else slots

    def first_token(self, input_ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Commit every row's first token (from the prefill logits); returns it ``[B]``."""
        scores = self.scorer(logits, self.rows.tokens, self.rows.lengths(), input_ids[:, :0])
        first = self.pick(scores[:, 0])
        self.rows.commit(first[:, None], self.rows.none_accepted)
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
        return argmax(scores)

    # ---------------------------------------------------------------------------------- the round
    def round(self) -> None:
        """One round of the paper, for every live row at once."""
        # choose γ within the token budget; static steps keep γ (a shorter verify is another bucket)
        limit = self.gamma if self.static is not None else self.rows.remaining() - 1
        gamma = self.schedule.next_gamma(limit)
        uniforms = self.uniforms(gamma)  # sampling: the acceptance rule's u ~ U(0, 1), [B, γ]
        drafts, q = self.draft(gamma)  # 1. draft γ tokens with the sparse cache
        dense = self.verify(drafts, q, uniforms)  # 2. verify [pending] + drafts with the dense cache
        accepted, bonus = self.accept(drafts, dense, q, uniforms)  # 3. accept prefix + bonus
        behind = self.roll_back(drafts, accepted, bonus, gamma)  # 4. roll back to pending + accepted
        draft_seconds = self.timer.latest("draft") if gamma else 0.0
        verify_seconds = self.timer.latest("verify")
        self.schedule.record(gamma, behind, draft_seconds, verify_seconds, self.rows.advance, self.rows.cut)

    def draft(self, gamma: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """γ sparse forwards, each fed the previous token: drafts ``[B, γ]``, their q ``[B, γ, V]``."""
        drafts = self.pending.new_empty((self.pending.shape[0], gamma))
        if not gamma:  # a dense round: nothing to draft
            return drafts, None
        self.catch_up_sparse()
        q = []
        token = self.pending[:, None]
        lengths = self.rows.lengths()
        with self.timer.phase("draft"):
            for i in range(gamma):
                logits = self.forward(self.sparse, token)
                scores = self.scorer(logits, self.rows.tokens, lengths, drafts, offset=i)[:, 0]
                if self.do_sample:
                    q.append(torch.softmax(scores, dim=-1))
                    drafts[:, i] = sample(q[-1], self.generator)
                else:
                    drafts[:, i] = argmax(scores)
                token = drafts[:, i : i + 1]
        return drafts, (torch.stack(q, dim=1) if q else None)

    def catch_up_sparse(self) -> None:
        """Copy into the sparse cache the committed tokens that dense-only rounds (γ = 0, ``mode="auto"``)
        left out of it, so a draft attends to every committed token."""
        if any(self.behind):
            self.sparse.append_from(self.dense, self.behind_t, self.behind)
            self.behind, self.behind_t = [0] * len(self.behind), torch.zeros_like(self.behind_t)

    def verify(
        self, drafts: torch.Tensor, q: torch.Tensor | None, uniforms: torch.Tensor | None
    ) -> torch.Tensor:
        """What the dense model makes of ``[pending] + drafts``: its greedy tokens ``[B, m]`` (greedy)
        or its probabilities ``[B, m, V]`` (sampling), from ``generate``'s processed scores; m = γ + 1,
        or fewer when a sequential verify stopped once every row had disagreed."""
        tokens = (
            torch.cat([self.pending[:, None], drafts], dim=1) if drafts.shape[1] else self.pending[:, None]
        )
        history, lengths = self.rows.tokens, self.rows.lengths()  # [B, *] on the device; host list
        with self.timer.phase("verify"):
            if self.config.verify == "parallel" or drafts.shape[1] == 0:
                return self.dense_view(
                    self.scorer(self.forward(self.dense, tokens), history, lengths, drafts)
                )
            dense, alive = [], torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
            for j in range(tokens.shape[1]):
                scores = self.scorer(
                    self.forward(self.dense, tokens[:, j : j + 1]), history, lengths, drafts, j
                )
                dense.append(self.dense_view(scores))
                if j == drafts.shape[1]:
                    break
                alive &= self.agreement(drafts[:, j : j + 1], dense[-1], q, uniforms, j)[:, 0]
                if not bool(alive.any()):  # one read per verified position: a skipped forward is dearer
                    break
            return torch.cat(dense, dim=1)

    def dense_view(self, scores: torch.Tensor) -> torch.Tensor:
        """Processed dense scores ``[B, m, V]`` as acceptance reads them: tokens ``[B, m]`` (greedy),
        probabilities ``[B, m, V]`` (sampling)."""
        return torch.softmax(scores, dim=-1) if self.do_sample else argmax(scores)

    def agreement(
        self,
        drafts: torch.Tensor,
        dense: torch.Tensor,
        q: torch.Tensor | None,
        uniforms: torch.Tensor | None,
        at: int = 0,
    ) -> torch.Tensor:
        """``[B, n]`` bool: which drafts the dense view (:meth:`dense_view`, ``>= n`` positions) accepts."""
        if not self.do_sample:
            return greedy_agreement(drafts, dense)
        n = drafts.shape[1]
        if n == 0:
            return drafts.new_zeros(drafts.shape, dtype=torch.bool)
        return sampling_agreement(drafts, dense, q[:, at : at + n], uniforms[:, at : at + n])

    def accept(
        self, drafts: torch.Tensor, dense: torch.Tensor, q: torch.Tensor | None, uniforms: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accepted lengths ``[B]`` and bonus tokens ``[B]`` from the verify's dense view."""
        if not drafts.shape[1] and not self.do_sample:  # a dense round: the bonus is the next token
            return self.rows.none_accepted, dense[:, 0]
        accepted = accepted_length(self.agreement(drafts[:, : dense.shape[1]], dense, q, uniforms))
        if not self.do_sample:
            return accepted, greedy_bonus(dense, accepted)
        q = q if q is not None else dense[:, :0]
        return accepted, sample(residual_distribution(dense, q, accepted), self.generator)

    def roll_back(
        self, drafts: torch.Tensor, accepted: torch.Tensor, bonus: torch.Tensor, gamma: int
    ) -> list[RowStats]:
        """Commit ``drafts[:accepted] + bonus`` per row; both caches keep ``pending + accepted``
        (the sparse cache lazily after a dense-only round: see :meth:`catch_up_sparse`). Returns the
        round counts of the live rows that were furthest behind (what ``mode="auto"`` estimates the
        acceptance from: a batch decodes until its slowest row is done)."""
        new = bonus[:, None]
        if gamma:
            new = torch.cat([drafts, new], dim=1).scatter(1, accepted[:, None], new)
        keep, keep_host, _, behind = self.rows.commit(new, accepted, gamma=gamma)  # the one host sync
        self.round_gammas.append(gamma)
        if self.sparse is not None and gamma:
            self.sparse.adopt_tentative(self.dense)
            self.sparse.commit(keep, keep_host)
        elif self.sparse is not None:
            self.behind_t += keep
            self.behind = [a + b for a, b in zip(self.behind, keep_host, strict=True)]
        self.dense.commit(keep, keep_host)
        self.pending = bonus
        return behind

    # ------------------------------------------------------------------------------------ step costs
    def measure_costs(self, repeats: int = 3) -> StepCosts:
        """Step costs of this call's own caches, as the rounds time them (a forward and its greedy
        tokens; each rolled back at once, all interleaved): a draft step, a dense step and verifies of
        :func:`~std_core.costs.verify_sizes` tokens."""
        none = torch.zeros_like(self.pending)

        def step(cache: SlotCache, q: int) -> tuple:
            tokens = self.pending[:, None].expand(-1, q).contiguous()
            return lambda: argmax(self.forward(cache, tokens)), lambda: cache.commit(none, [0] * len(none))

        sizes = [1, *verify_sizes(self.gamma)]
        draft, *verifies = time_forwards(
            [step(self.sparse, 1)] + [step(self.dense, q) for q in sizes], repeats
        )
        return StepCosts.from_verifies(verifies[0], draft, list(zip(sizes, verifies, strict=True)))

    # ------------------------------------------------------------------------------------- helpers
    def forward(self, cache: SlotCache, tokens: torch.Tensor) -> torch.Tensor:
        """One decode forward of ``tokens [B, q]`` at each row's next positions; logits ``[B, q, V]``."""
        q = tokens.shape[1]
        offsets = self.rows.cached[:, None] + cache.pending + torch.arange(q, device=tokens.device)[None]
        positions = decode_position_ids(self.spec, self.base_positions, offsets)
        if self.static is not None:
            return self.static.forward(cache, tokens, positions)
        mask = cache.begin_forward(q)  # [B, 1, groups * q, kv_len] additive, a view of the cache's own
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
        scoring = seconds.get("select", 0.0)  # the observer's, inside the prefill
        gathered_bytes = self.sparse.nbytes() if self.sparse is not None else 0
        return DecodeStats(
            mode=self.config.mode,
            gamma=self.gamma,
            rows=tuple(self.rows.stats),
            prefill_seconds=seconds.get("prefill", 0.0) - scoring,
            select_seconds=scoring + seconds.get("gather", 0.0),
            draft_seconds=seconds.get("draft", 0.0),
            verify_seconds=seconds.get("verify", 0.0),
            rounds_seconds=seconds.get("rounds", 0.0),
            batch_rounds=len(self.round_gammas),
            round_gammas=tuple(self.round_gammas),
            visual_tokens=tuple(int(x) for x in self.layout.visual.sum(dim=1).tolist()),
            kept_prompt_tokens=tuple(int(x) for x in self.layout.keep_counts.tolist()),
            sparse_cache_bytes=gathered_bytes,
            dense_cache_bytes=self.dense.nbytes(),
            static_steps=self.static.kind if self.static is not None else "off",
            compile_seconds=self.static.compile_seconds if self.static is not None else 0.0,
            compiles=self.static.compiles if self.static is not None else 0,
        )


def _prompt_layout(
    spec: ModelSpec, config: StdConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> PromptLayout:
    """Which prompt positions are real, which visual, which text scores them, and how many are kept."""
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    visual = torch.isin(input_ids, torch.tensor(spec.visual_token_ids, device=input_ids.device))
    return PromptLayout.build(valid, visual, config.sparse_budget, config.selection_queries)
