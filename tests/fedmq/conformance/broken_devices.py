"""FedMQ's device client with one thing deliberately wrong, one device per conformance check.

Each breaks exactly the behaviour its check observes and nothing else, so the
kit must fail that check and pass every other one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from broker import (
    Delivery,
    Handler,
    Message,
    ModelRef,
    Subscription,
    TrainTask,
    Transport,
    decode,
    encode,
)
from broker.identity import Identity
from broker.transport import ReconnectListener
from device_sdk import ArtifactFetcher, DeviceClient, DeviceContext, TrainHandler, TrainResult
from device_sdk.scheduler import Job, Scheduler
from fedmq.conformance import Check, DeviceFactory, DeviceSetup, SdkDevice

EXAMPLES = 128


class StaleBaseClient(DeviceClient):
    """Trains every task as if it started from version 0: its updates name the wrong base."""

    def serve(self, task: TrainTask) -> None:
        super().serve(dataclasses.replace(task, base_version=0))


class CredulousClient(DeviceClient):
    """Believes any frame on its topic: it never checks that the service signed a task."""

    def _open(self, delivery: Delivery) -> Message:
        return decode(delivery.body)


class TrustingFetcher(ArtifactFetcher):
    """Skips the sha256 check for the references ``trusted`` picks (and caches nothing for them)."""

    def __init__(self, trusted: Callable[[ModelRef], bool]) -> None:
        super().__init__()
        self._trusted = trusted

    def fetch(self, ref: ModelRef) -> bytes:
        if self._trusted(ref):
            return self._download(ref.uri)
        return super().fetch(ref)


def is_weights(ref: ModelRef) -> bool:
    """Return whether a reference is a task's weights (its ``model``), not another artifact."""
    return ref.format == "safetensors"


class ImpatientScheduler(Scheduler):
    """Runs every delayed job at once: a come-back-later note brings an immediate check-in."""

    def call_later(self, delay_s: float, job: Job) -> None:
        super().call_later(0.0, job)


class TransportWrapper:
    """A device's transport, passed through (subclasses change one thing)."""

    def __init__(self, inner: Transport) -> None:
        self._inner = inner

    def publish(self, topic: str, body: bytes) -> None:
        self._inner.publish(topic, body)

    def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> Subscription:
        return self._inner.subscribe(topic, handler, group=group)

    def on_reconnect(self, listener: ReconnectListener) -> None:
        self._inner.on_reconnect(listener)

    def close(self) -> None:
        self._inner.close()


class ForgetfulTransport(TransportWrapper):
    """Never tells the device it reconnected, so the device does not check in again."""

    def on_reconnect(self, listener: ReconnectListener) -> None:
        pass


class WrongKeyTransport(TransportWrapper):
    """Signs the device's answers with a key other than its registered one (a reinstalled app)."""

    def __init__(self, inner: Transport, device_id: str) -> None:
        super().__init__(inner)
        self._rogue = Identity.generate(device_id)

    def publish(self, topic: str, body: bytes) -> None:
        if "/updates/" in topic:
            body = encode(decode(body), self._rogue)
        super().publish(topic, body)


def narrowed(handler: TrainHandler) -> TrainHandler:
    """Return ``handler`` whose result loses the last column of its first tensor."""

    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        result = handler(task, ctx)
        weights = dict(result.weights)
        first = next(iter(weights))
        weights[first] = np.ascontiguousarray(weights[first][..., :-1])
        return dataclasses.replace(result, weights=weights)

    return train


Breakage = Callable[[DeviceSetup, TrainHandler], SdkDevice]
"""Builds a broken device under test from its setup and a working training handler."""


def _sdk(setup: DeviceSetup, handler: TrainHandler, **parts: Any) -> SdkDevice:
    return SdkDevice(setup, handler, examples=EXAMPLES, **parts)


BREAKAGES: dict[Check, Breakage] = {
    Check.CHECK_IN: lambda s, h: _sdk(s, h, platform="python-on-a-platform-name-over-32-chars"),
    Check.TASK_HANDLING: lambda s, h: _sdk(s, h, client_type=StaleBaseClient),
    Check.FORGED_TASK: lambda s, h: _sdk(s, h, client_type=CredulousClient),
    Check.DOWNLOAD_CHECKSUM: lambda s, h: _sdk(s, h, fetcher=TrustingFetcher(is_weights)),
    Check.TAMPERED_ARTIFACT: lambda s, h: _sdk(
        s, h, fetcher=TrustingFetcher(lambda ref: not is_weights(ref))
    ),
    Check.RESULT_SHAPE: lambda s, h: _sdk(s, narrowed(h)),
    Check.SIGNED_UPDATE: lambda s, h: _sdk(
        s, h, wrap_transport=lambda t: WrongKeyTransport(t, s.identity.name)
    ),
    Check.RETRIES: lambda s, h: _sdk(s, h, fetcher=ArtifactFetcher(retry_for_s=0.0)),
    Check.COME_BACK_LATER: lambda s, h: _sdk(s, h, scheduler=ImpatientScheduler()),
    Check.RECONNECT: lambda s, h: _sdk(s, h, wrap_transport=ForgetfulTransport),
}
"""One broken device per check: each gets wrong only what its check observes."""


def broken_device(check: Check, handler: TrainHandler) -> DeviceFactory:
    """Return a factory of FedMQ's device with the behaviour ``check`` observes broken."""
    return lambda setup: BREAKAGES[check](setup, handler)
