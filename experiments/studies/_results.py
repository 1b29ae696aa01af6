"""Where a study writes its results, and how a run checks them against the committed ones.

Every study takes ``--out DIR`` (default ``experiments/results``) and
``--check``: with ``--check`` it writes nothing and exits 1, showing the
difference, when the table it computed differs from the committed one.
The lines that time the run (they start with ``Command:`` or hold a wall
time column) are left out of the comparison: they vary with the machine.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def add_result_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--out`` and ``--check`` to a study's command line."""
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder to write to (default: %(default)s)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare the computed table with the committed one instead of writing; exit 1 "
        "if they differ",
    )


_WALL_TIME = re.compile(r" [0-9.]+ (min|s) \|$")
"""A table row's last cell when it is a wall time."""


def comparable(table: str) -> list[str]:
    """Return a table's lines without what times the run (its command line, wall times)."""
    lines = [line for line in table.splitlines() if not line.startswith("Command:")]
    return [_WALL_TIME.sub(" |", line) for line in lines]


def check(name: str, table: str) -> int:
    """Return 0 if ``table`` equals the committed ``name``, else print the difference; 1."""
    committed = (RESULTS / name).read_text()
    if comparable(committed) == comparable(table):
        print(f"{name}: the committed table is what this checkout computes")
        return 0
    diff = difflib.unified_diff(
        comparable(committed), comparable(table), f"committed {name}", "computed", lineterm=""
    )
    print("\n".join(diff), file=sys.stderr)
    print(f"{name}: differs; regenerate it with `make results`", file=sys.stderr)
    return 1
