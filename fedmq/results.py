"""Run results on disk: rounds.csv, results.json, the model files and a plot."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aggregator_service.persistence import RoundRecord
from aggregator_service.rounds import describe
from fedmq.argtypes import UsageError

log = logging.getLogger(__name__)

CSV_COLUMNS = (
    "round",
    "state",
    "selected",
    "reported",
    "accepted",
    "rejected",
    "dropped",
    "loss",
    "accuracy",
    "train_loss",
    "duration_s",
)


def round_row(record: RoundRecord) -> dict[str, Any]:
    """Return the flat row a round contributes to ``rounds.csv`` and the progress table."""
    return {
        "round": record.number,
        "state": record.state,
        "selected": len(record.selected),
        "reported": record.reported,
        "accepted": len(record.accepted),
        "rejected": sum(record.rejected.values()),
        "dropped": record.dropped,
        "loss": record.metrics.get("loss"),
        "accuracy": record.metrics.get("accuracy"),
        "train_loss": record.metrics.get("train_loss"),
        "duration_s": record.duration_s,
    }


def prepare_folder(out: Path) -> None:
    """Create the results folder ``out`` now; raise ``UsageError`` if it cannot hold them.

    Called before a run: a path that cannot be written would otherwise fail
    only after every round, with the run's results lost.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create the folder: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write into the folder")


def write_results(
    out: Path,
    *,
    experiment_id: str,
    config: Mapping[str, Any],
    rounds: Sequence[RoundRecord],
    initial_weights: bytes,
    final_weights: bytes,
    wall_time_s: float,
) -> None:
    """Write every result file of a run into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "rounds.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for record in rounds:
            writer.writerow({k: "" if v is None else v for k, v in round_row(record).items()})
    committed = [r for r in rounds if r.state == "committed"]
    summary = {
        "experiment_id": experiment_id,
        "config": dict(config),
        "rounds": [describe(r) for r in rounds],
        "final": dict(committed[-1].metrics) if committed else {},
        "wall_time_s": wall_time_s,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "model_initial.safetensors").write_bytes(initial_weights)
    (out / "model_final.safetensors").write_bytes(final_weights)
    plot_rounds(rounds, out / "accuracy_loss.png", title=str(config.get("name", experiment_id)))


def plot_rounds(rounds: Sequence[RoundRecord], path: Path, *, title: str) -> None:
    """Plot held-out accuracy and loss per round into a PNG (skipped without matplotlib)."""
    try:
        import matplotlib
    except ImportError:  # a lean install (no `fedmq[plots]`): the tables are still written
        log.warning("no plot: matplotlib is not installed (pip install 'fedmq[plots]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rounds if r.state == "committed"]
    xs = [r.number for r in done]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot(xs, [r.metrics.get("accuracy", float("nan")) for r in done], marker="o")
    acc_ax.set(xlabel="round", ylabel="held-out accuracy", title="accuracy")
    loss_ax.plot(
        xs, [r.metrics.get("loss", float("nan")) for r in done], marker="o", label="held-out"
    )
    loss_ax.plot(
        xs,
        [r.metrics.get("train_loss", float("nan")) for r in done],
        marker=".",
        label="devices' training",
    )
    loss_ax.set(xlabel="round", ylabel="cross-entropy", title="loss")
    loss_ax.legend()
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
