"""What a restarted coordinator needs to pick up the rounds that were in flight."""

from __future__ import annotations

from collections.abc import Callable

from aggregator_service.config import ExperimentConfig
from aggregator_service.links import ArtifactLinks
from aggregator_service.persistence import Database
from aggregator_service.rounds.asynchronous import step_limits
from broker import ModelRef, RoundOpened
from model_store import WEIGHTS, ModelStore


def in_flight_rounds(
    db: Database,
    store: ModelStore,
    links: ArtifactLinks,
    config_of: Callable[[str], ExperimentConfig],
    *,
    sender: str,
) -> list[RoundOpened]:
    """Return the announcements of every round still training, rebuilt from the records.

    A coordinator that restarts mid-round re-announces them; a worker that
    still aggregates such a round ignores the repeat, and one that already
    closed it publishes its outcome again.
    """
    announcements = []
    for exp in db.experiments():
        if exp.state != "running":
            continue
        rnd = db.last_round(exp.id)
        if rnd is None or rnd.state != "training":
            continue
        config = config_of(exp.id)
        weights = store.get_manifest(exp.id, rnd.base_version).artifacts[WEIGHTS]
        k = len(rnd.selected)
        target, minimum = min(config.rounds.devices_per_round, k), min(config.rounds.minimum, k)
        if config.buffered:  # a server step: K updates from any tasks
            target, minimum = step_limits(config)
        announcements.append(
            RoundOpened(
                experiment_id=exp.id,
                round=rnd.number,
                base_version=rnd.base_version,
                model=ModelRef(links.download(weights.sha256), weights.sha256, weights.size),
                selected=rnd.selected,
                target_reports=target,
                min_reports=minimum,
                deadline_at=rnd.deadline_at,
                strategy=config.strategy,
                sender=sender,
            )
        )
    return announcements
