"""Experiments: creating one (version 0 in the store, a record) and reading its parsed config.

An experiment's config never changes after creation, so it is parsed once
and kept: the coordinator reads it at every round start, check-in wake-up
and outcome.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Mapping

from aggregator_service.config import ExperimentConfig
from aggregator_service.errors import ConfigError
from aggregator_service.persistence import Database, ExperimentRecord
from model_store import ExportError, ModelSpec, ModelStore, build_initial_artifacts

log = logging.getLogger(__name__)

Packager = Callable[[ModelSpec, int], Mapping[str, tuple[bytes, str]]]
"""Builds a platform's package artifacts (``android/...``) for a zoo spec and seed."""


class ExperimentCatalog:
    """Creates experiments and hands out their configs, parsed once each."""

    def __init__(
        self,
        db: Database,
        store: ModelStore,
        *,
        packagers: Mapping[str, Packager],
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._store = store
        self._packagers = dict(packagers)
        self._clock = clock
        self._configs: dict[str, ExperimentConfig] = {}

    def create(self, config: ExperimentConfig) -> str:
        """Publish the initial model as version 0 and record the experiment; return its id.

        Raises ``ConfigError`` for a platform this service cannot package for.
        """
        spec = config.model_spec()
        missing = [p for p in config.platforms() if p != "python" and p not in self._packagers]
        if missing:
            raise ConfigError(f"model.platforms: this service cannot package for {missing}")
        artifacts, metadata = build_initial_artifacts(spec, seed=config.seed)
        for platform in config.platforms():
            if platform in self._packagers:
                try:
                    artifacts.update(self._packagers[platform](spec, config.seed))
                except ExportError as exc:  # e.g. ExecuTorch missing: the config asks too much
                    raise ConfigError(
                        f"model.platforms: cannot package for {platform}: {exc}"
                    ) from exc
        experiment_id = f"{_slug(config.name)}-{uuid.uuid4().hex[:8]}"
        self._store.publish(experiment_id, 0, artifacts, parent=None, metadata=metadata)
        self._db.add_experiment(
            ExperimentRecord(
                id=experiment_id,
                name=config.name,
                config=config.to_dict(),
                state="idle",
                model_version=0,
                current_round=0,
                rounds_requested=0,
                created_at=self._clock(),
            )
        )
        self._configs[experiment_id] = config
        log.info("created experiment %s (%s)", experiment_id, config.name)
        return experiment_id

    def config(self, experiment: ExperimentRecord | str) -> ExperimentConfig:
        """Return an experiment's config (by record, or by id: a database read the first time).

        Raises ``NotFound`` for an unknown id.
        """
        experiment_id = experiment if isinstance(experiment, str) else experiment.id
        config = self._configs.get(experiment_id)
        if config is None:
            record = self._db.experiment(experiment) if isinstance(experiment, str) else experiment
            # A race parses twice and stores equal values: no lock needed.
            config = self._configs[experiment_id] = ExperimentConfig.from_dict(record.config)
        return config

    def forget(self, experiment_id: str) -> None:
        """Drop a deleted experiment's config."""
        self._configs.pop(experiment_id, None)


def _slug(text: str) -> str:
    """Return ``text`` reduced to a short topic-safe slug."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"
