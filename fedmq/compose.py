"""In-process compositions: service, worker and an emulated fleet wired on one bus."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aggregator_service import AggregatorWorker, Database, ExperimentConfig, RoundService
from aggregator_service.evaluation import held_out_evaluator
from aggregator_service.persistence import RoundRecord
from broker import MemoryTransport
from device_sdk.emulator import Fleet
from model_store import LocalStore

Progress = Callable[[RoundRecord], None]


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    experiment_id: str
    config: ExperimentConfig
    rounds: list[RoundRecord]
    initial_weights: bytes
    final_weights: bytes
    wall_time_s: float

    @property
    def final_metrics(self) -> dict[str, float]:
        """Return the metrics of the last committed round (empty if none committed)."""
        done = [r for r in self.rounds if r.state == "committed"]
        return dict(done[-1].metrics) if done else {}


def simulate(
    config: ExperimentConfig,
    *,
    rounds: int | None = None,
    workdir: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Run an experiment in one process on the in-process transport.

    Every message goes through the same service, worker and device code as a
    distributed run; the in-process bus delivers in publish order, so a config
    and seed determine the result bit for bit.

    Parameters
    ----------
    config
        The experiment to run.
    rounds
        How many rounds (default: ``config.rounds.count``).
    workdir
        Where the model store lives (default: a temporary folder).
    progress
        Called with each round's record as the round ends.

    Returns
    -------
    RunResult
        The experiment id, every round's record, and the initial and final weights.
    """
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmq-") as tmp:
        root = workdir or Path(tmp)
        transport = MemoryTransport()
        store = LocalStore(root / "store")
        db = Database("sqlite://")
        try:
            service = RoundService(transport, store, db, evaluator_factory=held_out_evaluator)
            if progress is not None:
                service.add_listener(progress)
            service.start()
            AggregatorWorker(transport, store).start()
            experiment_id = service.create_experiment(config)
            Fleet(
                transport, config.to_dict()["data"], seed=config.seed, experiment_id=experiment_id
            ).start()
            transport.join()
            service.request_rounds(experiment_id, rounds or config.rounds.count)
            transport.join()
            if transport.dead_letters:
                raise RuntimeError(f"{len(transport.dead_letters)} message(s) failed; see the log")
            _, initial = service.model_weights(experiment_id, 0)
            _, final = service.model_weights(experiment_id)
            return RunResult(
                experiment_id,
                config,
                service.rounds(experiment_id),
                initial,
                final,
                time.perf_counter() - started,
            )
        finally:
            transport.close()
            db.close()
