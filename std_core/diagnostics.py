"""Where two decodes of the same batch diverge, and how close the dense model was to a tie there.

In bf16/fp16 a parallel verify does not reduce in the same order as one-token decoding, so a near-tie
between the two best tokens can flip (transformers#39421). When an StD output differs from the dense
one, :func:`first_divergence` reports the first differing token and the dense logit margin there,
computed by one teacher-forced dense forward over the prompt and sequence ``a``: a tiny margin means a
numerical near-tie, a large one a bug.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from std_core.models import inspect_model


@dataclass(frozen=True)
class Divergence:
    """The first differing generated token of one row.

    ``position`` counts generated tokens from 0; ``margin`` is the dense top-1 minus top-2 logit at
    that position; ``gap`` is the dense logit of ``token_a`` minus that of ``token_b``.
    """

    row: int
    position: int
    token_a: int
    token_b: int
    margin: float
    gap: float


def first_divergence(
    model: torch.nn.Module,
    inputs: dict,
    sequences_a: torch.Tensor,
    sequences_b: torch.Tensor,
    pad_token_id: int | None = None,
) -> list[Divergence | None]:
    """Per row, the first generated position where ``sequences_a`` and ``sequences_b`` differ (None if
    they agree), with the dense model's logit margin there. Both are ``generate``-style outputs of the
    same ``inputs`` (prompt first)."""
    spec = inspect_model(model)
    prompt_len = inputs["input_ids"].shape[1]
    pad = model.generation_config.pad_token_id if pad_token_id is None else pad_token_id
    gen_a, gen_b = sequences_a[:, prompt_len:], sequences_b[:, prompt_len:]
    width = max(gen_a.shape[1], gen_b.shape[1])
    gen_a = torch.nn.functional.pad(gen_a, (0, width - gen_a.shape[1]), value=pad if pad is not None else -1)
    gen_b = torch.nn.functional.pad(gen_b, (0, width - gen_b.shape[1]), value=pad if pad is not None else -1)
    differs = gen_a != gen_b
    if not bool(differs.any()):
        return [None] * gen_a.shape[0]
    logits = _teacher_forced_logits(model, spec.mrope, inputs, gen_a)
    result: list[Divergence | None] = []
    for row in range(gen_a.shape[0]):
        if not bool(differs[row].any()):
            result.append(None)
            continue
        pos = int(differs[row].long().argmax())
        scores = logits[row, pos].float()
        top2 = scores.topk(2).values
        a, b = int(gen_a[row, pos]), int(gen_b[row, pos])
        gap = float(scores[a] - scores[b]) if b >= 0 else float("nan")
        result.append(Divergence(row, pos, a, b, float(top2[0] - top2[1]), gap))
    return result


def _teacher_forced_logits(
    model: torch.nn.Module, mrope: bool, inputs: dict, generated: torch.Tensor
) -> torch.Tensor:
    """Dense logits ``[B, T, V]`` predicting each generated token from the prompt and the tokens before."""
    prompt_len = inputs["input_ids"].shape[1]
    forced = dict(inputs)
    forced["input_ids"] = torch.cat([inputs["input_ids"], generated.clamp(min=0)], dim=1)
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(inputs["input_ids"]) if mask is None else mask
    forced["attention_mask"] = torch.cat([mask, torch.ones_like(generated)], dim=1)
    if "mm_token_type_ids" in inputs:
        forced["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(generated)], dim=1
        )
    if not mrope:
        positions = forced["attention_mask"].long().cumsum(-1) - 1
        forced["position_ids"] = positions.clamp(min=0)
    with torch.inference_mode():
        logits = model(**forced, use_cache=False).logits
    return logits[:, prompt_len - 1 : -1]
