"""The metric definitions in ``std_core.stats``: the functions, ``RowStats`` sums and column round trips,
and that the config and the metrics import without torch (a Ray driver reads them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from std_core.stats import (
    DecodeStats,
    RowStats,
    acceptance_rate,
    mean_accepted_per_round,
    tokens_per_second,
)

REPO = Path(__file__).resolve().parents[2]


def test_metric_functions_and_their_empty_denominators() -> None:
    assert acceptance_rate(3, 4) == 0.75
    assert acceptance_rate(0, 0) is None
    assert mean_accepted_per_round(9, 3) == 3.0
    assert mean_accepted_per_round(1, 0) is None
    assert tokens_per_second(10, 2.0) == 5.0
    assert tokens_per_second(10, 0.0) is None


def test_mean_accepted_per_round_of_a_sum_is_committed_over_rounds() -> None:
    """A row of 5 tokens in 2 rounds plus a row that stopped after the prefill's token: 4 / 2, not 6 / 2."""
    long, short = RowStats(generated=5, rounds=2, committed=4), RowStats(generated=1, rounds=0)
    total = long + short
    assert (total.generated, total.rounds, total.committed) == (6, 2, 4)
    assert total.mean_accepted_per_round == 2.0
    assert mean_accepted_per_round(total.committed, total.rounds) == 2.0
    columns = [{"generated_tokens": 5, "rounds": 2}, {"generated_tokens": 1, "rounds": 0}]
    from_columns = RowStats.from_columns(columns[0]) + RowStats.from_columns(columns[1])
    assert from_columns.mean_accepted_per_round == 2.0


@pytest.mark.parametrize("n", [2, 7, 40])
def test_a_dense_row_commits_one_token_per_round(n: int) -> None:
    row = RowStats.from_columns({"generated_tokens": n, "rounds": n - 1})
    assert row.committed == n - 1
    assert row.mean_accepted_per_round == 1.0


def test_from_columns_reads_missing_and_null_counts_as_zero() -> None:
    nulls = {"generated_tokens": None, "rounds": None, "drafted_tokens": None, "accepted_tokens": None}
    assert RowStats.from_columns(nulls) == RowStats()
    assert RowStats.from_columns({}) == RowStats()
    row = RowStats.from_columns({"generated_tokens": 3, "rounds": None, "drafted_tokens": None})
    assert row == RowStats(generated=3)
    assert row.mean_accepted_per_round == 0.0 and row.acceptance_rate == 0.0


def test_row_columns_read_back_to_the_same_counts() -> None:
    rows = (RowStats(5, 2, 8, 3, 1, committed=4), RowStats(1, 0, 0, 0, 0, committed=0))
    stats = DecodeStats(mode="std", gamma=4, rows=rows, batch_rounds=2)
    assert tuple(RowStats.from_columns(stats.row_columns(i)) for i in range(len(rows))) == rows
    summary = stats.summary()
    assert summary["mean_accepted_per_round"] == 2.0
    assert summary["acceptance_rate"] == 3 / 8
    assert summary["generated_tokens"] == 6


def test_config_and_stats_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import std_core.config, std_core.stats\n"
        "from std_core import RowStats, StdConfig\n"
        "StdConfig(); RowStats()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"heavy modules imported: {done.stdout.strip()}"
