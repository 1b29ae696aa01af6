"""The components every run is made of, built one way for in-process and per-process runs.

``fedmq.compose`` (``simulate``, ``demo``) and ``fedmq.processes`` (``fedmq
server``, ``worker``, ``fleet``) build the coordinator, its HTTP app, the
aggregator worker and the emulated fleet only here, from one ``Settings``: the
same store gives the same artifact links and inline limit, the same namespace
the same topics, the same data folders the same data, whichever way a run is
started. What stays with the callers is what differs by nature: where
identities come from, how devices enroll, and how long a run lives.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aggregator_service import AggregatorWorker, ExperimentConfig
from aggregator_service.links import ArtifactLinks, PresignedLinks, SignedLinks, StoreLinks
from broker import Transport
from broker.identity import Identity, KeyRing
from device_sdk.data import DATASETS, load_dataset
from device_sdk.emulator import Fleet, TrainerFactory
from device_sdk.emulator.fleet import Enroll, Runner, TransportFor
from device_sdk.emulator.profiles import SpeedProfile, VirtualTime
from device_sdk.secagg import Vanish
from fedmq.platforms import platform_packagers
from fedmq.settings import Settings
from model_store import ModelStore
from model_store.store import PresignedAccess

if TYPE_CHECKING:
    # The service's modules load where the service is built: a worker or a
    # fleet process never imports Flask, SQLAlchemy or onnxruntime.
    from flask import Flask

    from aggregator_service import Database
    from aggregator_service.rounds import Evaluator, EvaluatorFactory, RoundService
    from aggregator_service.rounds.registry import DeviceRegistry


@dataclass(frozen=True)
class Coordinator:
    """A built round coordinator and how it hands out artifacts."""

    service: RoundService
    links: ArtifactLinks
    max_inline_bytes: int
    """Largest update a device sends inline (0: no limit, for devices with nowhere to upload)."""

    @property
    def served_links(self) -> SignedLinks | None:
        """Return the links the service's own blob endpoints serve (a local-folder store)."""
        return self.links if isinstance(self.links, SignedLinks) else None


def artifact_links(store: ModelStore, settings: Settings, public_url: str | None) -> ArtifactLinks:
    """Return how devices reach the store's artifacts.

    Parameters
    ----------
    store
        The model store the coordinator publishes to.
    settings
        The signing key of the service's URLs, if set.
    public_url
        Where devices reach the service's HTTP endpoints; None when there are
        none (the in-process bus).

    Returns
    -------
    ArtifactLinks
        An object store's presigned URLs in every kind of run (the bytes never
        pass through the service); for a local folder, the service's signed
        blob URLs at ``public_url``, or without one, the folder's own URLs.
    """
    if isinstance(store, PresignedAccess):
        return PresignedLinks(store)
    if public_url is not None:
        # Without a configured key every start signs with a new one: links
        # handed out before a restart stop working, which is the safe side.
        return SignedLinks(settings.signing_key or secrets.token_bytes(32), public_url)
    return StoreLinks(store)


def held_out_evaluator(data_dirs: Sequence[Path]) -> EvaluatorFactory:
    """Return an evaluator factory scoring each version on its data set's test split.

    ``data_dirs`` are the folders the data set files are read from.
    """
    # Imported here, at the service's start, not in the factory: importing it hides
    # torch from the whole process for a moment (model_store.ort), which a request
    # thread building a model meanwhile would trip over.
    from aggregator_service.evaluation import OnnxEvaluator

    def evaluator(config: ExperimentConfig, onnx_model: bytes) -> Evaluator | None:
        if config.data.dataset not in DATASETS:
            return None
        dataset = load_dataset(config.data.dataset, data_dir=data_dirs)
        return OnnxEvaluator(onnx_model, dataset.x_test, dataset.y_test)

    return evaluator


def build_coordinator(
    transport: Transport,
    store: ModelStore,
    db: Database,
    settings: Settings,
    *,
    identity: Identity,
    worker_keys: KeyRing,
    public_url: str | None,
    registry: DeviceRegistry | None = None,
    evaluate: bool = True,
    clock: Callable[[], float] = time.time,
) -> Coordinator:
    """Build the round coordinator (not started).

    Parameters
    ----------
    transport, store, db
        Its broker connection, model store and database.
    settings
        Namespace, signing key, inline limit and data folders.
    identity, worker_keys
        The key it signs with and the workers' keys it trusts.
    public_url
        Where devices reach its HTTP endpoints (see ``artifact_links``).
    registry
        The device registry (default: one on ``db`` that provisions no broker users).
    evaluate
        Score each committed version on the data set's test split.
    clock
        Its time source (an in-process run in emulated time passes its own).

    Returns
    -------
    Coordinator
        The service with the links and inline limit it hands devices.
    """
    from aggregator_service.rounds import RoundService

    links = artifact_links(store, settings, public_url)
    # Devices that can only read the store's folder have nowhere to upload to.
    limit = 0 if isinstance(links, StoreLinks) else settings.max_inline_bytes
    service = RoundService(
        transport,
        store,
        db,
        identity=identity,
        worker_keys=worker_keys,
        topics=settings.topics,
        registry=registry,
        evaluator_factory=held_out_evaluator(settings.data_dirs) if evaluate else None,
        links=links,
        packagers=platform_packagers(),
        max_inline_bytes=limit,
        clock=clock,
    )
    return Coordinator(service, links, limit)


def build_app(
    coordinator: Coordinator, store: ModelStore, settings: Settings, *, admin_token: str
) -> Flask:
    """Build the service's HTTP app: REST API, dashboard, and blob endpoints for a local folder.

    Every value the app reads comes from ``settings``, so the environment it
    could also read (Flask's ``FEDMQ_`` prefix) changes nothing.
    """
    from aggregator_service.api.app import create_app

    config: dict[str, Any] = {
        "ADMIN_TOKEN": admin_token,
        "VIEWER_TOKEN": settings.viewer_token or "",
        "ENROLLMENT_TOKEN": settings.enrollment_token or "",
        "NAMESPACE": settings.namespace,
        "CONFIGS_DIR": settings.configs_dir,
        "MAX_MODEL_PARAMETERS": settings.max_model_parameters,
    }
    return create_app(
        config, service=coordinator.service, store=store, links=coordinator.served_links
    )


def build_worker(
    transport: Transport,
    store: ModelStore,
    settings: Settings,
    *,
    identity: Identity,
    service_key: bytes,
    group: str | None = None,
    checkpoint_every: int = 32,
) -> AggregatorWorker:
    """Build an aggregator worker (not started) on the settings' topics.

    ``group`` is the update queue it shares (default: the settings' group).
    """
    return AggregatorWorker(
        transport,
        store,
        identity=identity,
        service_key=service_key,
        topics=settings.topics,
        group=group or settings.updates_group,
        checkpoint_every=checkpoint_every,
    )


def build_fleet(
    transport_for: TransportFor,
    data: Mapping[str, Any],
    settings: Settings,
    *,
    seed: int,
    enroll: Enroll,
    experiment_id: str | None,
    indices: range | None = None,
    run: Runner | None = None,
    prefix: str = "emu",
    make_trainer: TrainerFactory | None = None,
    platforms: Sequence[str] | None = None,
    speed: SpeedProfile | None = None,
    virtual_time: VirtualTime | None = None,
    identities: Callable[[str], Identity] = Identity.generate,
    vanish: Mapping[int, Vanish] | None = None,
) -> Fleet:
    """Build an emulated fleet (not started) on the settings' topics and data folders.

    The keyword arguments are ``device_sdk.emulator.Fleet``'s.
    """
    return Fleet(
        transport_for,
        data,
        seed=seed,
        indices=indices,
        experiment_id=experiment_id,
        run=run,
        prefix=prefix,
        make_trainer=make_trainer,
        platforms=platforms,
        speed=speed,
        virtual_time=virtual_time,
        enroll=enroll,
        topics=settings.topics,
        identities=identities,
        data_dir=settings.data_dirs,
        vanish=vanish,
    )
