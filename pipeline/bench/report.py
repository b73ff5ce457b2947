"""Tables and figures from benchmark records: markdown, CSV and a PNG of speedup against visual tokens.

Records are flat dicts (``dataclasses.asdict`` of :class:`~pipeline.bench.records.DecoderRecord`, or
rows read back from a CSV). Measured and projected numbers sit in separate, labelled columns.
"""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

from pipeline.bench.projection import Projection, project, step_costs
from std_core.auto import StepCosts

# (column, header, format) of the markdown summary; the CSV holds every field.
SUMMARY_COLUMNS = (
    ("visual_tokens", "visual tokens", "{:d}"),
    ("batch", "batch", "{:d}"),
    ("prefill_ms", "prefill ms", "{:.0f}"),
    ("select_ms", "select ms", "{:.0f}"),
    ("dense_ms_per_token", "dense ms/tok", "{:.2f}"),
    ("std_ms_per_token", "StD ms/tok", "{:.2f}"),
    ("auto_ms_per_token", "auto ms/tok", "{:.2f}"),
    ("hf_ms_per_token", "HF ms/tok", "{:.2f}"),
    ("hf_gqa_ms_per_token", "HF+GQA ms/tok", "{:.2f}"),
    ("decode_speedup", "StD decode ×", "{:.2f}"),
    ("e2e_speedup", "StD e2e ×", "{:.2f}"),
    ("auto_decode_speedup", "auto decode ×", "{:.2f}"),
    ("best_fixed_gamma", "best fixed γ", "{:d}"),
    ("auto_vs_best", "auto / best", "{:.3f}"),
    ("acceptance_rate", "acceptance", "{:.2f}"),
    ("sink_acceptance_rate", "sink-window acceptance", "{:.2f}"),
    ("draft_step_ratio", "draft/dense step", "{:.2f}"),
    ("draft_bytes_ratio", "draft/dense bytes", "{:.2f}"),
    ("round_overhead_ratio", "bookkeeping/dense step", "{:.2f}"),
    ("verify_step_ratio", "verify/dense step", "{:.2f}"),
    ("draft_share", "draft share", "{:.2f}"),
    ("verify_share", "verify share", "{:.2f}"),
    ("other_share", "other share", "{:.2f}"),
    ("projected_decode_speedup", "projected decode ×", "{:.2f}"),
    ("projected_e2e_speedup", "projected e2e ×", "{:.2f}"),
    ("achieved_gbps", "GB/s (dense)", "{:.1f}"),
    ("dense_peak_mb", "dense peak MB", "{:.0f}"),
    ("std_peak_mb", "StD peak MB", "{:.0f}"),
    ("outputs_equal", "outputs equal", "{}"),
)


def markdown_table(records: Sequence[dict], columns: Sequence[tuple[str, str, str]] = SUMMARY_COLUMNS) -> str:
    """A GitHub markdown table of ``columns`` (missing or None values print as "–")."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |"]
    lines.append("|" + "|".join("---:" for _ in columns) + "|")
    for record in records:
        cells = [_cell(record.get(key), fmt) for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: object, fmt: str) -> str:
    if value is None or value == "":
        return "–"
    if "d}" in fmt:
        return fmt.format(int(float(value)))
    if "f}" in fmt:
        return fmt.format(float(value))
    return str(value)


def csv_text(records: Sequence[dict]) -> str:
    """Every field of every record, one row each (header from the first record)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def costs_of(record: dict) -> StepCosts:
    """The measured step costs of a record (as ``projected_*`` uses them)."""
    verify_round = float(record["verify_step_ms"]) + float(record["round_overhead_ms"])
    return step_costs(
        float(record["dense_ms_per_token"]) / 1000,
        float(record["draft_step_ms"]) / 1000,
        verify_round / 1000,
        int(record["gamma"]),
    )


def cross_project(record: dict, alpha: float) -> Projection:
    """Project ``record``'s measured step costs (e.g. the kv-bound preset's) at another model's measured
    per-draft acceptance ``alpha`` (e.g. the demo model's)."""
    tokens = int(record["new_tokens"]) - 1
    fixed = (float(record["prefill_ms"]) + float(record["select_ms"])) / 1000
    dense_decode = float(record["dense_ms_per_token"]) / 1000 * tokens
    return project(costs_of(record), alpha, int(record["gamma"]), fixed, dense_decode)


def plot_speedup(
    records: Sequence[dict], path: str | Path, title: str, batches: Sequence[int] = (1, 4, 8)
) -> Path:
    """PNG: StD decode speedup over dense against visual tokens, one colour per batch size; solid =
    measured (at the model's own acceptance), dotted = auto mode measured, dashed = projected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, batch in enumerate(batches):
        rows = sorted((r for r in records if int(r["batch"]) == batch), key=lambda r: int(r["visual_tokens"]))
        if not rows:
            continue
        x = [int(r["visual_tokens"]) for r in rows]
        colour = f"C{i}"
        _line(ax, x, rows, "decode_speedup", colour, "-", "o", f"batch {batch}: StD measured")
        _line(ax, x, rows, "auto_decode_speedup", colour, ":", "s", f"batch {batch}: auto measured")
        _line(ax, x, rows, "projected_decode_speedup", colour, "--", "^", f"batch {batch}: StD projected")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ticks = sorted({int(r["visual_tokens"]) for r in records})
    ax.set_xticks(ticks, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("visual tokens per video")
    ax.set_ylabel("decode speedup over dense (×)")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    fig.text(0.01, 0.01, "measured: at the model's own acceptance (random weights: see the table); "
             "projected: measured step costs at the stated acceptance profile", fontsize=6, color="grey")  # fmt: skip
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _line(
    ax: object, x: list[int], rows: list[dict], key: str, colour: str, style: str, marker: str, label: str
) -> None:
    points = [(xi, float(r[key])) for xi, r in zip(x, rows, strict=True) if r.get(key) not in (None, "")]
    if points:
        ax.plot(*zip(*points, strict=True), style, color=colour, marker=marker, label=label)


def write_sweep(records: Sequence[dict], out_dir: str | Path, name: str, title: str) -> dict[str, str]:
    """``<name>.md``, ``<name>.csv`` and ``<name>.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / f"{name}.md", "csv": out / f"{name}.csv", "figure": out / f"{name}.png"}
    paths["markdown"].write_text(f"{title}\n\n" + markdown_table(records))
    paths["csv"].write_text(csv_text(records))
    plot_speedup(records, paths["figure"], title)
    return {key: str(path) for key, path in paths.items()}
