"""Running the kit in-process against a Python device under test (the kit's own tests use it).

A device under test is built by a factory from what a real device gets at
enrollment (broker URL, topics, its key pair, the service key to pin), so a
test can hand in FedMQ's device client as it ships, an emulated phone, or a
client with one part deliberately broken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from broker import CheckOut, Transport, connect, encode
from broker.identity import SERVICE_NAME, Identity
from broker.topics import Topics
from device_sdk import ArtifactFetcher, DeviceApp, DeviceClient, TrainHandler
from device_sdk.scheduler import Scheduler
from fedmq.conformance._blobs import BlobServer
from fedmq.conformance._kit import DEFAULT_OPTIONS, Conformance, KitOptions
from fedmq.conformance._model import KitModel
from fedmq.conformance._report import Report
from fedmq.conformance._standin import ServiceStandIn
from fedmq.conformance._takeover import connection_taker


@dataclass(frozen=True)
class DeviceSetup:
    """What a device under test is given, as a registration gives a real one.

    Parameters
    ----------
    broker_url
        The broker to connect to.
    topics
        The deployment's topics (its namespace).
    identity
        The device's id and key pair (the kit pins its public key).
    service_key
        The kit's service public key, for the device to pin.
    """

    broker_url: str
    topics: Topics
    identity: Identity
    service_key: bytes


class DeviceUnderTest(Protocol):
    """A running device: started once the kit listens, closed when it is done."""

    def start(self) -> None:
        """Connect and check in."""
        ...

    def close(self) -> None:
        """Leave the broker and release everything."""
        ...


DeviceFactory = Callable[[DeviceSetup], DeviceUnderTest]


class SdkDevice:
    """FedMQ's Python device client as a device under test, each part replaceable.

    Parameters
    ----------
    setup
        What the device was given.
    handler
        Its training handler.
    platform
        Reported at check-in.
    examples
        The examples it declares at check-in.
    fetcher
        Fetches artifacts (default: a fresh ``ArtifactFetcher``).
    wrap_transport
        Wraps the device's broker connection (to break what it sends).
    client_type
        The client class (a subclass breaks its behaviour).
    scheduler
        Runs its delayed check-ins (default: its own).
    """

    def __init__(
        self,
        setup: DeviceSetup,
        handler: TrainHandler,
        *,
        platform: str = "python",
        examples: int | None = None,
        fetcher: ArtifactFetcher | None = None,
        wrap_transport: Callable[[Transport], Transport] | None = None,
        client_type: type[DeviceClient] = DeviceClient,
        scheduler: Scheduler | None = None,
    ) -> None:
        identity = setup.identity
        # Signed now, published by the broker if the connection dies (the protocol's will).
        will = CheckOut(device_id=identity.name, reason="connection lost")
        self._transport = connect(
            setup.broker_url,
            client_id=identity.name,
            will=(setup.topics.checkin(identity.name), encode(will, identity)),
        )
        self._scheduler = scheduler or Scheduler(f"conformance-{identity.name}")
        app = DeviceApp()
        app.on_train(handler)
        self.client = client_type(
            app,
            wrap_transport(self._transport) if wrap_transport else self._transport,
            identity,
            fetcher or ArtifactFetcher(),
            service_key=setup.service_key,
            topics=setup.topics,
            platform=platform,
            examples=examples,
            scheduler=self._scheduler,
        )

    def start(self) -> None:
        """Subscribe and check in."""
        self.client.start()

    def close(self) -> None:
        """Check out, stop the timers and disconnect."""
        self._scheduler.close()
        try:
            self.client.stop()
        finally:
            self._transport.close()


def run_in_process(
    factory: DeviceFactory,
    model: KitModel,
    *,
    broker_url: str,
    namespace: str,
    options: KitOptions = DEFAULT_OPTIONS,
    device_id: str = "device-under-test",
) -> Report:
    """Run the kit against a device the factory builds, on ``broker_url``.

    Parameters
    ----------
    factory
        Builds the device under test from its setup.
    model
        The model the kit's tasks carry (built for the device's platform).
    broker_url
        The broker both sides connect to.
    namespace
        The topic namespace (a fresh one keeps a shared broker's other users apart).
    options
        The kit's timeouts.
    device_id
        The id the device is registered under.

    Returns
    -------
    Report
        One result per check.
    """
    topics = Topics(namespace)
    service = Identity.generate(SERVICE_NAME)
    device_identity = Identity.generate(device_id)
    kit_transport = connect(broker_url)
    blobs = BlobServer()
    try:
        standin = ServiceStandIn(
            kit_transport, topics, service, device_id, device_identity.public_key
        )
        kit = Conformance(
            standin,
            blobs,
            model,
            take_over=connection_taker(broker_url, device_id),
            options=options,
        )
        device = factory(DeviceSetup(broker_url, topics, device_identity, service.public_key))
        try:
            device.start()
            return kit.run()
        finally:
            device.close()
    finally:
        blobs.close()
        kit_transport.close()


def emulated_handler(platform: str, *, examples: int = 128, seed: int = 0) -> TrainHandler:
    """Return the emulated ``platform``'s trainer on the first ``examples`` of the digits data."""
    from device_sdk.data import load_dataset
    from fedmq.platforms import trainers_for

    digits = load_dataset("digits")
    return trainers_for(platform, seed)(digits.x_train[:examples], digits.y_train[:examples], 0)
