"""The committed study tables are what this checkout computes (the quickest study, in full)."""

from __future__ import annotations

from typing import Any

import pytest

from experiments.studies import strategies_noniid
from experiments.studies._results import comparable


@pytest.mark.long
def test_the_committed_non_iid_strategy_table_is_what_head_computes(capsys: Any) -> None:
    # Seed 0 of every strategy and alpha: their curves, then the table from the data.
    status = strategies_noniid.main(["--check", "--seeds", "0"])

    out = capsys.readouterr()
    assert status == 0, out.err  # the difference; `make results` regenerates the table
    assert "the 14 runs checked are what this checkout computes" in out.out
    assert "the committed table is what this checkout computes" in out.out


def test_wall_times_are_left_out_of_the_comparison() -> None:
    table = "| row | 3 | 24.7 min |\nCommand: `x` (1.4 min).\n| row | 3 | 0.5 s |"
    assert comparable(table) == ["| row | 3 | |", "| row | 3 | |"]
