"""FedAvg-family strategies compared on non-IID digits: same budget, several seeds.

20 devices holding Dirichlet(alpha) label-skewed shares of scikit-learn's
digits, 10 devices per round, 15 rounds, 2 local epochs of SGD; alpha in
{0.1, 0.5}; seeds 0-2. Reports the final held-out accuracy (mean and spread)
and plots mean accuracy per round.

    python -m experiments.studies.strategies_noniid [--check [--seeds S ...]] [--out DIR]

Writes experiments/results/strategies_noniid.{md,json,png}; ``--check``
compares instead: the committed table must be what HEAD computes. With
``--seeds`` it runs only those seeds, whose accuracy curves must equal the
committed data's, and checks the table against that data (``make test``
checks seed 0: a third of the time, every strategy and alpha).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from aggregator_service import ExperimentConfig
from experiments.studies._results import RESULTS, add_result_flags, check
from fedmq.compose import simulate

ALPHAS = (0.1, 0.5)
SEEDS = (0, 1, 2)
ROUNDS = 15
STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedprox": {"name": "fedprox", "proximal_mu": 0.01},
    "fedavgm": {"name": "fedavgm", "server_lr": 1.0, "momentum": 0.9},
    "fedadam": {"name": "fedadam", "eta": 0.01, "tau": 1e-3},
    "fedyogi": {"name": "fedyogi", "eta": 0.01, "tau": 1e-3},
    "fednova": {"name": "fednova"},
    "scaffold": {"name": "scaffold", "num_clients": 20},
}


def config_for(strategy: dict[str, Any], alpha: float, seed: int) -> ExperimentConfig:
    """Return one run's config."""
    return ExperimentConfig.from_dict(
        {
            "name": f"noniid-{strategy['name']}-a{alpha}-s{seed}",
            "seed": seed,
            "model": {"zoo": "mlp", "input_shape": [64], "num_classes": 10, "hidden": [64]},
            "data": {"dataset": "digits", "devices": 20, "partition": "dirichlet", "alpha": alpha},
            "strategy": strategy,
            "rounds": {"count": ROUNDS, "devices_per_round": 10},
            "training": {"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.05},
        }
    )


def main(argv: list[str] | None = None) -> int:
    """Run every strategy, alpha and seed; write (or check) the table, data and plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_result_flags(parser)
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        choices=SEEDS,
        default=list(SEEDS),
        help="with --check: run only these seeds (default: all)",
    )
    args = parser.parse_args(argv)
    runs: list[dict[str, Any]] = []
    for alpha in ALPHAS:
        for key, strategy in STRATEGIES.items():
            for seed in args.seeds:
                started = time.perf_counter()
                result = simulate(config_for(strategy, alpha, seed))
                curve = [r.metrics.get("accuracy", 0.0) for r in result.rounds]
                runs.append(
                    {
                        "strategy": key,
                        "alpha": alpha,
                        "seed": seed,
                        "curve": curve,
                        "final": curve[-1],
                        "wall_s": time.perf_counter() - started,
                    }
                )
                print(f"alpha={alpha} {key} seed={seed}: {curve[-1]:.4f}", flush=True)
    if args.check and sorted(args.seeds) != list(SEEDS):
        return _check_sample(runs)
    if args.check:
        return check("strategies_noniid.md", render(runs))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "strategies_noniid.json").write_text(json.dumps(runs, indent=2))
    (args.out / "strategies_noniid.md").write_text(render(runs))
    plot(runs, args.out / "strategies_noniid.png")
    print(render(runs))
    return 0


def _check_sample(runs: list[dict[str, Any]]) -> int:
    """Check some seeds' runs against the committed data, and the table against the data."""
    committed = json.loads((RESULTS / "strategies_noniid.json").read_text())
    by_run = {(r["strategy"], r["alpha"], r["seed"]): r["curve"] for r in committed}
    differ = [
        f"{r['strategy']} alpha={r['alpha']} seed={r['seed']}"
        for r in runs
        if by_run.get((r["strategy"], r["alpha"], r["seed"])) != r["curve"]
    ]
    if differ:
        print(f"strategies_noniid.json: these runs differ: {differ}", file=sys.stderr)
        print("regenerate the results with `make results`", file=sys.stderr)
        return 1
    print(f"strategies_noniid.json: the {len(runs)} runs checked are what this checkout computes")
    return check("strategies_noniid.md", render(committed))


def render(runs: list[dict[str, Any]]) -> str:
    """Return the final-accuracy table (mean +- standard deviation over seeds)."""
    lines = [
        "# FedAvg-family strategies on non-IID digits",
        "",
        f"20 devices, 10 per round, {ROUNDS} rounds, 2 local epochs (SGD, lr 0.05, batch 16), "
        f"MLP 64-64-10; seeds {', '.join(map(str, SEEDS))}. Final held-out accuracy.",
        "",
        "| strategy | " + " | ".join(f"alpha = {a}" for a in ALPHAS) + " |",
        "| --- | " + " | ".join("---:" for _ in ALPHAS) + " |",
    ]
    for key in STRATEGIES:
        cells = []
        for alpha in ALPHAS:
            finals = [r["final"] for r in runs if r["strategy"] == key and r["alpha"] == alpha]
            cells.append(f"{statistics.mean(finals):.3f} +- {statistics.pstdev(finals):.3f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    wall = sum(r["wall_s"] for r in runs) / 60
    lines += ["", f"Command: `python -m experiments.studies.strategies_noniid` ({wall:.1f} min)."]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Plot mean accuracy per round for each strategy, one panel per alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ALPHAS), figsize=(6 * len(ALPHAS), 4))
    for ax, alpha in zip(axes, ALPHAS, strict=True):
        for key in STRATEGIES:
            curves = [r["curve"] for r in runs if r["strategy"] == key and r["alpha"] == alpha]
            mean = [statistics.mean(c[i] for c in curves) for i in range(ROUNDS)]
            ax.plot(range(1, ROUNDS + 1), mean, label=key)
        ax.set(title=f"Dirichlet alpha = {alpha}", xlabel="round", ylabel="held-out accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
