"""`fedmq demo` as a user runs it: a real process, embedded defaults, the accuracy bar."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_reaches_90_percent_held_out_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "demo"

    proc = subprocess.run(
        [sys.executable, "-m", "fedmq", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert len(rounds) == 10 and all(r["state"] == "committed" for r in rounds)
    assert results["config"]["data"] == {
        "dataset": "digits",
        "devices": 20,
        "partition": "dirichlet",
        "alpha": 0.5,
        "shards_per_device": 2,
    }
    assert results["final"]["accuracy"] >= 0.90
    assert proc.stdout.count("committed") == 10  # one progress row per round
