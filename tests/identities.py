"""Identities for tests: one service, one worker, and a key per device id, with signing helpers.

Every receiver refuses unsigned frames, so tests sign what they hand in as
the party that would send it: ``sign(message)`` picks the identity from the
message (control and tasks: the service; outcomes: the worker; check-ins,
updates and refusals: the device they name) and gives an update or refusal
without a grant the service's grant for its task.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aggregator_service import AggregatorWorker, RoundService
from broker import (
    CheckIn,
    CheckOut,
    ErrorReply,
    Message,
    ModelUpdate,
    PartialReady,
    RoundAbandoned,
    RoundCommitted,
    RoundProgress,
    Transport,
    encode,
)
from broker.identity import SERVICE_NAME, Identity, KeyRing
from broker.messages import TaskGrant
from broker.topics import Topics
from broker.verify import issue_grant

SERVICE = Identity.generate(SERVICE_NAME)
WORKER = Identity.generate("worker-under-test")
TOPICS = Topics()
_DEVICES: dict[str, Identity] = {}


def device(device_id: str) -> Identity:
    """Return the test key of ``device_id`` (the same one for the whole session)."""
    if device_id not in _DEVICES:
        _DEVICES[device_id] = Identity.generate(device_id)
    return _DEVICES[device_id]


def worker_keys(*extra: Identity) -> KeyRing:
    """Return the service's trust in the test worker (and ``extra`` workers)."""
    return KeyRing({w.name: w.public_key for w in (WORKER, *extra)})


def grant(
    experiment_id: str, round_number: int, device_id: str, task_id: str, max_examples: int = 10**9
) -> str:
    """Return the service's signed grant of a task to ``device_id``."""
    issued = TaskGrant(
        experiment_id=experiment_id,
        round=round_number,
        device_id=device_id,
        task_id=task_id,
        public_key=device(device_id).public_key_text,
        max_examples=max_examples,
    )
    return issue_grant(issued, SERVICE)


def with_grant(message: ModelUpdate, experiment_id: str | None = None) -> ModelUpdate:
    """Return ``message`` carrying the grant of its own task, if it carries none."""
    if message.grant:
        return message
    text = grant(message.experiment_id, message.round, message.device_id, message.task_id)
    return dataclasses.replace(message, grant=text)


def identity_of(message: Message) -> Identity:
    """Return who would send ``message``."""
    if isinstance(message, CheckIn | CheckOut | ModelUpdate):
        return device(message.device_id)
    if isinstance(message, ErrorReply):
        return device(message.sender)
    if isinstance(message, RoundCommitted | RoundAbandoned | RoundProgress | PartialReady):
        return WORKER
    return SERVICE


def sign(message: Message, identity: Identity | None = None) -> bytes:
    """Return ``message`` as the frame its sender would publish."""
    if isinstance(message, ModelUpdate):
        message = with_grant(message)
    return encode(message, identity or identity_of(message))


def round_service(transport: Transport, store: Any, db: Any, **kwargs: Any) -> RoundService:
    """Return a coordinator signing as the test service and trusting the test worker."""
    kwargs.setdefault("worker_keys", worker_keys())
    return RoundService(transport, store, db, identity=SERVICE, **kwargs)


BUILT_WORKERS: list[AggregatorWorker] = []
"""Workers ``aggregator`` built, which the suite stops after each test (tests/conftest.py):
a started worker says it is alive every 15 s, on a thread that outlives its test."""


def aggregator(transport: Transport, store: Any, **kwargs: Any) -> AggregatorWorker:
    """Return a worker signing as the test worker and pinning the test service."""
    kwargs.setdefault("identity", WORKER)
    worker = AggregatorWorker(transport, store, service_key=SERVICE.public_key, **kwargs)
    BUILT_WORKERS.append(worker)
    return worker


def enroll_in(service: RoundService) -> Any:
    """Return a fleet's ``enroll``: register each device with ``service`` directly."""

    def enroll(identity: Identity, platform: str) -> bytes:
        service.register_device(
            platform, public_key=identity.public_key_text, device_id=identity.name
        )
        return service.public_key

    return enroll
