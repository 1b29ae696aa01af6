"""An attacker on the broker: captures what it can read and publishes hostile frames of every kind.

It holds no FedMQ key. It signs with keys of its own (claiming the service's,
workers' and devices' names), replays frames it captured, and sends garbage,
truncated, malformed, oversized and deeply nested frames to every topic a
FedMQ receiver listens on. ``sent`` counts what it published, by kind.
"""

from __future__ import annotations

import dataclasses
import os
import random
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from broker import (
    CheckIn,
    CheckOut,
    CloseRound,
    Delivery,
    ModelRef,
    ModelUpdate,
    RoundCommitted,
    RoundOpened,
    TrainTask,
    Transport,
    encode,
    encode_weights,
)
from broker.identity import SERVICE_NAME, Identity
from broker.messages import TaskGrant
from broker.topics import Topics
from broker.verify import issue_grant

Kind = str


class Attacker:
    """Publishes hostile frames at a deployment's topics over its own broker connection."""

    def __init__(self, transport: Transport, topics: Topics, experiment_id: str, seed: int = 7):
        self._bus = transport
        self._topics = topics
        self._exp = experiment_id
        self._rng = random.Random(seed)
        self.sent: Counter[Kind] = Counter()
        self._captured: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._fake_service = Identity.generate(SERVICE_NAME)
        self._fake_worker = Identity.generate("worker-evil")

    def listen(self) -> None:
        """Capture every frame of the deployment it can read, for replays."""
        self._bus.subscribe(f"{self._topics.namespace}/#", self._capture)

    def _capture(self, delivery: Delivery) -> None:
        with self._lock:
            if len(self._captured) < 2000:
                self._captured.append((delivery.topic, bytes(delivery.body)))
        delivery.ack()

    def devices(self) -> list[str]:
        """Return the device ids seen in captured frames' topics."""
        with self._lock:
            topics = [t for t, _ in self._captured]
        return sorted({t.rsplit("/", 1)[-1] for t in topics if "/checkin/" in t})

    def _send(self, kind: Kind, topic: str, body: bytes) -> None:
        self._bus.publish(topic, body)
        self.sent[kind] += 1

    def barrage(self, rounds: int, *, pause: Callable[[], None] = lambda: None) -> None:
        """Send ``rounds`` passes over every hostile kind (about 40 frames a pass)."""
        for _ in range(rounds):
            for attack in (
                self._garbage,
                self._truncated,
                self._malformed,
                self._nested,
                self._unsigned,
                self._spoofed_update,
                self._non_finite,
                self._replays,
                self._forged_control,
                self._forged_outcome,
                self._forged_task,
                self._ghosts,
            ):
                attack()
            pause()

    def flood(self, count: int, size: int) -> None:
        """Send ``count`` updates of ``size`` bytes for an experiment nobody runs."""
        blob = encode_weights({"w": np.ones(size // 4, np.float32)})
        ghost = Identity.generate("ghost-flood")
        for i in range(count):
            update = self._update("no-such-experiment", ghost.name, blob, task=f"t{i}")
            self._send(
                "flood",
                self._topics.updates("no-such-experiment", ghost.name),
                encode(update, ghost),
            )

    def oversized(self, count: int) -> None:
        """Send frames whose header claims (and carries) more than the 1 MiB header limit."""
        for _ in range(count):
            header = b'{"a":"' + b"x" * (1 << 21) + b'"}'
            frame = b"FMQ\x02" + struct.pack(">I", len(header)) + header + b"\0" * 64
            self._send("oversized", self._updates_topic(), frame)

    # -- the attacks -------------------------------------------------------------------

    def _targets(self) -> list[str]:
        device = self._rng.choice(self.devices() or ["emu-0000"])
        return [
            self._updates_topic(device),
            self._topics.checkin(device),
            self._topics.control(self._exp),
            self._topics.events(self._exp),
            self._topics.device(device),
        ]

    def _updates_topic(self, device: str | None = None) -> str:
        return self._topics.updates(self._exp, device or self._rng.choice(self.devices() or ["x"]))

    def _garbage(self) -> None:
        for topic in self._targets():
            self._send("garbage", topic, os.urandom(self._rng.randrange(1, 600)))

    def _truncated(self) -> None:
        frame = self._signed_update(self._fake_worker)
        for topic in self._targets():
            self._send("truncated", topic, frame[: self._rng.randrange(1, len(frame) - 1)])

    def _malformed(self) -> None:
        """Frames with a valid prefix and a bad header: NaN, wrong types, unknown kinds."""
        headers = [
            b'{"kind":"model_update","sent_at":NaN}',
            b'{"schema_version":1,"kind":"check_in","body":{"device_id":7}}',
            b'{"schema_version":99,"kind":"round_opened"}',
            b'["not","an","object"]',
            b'{"kind":"no_such_kind","body":{}}',
            b'{"schema_version":1,"kind":"model_update","sender":"x","sent_at":'
            + b"9" * 5000
            + b"}",
        ]
        for topic in self._targets():
            header = self._rng.choice(headers)
            self._send(
                "malformed",
                topic,
                b"FMQ\x02" + struct.pack(">I", len(header)) + header + b"\0" * 64,
            )

    def _nested(self) -> None:
        header = b"[" * 50_000 + b"]" * 50_000
        self._send(
            "nested", self._updates_topic(), b"FMQ\x01" + struct.pack(">I", len(header)) + header
        )

    def _unsigned(self) -> None:
        device = self._rng.choice(self.devices() or ["emu-0000"])
        update = self._update(self._exp, device, encode_weights({"w": np.zeros(3, np.float32)}))
        self._send("unsigned", self._updates_topic(device), encode(update))
        self._send(
            "unsigned",
            self._topics.checkin(device),
            encode(CheckIn(device_id=device, platform="x")),
        )

    def _spoofed_update(self) -> None:
        """An update "from" a real device, with a grant the attacker signed as the service."""
        device = self._rng.choice(self.devices() or ["emu-0000"])
        mimic = Identity.generate(device)
        grant = TaskGrant(
            experiment_id=self._exp,
            round=1,
            device_id=device,
            task_id="t",
            public_key=mimic.public_key_text,
            max_examples=10**9,
        )
        update = self._update(self._exp, device, b"", num_examples=10**6)
        forged_grant = issue_grant(grant, self._fake_service)
        forged = encode(dataclasses.replace(update, grant=forged_grant), mimic)
        self._send("spoofed_update", self._updates_topic(device), forged)

    def _non_finite(self) -> None:
        device = self._rng.choice(self.devices() or ["emu-0000"])
        bad = encode_weights({"w": np.full(8, np.nan, np.float32)})
        self._send(
            "non_finite",
            self._updates_topic(device),
            self._signed_update(Identity.generate(device), bad),
        )

    def _replays(self) -> None:
        with self._lock:
            captured = list(self._captured)
        for topic, body in self._rng.sample(captured, min(4, len(captured))):
            self._send("replay", topic, body)

    def _forged_control(self) -> None:
        ref = ModelRef("http://evil.invalid/w", "0" * 64, 10)
        opened = RoundOpened(
            experiment_id=self._exp,
            round=self._rng.randrange(1, 50),
            base_version=0,
            model=ref,
            selected=tuple(self.devices()),
            target_reports=1,
            min_reports=1,
            deadline_at=time.time(),
        )
        close = CloseRound(experiment_id=self._exp, round=self._rng.randrange(1, 50))
        for message in (opened, close):
            self._send(
                "forged_control",
                self._topics.control(self._exp),
                encode(message, self._fake_service),
            )

    def _forged_outcome(self) -> None:
        outcome = RoundCommitted(
            experiment_id=self._exp,
            round=self._rng.randrange(1, 10),
            version=999,
            model=ModelRef("http://evil.invalid/w", "0" * 64, 10),
            reported=1,
            accepted=("x",),
            accepted_devices=("x",),
        )
        self._send(
            "forged_outcome", self._topics.events(self._exp), encode(outcome, self._fake_worker)
        )

    def _forged_task(self) -> None:
        device = self._rng.choice(self.devices() or ["emu-0000"])
        task = TrainTask(
            experiment_id=self._exp,
            round=1,
            base_version=0,
            model=ModelRef("http://evil.invalid/model", "0" * 64, 10),
            training={"lr": 50.0},
        )
        self._send("forged_task", self._topics.device(device), encode(task, self._fake_service))

    def _ghosts(self) -> None:
        ghost = Identity.generate(f"ghost-{self._rng.randrange(10**9)}")
        checkin = CheckIn(device_id=ghost.name, platform="p" * 2000)
        self._send("ghost_check_in", self._topics.checkin(ghost.name), encode(checkin, ghost))
        device = self._rng.choice(self.devices() or ["emu-0000"])
        checkout = CheckOut(device_id=device, reason="forged")
        self._send(
            "ghost_check_out",
            self._topics.checkin(device),
            encode(checkout, Identity.generate(device)),
        )

    def _signed_update(self, identity: Identity, blob: bytes = b"x") -> bytes:
        return encode(self._update(self._exp, identity.name, blob), identity)

    @staticmethod
    def _update(
        experiment: str, device: str, blob: bytes, *, task: str = "t", num_examples: int = 10
    ) -> ModelUpdate:
        return ModelUpdate(
            experiment_id=experiment,
            round=1,
            device_id=device,
            base_version=0,
            task_id=task,
            num_examples=num_examples,
            inline_weights=blob or None,
            weights=None if blob else ModelRef("http://evil.invalid/u", "0" * 64, 1),
        )


def rss_mb(pid: int) -> float:
    """Return a process's resident memory in MB (from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def metrics(text: str) -> dict[tuple[str, str], int]:
    """Parse ``fedmq_refused_frames_total`` of ``/metrics`` into {(component, reason): n}."""
    counts: dict[tuple[str, str], int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "fedmq_refused_frames_total":
                key = (sample.labels["component"], sample.labels["reason"])
                counts[key] = int(sample.value)
    return counts


__all__ = ["Attacker", "metrics", "rss_mb"]
