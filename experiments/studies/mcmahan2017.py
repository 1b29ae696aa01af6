"""McMahan et al. 2017 (FedAvg), MNIST: rounds to a target test accuracy.

100 clients, C = 0.1 (10 per round); IID (600 examples each) and pathological
non-IID (200 shards of 300 sorted examples, 2 per client). For each row the
learning rate is picked from a small grid, as the paper does, and a run stops
at the first round reaching the target or at 1.5x the paper's rounds.

    python -m experiments.studies.mcmahan2017 [--rows 2nn-iid,2nn-noniid,cnn-iid]

Writes experiments/results/mcmahan2017_<row>.json per row, and the table and
plot of every finished row, experiments/results/mcmahan2017.{md,png}.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator_service import ExperimentConfig
from aggregator_service.persistence import RoundRecord
from experiments.studies._results import RESULTS, add_result_flags, check
from fedmq.compose import simulate


@dataclass(frozen=True)
class Row:
    """One line of the paper's tables."""

    key: str
    model: str
    partition: str
    epochs: int
    target: float
    paper_rounds: int
    lrs: tuple[float, ...]

    @property
    def cap(self) -> int:
        """Return the round budget: 1.5x the paper's rounds."""
        return int(self.paper_rounds * 1.5)


ROWS = {
    r.key: r
    for r in (
        Row("cnn-iid", "mnist_cnn", "iid", 5, 0.99, 20, (0.1,)),
        Row("cnn-noniid", "mnist_cnn", "shards", 5, 0.99, 229, (0.05,)),
        Row("2nn-iid", "mnist_2nn", "iid", 10, 0.97, 34, (0.05, 0.1)),
        Row("2nn-noniid", "mnist_2nn", "shards", 10, 0.97, 497, (0.1,)),
    )
}


def config_for(row: Row, lr: float) -> ExperimentConfig:
    """Return the experiment config of one row at one learning rate."""
    return ExperimentConfig.from_dict(
        {
            "name": f"mcmahan2017-{row.key}-lr{lr}",
            "seed": 0,
            "model": {"zoo": row.model, "input_shape": [1, 28, 28], "num_classes": 10},
            "data": {
                "dataset": "mnist",
                "devices": 100,
                "partition": row.partition,
                "shards_per_device": 2,
            },
            "strategy": {"name": "fedavg"},
            "rounds": {"count": row.cap, "devices_per_round": 10, "deadline_s": 3600.0},
            "training": {"epochs": row.epochs, "batch_size": 10, "optimizer": "sgd", "lr": lr},
        }
    )


def run_row(row: Row) -> dict[str, Any]:
    """Run every learning rate of a row; return the best (fewest rounds to target)."""
    trials = []
    for lr in row.lrs:
        started = time.perf_counter()

        def show(record: RoundRecord, lr: float = lr) -> None:
            acc = record.metrics.get("accuracy", float("nan"))
            print(f"{row.key} lr={lr} round {record.number}: accuracy {acc:.4f}", flush=True)

        result = simulate(
            config_for(row, lr),
            progress=show,
            stop_when=lambda r: r.metrics.get("accuracy", 0.0) >= row.target,
        )
        curve = [r.metrics.get("accuracy", 0.0) for r in result.rounds]
        reached = next((i + 1 for i, acc in enumerate(curve) if acc >= row.target), None)
        trials.append(
            {
                "lr": lr,
                "rounds_to_target": reached,
                "curve": curve,
                "wall_s": time.perf_counter() - started,
            }
        )
    best = min(trials, key=lambda t: t["rounds_to_target"] or 10**9)
    return {
        "row": row.key,
        "target": row.target,
        "paper_rounds": row.paper_rounds,
        "cap": row.cap,
        "best": best,
        "trials": trials,
    }


def render(results: list[dict[str, Any]]) -> str:
    """Return the results table in markdown."""
    lines = [
        "# McMahan et al. 2017 on MNIST (FedAvg, 100 clients, C = 0.1, B = 10)",
        "",
        "| row | target | paper rounds | FedMQ rounds (best lr) | within 1.5x | lr grid: rounds "
        "| wall time |",
        "| --- | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in results:
        best = r["best"]
        got = best["rounds_to_target"]
        cap = r["cap"]
        grid = ", ".join(f"{t['lr']}: {t['rounds_to_target'] or f'>{cap}'}" for t in r["trials"])
        wall = sum(t["wall_s"] for t in r["trials"])
        lines.append(
            f"| {r['row']} | {r['target']:.2f} | {r['paper_rounds']} | "
            f"{got if got else f'not within {cap}'} (lr {best['lr']}) | "
            f"{'yes' if got and got <= r['cap'] else 'no'} | {grid} | {wall / 60:.1f} min |"
        )
    lines += [
        "",
        "Command: `python -m experiments.studies.mcmahan2017 --rows "
        + ",".join(r["row"] for r in results)
        + "`",
    ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Plot accuracy per round for every trial, with each row's target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        for t in r["trials"]:
            ax.plot(range(1, len(t["curve"]) + 1), t["curve"], label=f"lr {t['lr']}")
        ax.axhline(r["target"], color="grey", linestyle="--", label="target")
        ax.set(title=r["row"], xlabel="round", ylabel="test accuracy", ylim=(0.8, 1.0))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen rows and write (or check) the table, the data and the plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rows",
        default="2nn-iid,2nn-noniid,cnn-iid",
        help=f"comma-separated, from {', '.join(ROWS)}",
    )
    add_result_flags(parser)
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    computed = {key: run_row(ROWS[key]) for key in args.rows.split(",")}
    if args.check:
        saved = {key: RESULTS / f"mcmahan2017_{key}.json" for key in ROWS}
        committed = {k: json.loads(p.read_text()) for k, p in saved.items() if p.exists()}
        return check("mcmahan2017.md", render(list({**committed, **computed}.values())))
    for key, row_result in computed.items():
        # One file per row, so rows can run in parallel processes and be rerun alone.
        (out / f"mcmahan2017_{key}.json").write_text(json.dumps(row_result, indent=2))
    results = [
        json.loads((out / f"mcmahan2017_{key}.json").read_text())
        for key in ROWS
        if (out / f"mcmahan2017_{key}.json").exists()
    ]
    (out / "mcmahan2017.md").write_text(render(results))
    plot(results, out / "mcmahan2017.png")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
