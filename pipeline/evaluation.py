"""Offline evaluation of StD against dense decoding on rows where both ran (``dense_sample=-1``).

:func:`run_evaluation` runs the pipeline once per task (StD, with every batch decoded again densely on
the same actor), reads the rows back and writes the report to ``<output>/_evaluation.json``. Reported,
over the ``ok`` rows of one run:

- ``accuracy``: per decoder, over the rows with an answer: for mcq the option letter parsed from the text
  (:func:`score_mcq`), for qa a normalised exact match (:func:`score_qa`). Captions are scored only by a
  caption scorer handed in, which the demo's own held-out clips have (``pipeline.demo.scoring``: the
  attribute hits ``caption_colour`` / ``_shape`` / ``_motion`` / ``_order`` and their mean
  ``caption_attributes``); captions of any other manifest are counted in ``unscored_captions``. StD is
  lossless, so the two decoders agree wherever their outputs are identical;
- ``exact_match_rate``: rows whose StD tokens equal the dense tokens. Greedy fp32 must give 1.0; in
  bf16/fp16 a parallel verify can flip a near-tie, and each ``divergences`` entry gives the first
  differing position and the dense top-1 minus top-2 logit margin there (a tiny margin means a tie);
- ``acceptance_rate`` and ``mean_accepted_per_round`` (``std_core.stats``, over the summed row counts)
  and ``speedup`` (dense / StD decode seconds).

A benchmark run (``benchmark=``, :mod:`pipeline.benchmarks`) evaluates the benchmark's normalised
manifest as one mcq run, with the preset's answer parser (``MCQ_PARSERS``): an answer that parses to no
option counts as wrong, and ``accuracy.unparsable_answers`` counts them per decoder. Its ``benchmark``
section (:func:`benchmark_report`) joins the rows with the questions' group values by ``id`` and gives
the counts (questions, rejected with their reasons, scored, coverage), the pooled accuracy, the
accuracy per value of each group column, and the benchmark's ``headline`` (Video-MME: the pooled
accuracy; MLVU: the mean of the per-task accuracies).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.benchmarks import HEADLINE_GROUP, BenchmarkConfig, PreparedBenchmark, prepare_benchmark
from pipeline.config import TASKS, PipelineConfig
from pipeline.prompts import MCQ_PARSERS, McqParser, parse_mcq_answer
from pipeline.run import run_pipeline
from pipeline.schema import STATUS_OK
from pipeline.sink import read_rows, write_json
from pipeline.storage import join
from std_core.stats import RowStats, acceptance_rate, mean_accepted_per_round

MAX_LISTED_DIVERGENCES = 20
EVALUATION_FIXED = {"decoder": "std", "dense_sample": -1}  # StD, and every batch again densely
ALL_TASKS = "all"
EVALUATION_TASKS = (ALL_TASKS, *TASKS)  # what --task selects: all of them in turn, or one
NO_CAPTION_SCORER = "no scorer for captions outside the demo world"

MAX_LISTED_REJECTED = 20
DECODER_TEXT = {"std": "text", "dense": "dense_text"}  # decoder -> the row column of its answer

# (generated caption, reference caption) -> per-attribute hits, recorded as ``caption_<attribute>``
CaptionScorer = Callable[[str, str], Mapping[str, Sequence[bool]]]
# (generated text, number of options) -> the option letter it answers, or None

_WORD = re.compile(r"[a-z]+")


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def normalise_answer(text: str) -> str:
    """Lower-case words only: ``" Red."`` -> ``"red"``."""
    return " ".join(_WORD.findall(text.lower()))


def score_qa(generated: str, truth: str) -> bool:
    """Normalised exact match."""
    return normalise_answer(generated) == normalise_answer(truth)


def score_mcq(
    generated: str, truth_letter: str, num_options: int, parser: McqParser = parse_mcq_answer
) -> bool:
    """The option letter ``parser`` reads in ``generated`` (by default the first standalone one) is the
    right one; no letter is wrong."""
    return parser(generated, num_options) == truth_letter.strip().upper()


@dataclass
class Tally:
    """Running hit lists per metric; ``summary()`` gives the fractions (NaN-free: empty metrics omitted),
    plus ``caption_attributes``, the mean of the ``caption_*`` metrics, where there are some."""

    hits: dict[str, list[bool]] = field(default_factory=dict)

    def add(self, metric: str, values: Iterable[bool]) -> None:
        self.hits.setdefault(metric, []).extend(bool(v) for v in values)

    def add_scores(self, prefix: str, scores: Mapping[str, Iterable[bool]]) -> None:
        """Each ``{name: hits}`` entry as metric ``<prefix><name>``."""
        for name, values in scores.items():
            self.add(prefix + name, values)

    def summary(self) -> dict[str, float]:
        out = {name: sum(v) / len(v) for name, v in sorted(self.hits.items()) if v}
        parts = [value for name, value in out.items() if name.startswith("caption_")]
        if parts:
            out["caption_attributes"] = sum(parts) / len(parts)
        return out


# ---------------------------------------------------------------------------------------------------
# The report of one run's rows
# ---------------------------------------------------------------------------------------------------


def evaluation_report(
    table: pa.Table, caption_scorer: CaptionScorer | None = None, *, mcq_parser: McqParser = parse_mcq_answer
) -> dict:
    """The report for the rows of one evaluation run (see the module docstring)."""
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == STATUS_OK]
    compared = [r for r in ok if r["dense_match"] is not None]
    diverged = [r for r in compared if not r["dense_match"]]
    margins = [r["divergence_margin"] for r in diverged if r["divergence_margin"] is not None]
    counts = sum((RowStats.from_columns(r) for r in ok), RowStats())
    std_seconds = sum(r["decode_seconds"] or 0.0 for r in compared)
    dense_seconds = sum(r["dense_decode_seconds"] or 0.0 for r in compared)
    return {
        "rows": len(rows),
        "rows_ok": len(ok),
        "rows_error": len(rows) - len(ok),
        "accuracy": _accuracy(ok, caption_scorer, mcq_parser),
        "compared_rows": len(compared),
        "exact_match_rate": _round(_ratio(len(compared) - len(diverged), len(compared))),
        "divergences": [
            {"id": r["id"], "position": r["divergence_position"], "margin": r["divergence_margin"]}
            for r in diverged[:MAX_LISTED_DIVERGENCES]
        ],
        "divergence_margin_min": min(margins) if margins else None,
        "divergence_margin_median": statistics.median(margins) if margins else None,
        "acceptance_rate": _round(acceptance_rate(counts.accepted, counts.drafted)),
        "mean_accepted_per_round": _round(mean_accepted_per_round(counts.committed, counts.rounds)),
        "std_decode_seconds": round(std_seconds, 4),
        "dense_decode_seconds": round(dense_seconds, 4),
        "speedup": _round(_ratio(dense_seconds, std_seconds)),
    }


def _accuracy(rows: list[dict], caption_scorer: CaptionScorer | None, parser: McqParser) -> dict:
    """Per decoder, the metrics of the rows that have an answer and a scorer (see the module docstring)."""
    answered = [r for r in rows if r["answer"] is not None]
    scored = [r for r in answered if r["task"] != "caption" or caption_scorer is not None]
    std, dense = Tally(), Tally()
    for row in scored:
        _score(std, row, row["text"], caption_scorer, parser)
        if row["dense_text"] is not None:
            _score(dense, row, row["dense_text"], caption_scorer, parser)
    out: dict = {"scored": len(scored), "std": std.summary(), "dense": dense.summary()}
    if mcq := [r for r in scored if r["task"] == "mcq"]:
        out["unparsable_answers"] = {
            decoder: sum(_parsed(r, column, parser) is None for r in mcq if r[column] is not None)
            for decoder, column in DECODER_TEXT.items()
        }
    if unscored := len(answered) - len(scored):
        out |= {"unscored_captions": unscored, "caption": NO_CAPTION_SCORER}
    return out


def _parsed(row: dict, column: str, parser: McqParser) -> str | None:
    """The option letter an mcq row's answer in ``column`` gives, or None (no text, or no letter)."""
    return None if row[column] is None else parser(row[column], len(row["options"] or []))


def _score(
    tally: Tally, row: dict, text: str | None, caption_scorer: CaptionScorer | None, parser: McqParser
) -> None:
    if row["task"] == "caption" and caption_scorer is not None:
        tally.add_scores("caption_", caption_scorer(text or "", row["answer"]))
    elif row["task"] == "mcq":
        tally.add(
            "mcq", [text is not None and score_mcq(text, row["answer"], len(row["options"] or []), parser)]
        )
    else:
        tally.add(row["task"], [text is not None and score_qa(text, row["answer"])])


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# ---------------------------------------------------------------------------------------------------
# A benchmark's report: groups, headline, rejected questions
# ---------------------------------------------------------------------------------------------------


def benchmark_report(
    table: pa.Table, prepared: PreparedBenchmark, parser: McqParser = parse_mcq_answer
) -> dict:
    """The ``benchmark`` section of a benchmark run's report (see the module docstring): ``table``'s
    rows joined by ``id`` with ``prepared``'s side table of group values."""
    groups = prepared.groups
    rows = [r for r in table.to_pylist() if r["id"] in groups]
    ok = [r for r in rows if r["status"] == STATUS_OK]
    scored = [(groups[r["id"]], _hits(r, parser)) for r in ok if r["answer"] is not None]
    rejected = prepared.rejected
    report = {
        "name": prepared.name,
        "prompt_preset": prepared.preset,
        "questions": len(prepared.questions),
        "questions_rejected": len(rejected),
        "rejected_reasons": dict(Counter((q.error or "").split(": ", 1)[0] for q in rejected)),
        "rejected": [{"id": q.row_id, "error": q.error} for q in rejected[:MAX_LISTED_REJECTED]],
        "rows": len(rows),
        "rows_error": len(rows) - len(ok),
        "scored": len(scored),
        "coverage": _round(_ratio(len(scored), len(prepared.questions))),
        "accuracy": _decoder_accuracy([hits for _, hits in scored]),
        "groups": {column: _group_accuracy(scored, column) for column in prepared.group_by},
    }
    if prepared.headline == "mean_task_accuracy":  # the mean over tasks of their unrounded accuracies
        by_task: dict[str, list[dict]] = {}
        for values, hits in scored:
            by_task.setdefault(values.get(HEADLINE_GROUP, ""), []).append(hits)
        per_task = [_accuracy_of(hits) for hits in by_task.values()]
        headline = {d: _mean([t[d] for t in per_task if t[d] is not None]) for d in DECODER_TEXT}
    else:
        headline = report["accuracy"]
    return report | {"headline": {"metric": prepared.headline, **headline}}


def _hits(row: dict, parser: McqParser) -> dict[str, bool | None]:
    """Per decoder: is its answer right (an unparsable one is wrong); None where it has no answer."""
    return {
        decoder: None if row[column] is None else _parsed(row, column, parser) == row["answer"]
        for decoder, column in DECODER_TEXT.items()
    }


def _accuracy_of(hits: list[dict[str, bool | None]]) -> dict[str, float | None]:
    """Per decoder, the fraction of right answers among the rows with one (unrounded)."""
    out = {}
    for decoder in DECODER_TEXT:
        known = [h[decoder] for h in hits if h[decoder] is not None]
        out[decoder] = sum(known) / len(known) if known else None
    return out


def _decoder_accuracy(hits: list[dict[str, bool | None]]) -> dict[str, float | None]:
    return {d: _round(value) for d, value in _accuracy_of(hits).items()}


def _group_accuracy(scored: list[tuple[dict, dict]], column: str) -> dict[str, dict]:
    """``{value: {"scored": n, "std": accuracy, "dense": accuracy}}`` over the values of ``column``."""
    by_value: dict[str, list[dict]] = {}
    for values, hits in scored:
        by_value.setdefault(values.get(column, ""), []).append(hits)
    return {v: {"scored": len(h), **_decoder_accuracy(h)} for v, h in sorted(by_value.items())}


def _mean(values: Sequence[float]) -> float | None:
    return _round(sum(values) / len(values)) if values else None


# ---------------------------------------------------------------------------------------------------
# The evaluation run
# ---------------------------------------------------------------------------------------------------


def caption_scorer_for(config: PipelineConfig) -> CaptionScorer | None:
    """The demo world's caption-attribute scorer when the run evaluates the demo's own held-out clips
    (no ``--input``); None for a user's manifest, whose captions no attribute list describes."""
    if config.input is not None:
        return None
    from pipeline.demo.scoring import score_caption  # the demo only where its own data is evaluated

    return score_caption


def run_evaluation(
    config: PipelineConfig, tasks: str = ALL_TASKS, *, benchmark: BenchmarkConfig | None = None
) -> dict:
    """Evaluate ``tasks`` (one of :data:`EVALUATION_TASKS`) with ``config``; return the report, also
    written to ``<config.output>/_evaluation.json``.

    ``"all"`` runs caption, qa and mcq in turn, each into its own ``<output>/<task>/`` folder (so each
    task's ``--if-exists`` applies to its own rows), and reports over all rows plus ``per_task``.
    With a ``benchmark`` (its ``.benchmark`` set), ``config.input`` is read as that benchmark: see
    :func:`run_benchmark_evaluation`."""
    if tasks not in EVALUATION_TASKS:
        raise ValueError(f"tasks must be one of {', '.join(EVALUATION_TASKS)}; got {tasks!r}")
    if benchmark is not None and benchmark.benchmark is not None:
        return run_benchmark_evaluation(config, benchmark, tasks)
    selected = list(TASKS) if tasks == ALL_TASKS else [tasks]
    configs = [dataclasses.replace(config, **EVALUATION_FIXED, task=task) for task in selected]
    if len(configs) > 1:
        configs = [dataclasses.replace(c, output=join(c.output, c.task)) for c in configs]
    if config.dry_run:
        return _plans(configs)
    scorer = caption_scorer_for(config)
    report: dict = {"tasks": selected}
    per_task, tables = {}, []
    for task_config in configs:
        summary, table = _run_task(task_config)
        report["model"] = summary["model"]
        per_task[task_config.task] = {"run_id": summary["run_id"], **evaluation_report(table, scorer)}
        tables.append(table)
    if len(configs) == 1:
        report |= per_task[selected[0]]
    else:
        report |= evaluation_report(pa.concat_tables(tables), scorer) | {"per_task": per_task}
    write_json(join(config.output, "_evaluation.json"), report, config.storage_options())
    return report


def run_benchmark_evaluation(config: PipelineConfig, benchmark: BenchmarkConfig, tasks: str = "mcq") -> dict:
    """Normalise the benchmark at ``config.input`` into ``<output>/_benchmark/manifest.jsonl``, run it
    as one mcq evaluation (into ``<output>``), and report with the preset's parser, plus ``benchmark``."""
    if tasks not in (ALL_TASKS, "mcq"):
        raise ValueError(f"a benchmark is multiple-choice: pass --task mcq (or leave it out), not {tasks!r}")
    if config.input is None:
        raise ValueError(
            f"--benchmark {benchmark.benchmark} reads --input: pass the benchmark's file or folder"
        )
    # a dry run writes nothing to the output: its normalised manifest goes to a scratch folder
    scratch = tempfile.mkdtemp(prefix="std-benchmark-") if config.dry_run else config.output
    prepared = prepare_benchmark(benchmark, config.input, scratch, config.storage_options())
    task_config = dataclasses.replace(
        config, **EVALUATION_FIXED, task="mcq", input=prepared.manifest, mcq_parser=benchmark.prompt_preset
    )
    if config.dry_run:
        return _plans([task_config]) | {
            "questions": len(prepared.questions),
            "rejected": len(prepared.rejected),
        }
    parser = MCQ_PARSERS[benchmark.prompt_preset]
    summary, table = _run_task(task_config)
    report = {"tasks": ["mcq"], "model": summary["model"], "run_id": summary["run_id"]}
    report |= evaluation_report(table, mcq_parser=parser)
    report["benchmark"] = benchmark_report(table, prepared, parser)
    write_json(join(config.output, "_evaluation.json"), report, config.storage_options())
    return report


def _plans(configs: list[PipelineConfig]) -> dict:
    """``--dry-run``: each task's plan (``pipeline.run``'s dry-run summary); nothing runs or is written."""
    plans = {c.task: run_pipeline(c) for c in configs}
    return {"status": "planned", "dry_run": True, "tasks": list(plans), "plans": plans}


def _run_task(config: PipelineConfig) -> tuple[dict, pa.Table]:
    """Run one task's pipeline; return its summary and the rows of that run."""
    summary = run_pipeline(config)
    table = read_rows(config.output, config.storage_options())
    return summary, table.filter(pc.equal(table["run_id"], summary["run_id"]))
