"""The service's side of the bus: signed tasks and notes out, the device's frames in.

The stand-in publishes what FedMQ's coordinator publishes (``TrainTask`` with
a ``TaskGrant`` signed by the service key, ``ComeBackLater``) and keeps every
frame the device sends, unverified and in arrival order: a check decides what
to make of it, so a badly signed update still shows whether its fields were
right.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import cached_property

from aggregator_service.config import TrainingConfig
from broker import (
    CheckOut,
    CodecError,
    ComeBackLater,
    Delivery,
    ErrorReply,
    Message,
    ModelRef,
    ModelUpdate,
    TrainTask,
    Transport,
    decode,
    encode,
    new_message_id,
)
from broker.codec import parse_frame
from broker.identity import Identity, encode_key
from broker.messages import TaskGrant
from broker.topics import Topics
from broker.verify import issue_grant


@dataclass(frozen=True)
class Arrival:
    """One frame the device published, as it arrived (also usable as a ``Delivery``)."""

    topic: str
    body: bytes
    at: float
    """When it arrived, on ``time.monotonic``'s clock."""
    redelivered: bool = False

    @cached_property
    def message(self) -> Message | None:
        """Return the frame's message, signature unchecked; None if it is not a frame."""
        try:
            return decode(self.body)
        except CodecError:
            return None

    @cached_property
    def sender(self) -> str | None:
        """Return the sender its header names, signature unchecked; None if it is not a frame."""
        try:
            return parse_frame(self.body).sender
        except CodecError:
            return None

    @property
    def is_check_out(self) -> bool:
        """Return whether the frame is a check-out (a device leaving, or its will)."""
        return isinstance(self.message, CheckOut)

    def ack(self) -> None:
        """Do nothing: the kit settled the real delivery when it arrived."""

    def nack(self, requeue: bool = False) -> None:
        """Do nothing (see ``ack``)."""


class Inbox:
    """Frames from one kind of topic, in arrival order; a check waits on it for what it expects."""

    def __init__(self, admits: Callable[[Arrival], bool]) -> None:
        self._admits = admits
        self._arrivals: list[Arrival] = []
        self._changed = threading.Condition()

    def put(self, delivery: Delivery) -> None:
        """Keep a delivery if it concerns the device under test, and settle it."""
        arrival = Arrival(delivery.topic, bytes(delivery.body), time.monotonic())
        if self._admits(arrival):
            with self._changed:
                self._arrivals.append(arrival)
                self._changed.notify_all()
        delivery.ack()

    def arrivals(self, since: float = 0.0) -> list[Arrival]:
        """Return what arrived at or after ``since`` (monotonic seconds)."""
        with self._changed:
            return [a for a in self._arrivals if a.at >= since]

    def wait(
        self, wanted: Callable[[Arrival], bool], timeout_s: float, *, since: float = 0.0
    ) -> Arrival | None:
        """Return the first wanted arrival at or after ``since``, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = next((a for a in self._arrivals if a.at >= since and wanted(a)), None)
                left = deadline - time.monotonic()
                if found is not None or left <= 0:
                    return found
                self._changed.wait(left)


class ServiceStandIn:
    """Plays FedMQ's coordinator towards one device on the broker.

    Parameters
    ----------
    transport
        The kit's own connection to the broker.
    topics
        The deployment's topics (its namespace).
    identity
        The service identity the device pins (named ``coordinator``).
    device_id, device_key
        The device under test and its pinned public key (raw 32 bytes).
    """

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        identity: Identity,
        device_id: str,
        device_key: bytes,
    ) -> None:
        self.topics = topics
        self.identity = identity
        self.device_id = device_id
        self.device_key = device_key
        self._transport = transport
        own_checkin = topics.checkin(device_id)
        # Every check-in topic: a device that checks in on another id's topic
        # is still seen (and failed), not mistaken for a silent one.
        self.check_ins = Inbox(lambda a: a.topic == own_checkin or a.sender == device_id)
        # Answers from or about the device under test only: others may share the
        # namespace, and their frames (weights inline) would pile up for the run.
        self.answers = Inbox(lambda a: a.sender == device_id or device_id in a.topic.split("/"))
        transport.subscribe(topics.all_checkins, self.check_ins.put)
        transport.subscribe(f"{topics.namespace}/updates/#", self.answers.put)

    def send_task(
        self,
        *,
        experiment_id: str,
        round_number: int,
        model: ModelRef,
        artifacts: Mapping[str, ModelRef],
        max_examples: int,
        signer: Identity | None = None,
    ) -> TrainTask:
        """Publish a task (and its grant) signed by the service, or by ``signer`` to forge one."""
        signer = signer or self.identity
        task_id = new_message_id()
        grant = TaskGrant(
            experiment_id=experiment_id,
            round=round_number,
            device_id=self.device_id,
            task_id=task_id,
            public_key=encode_key(self.device_key),
            max_examples=max_examples,
        )
        task = TrainTask(
            message_id=task_id,
            experiment_id=experiment_id,
            round=round_number,
            # A version per round: copying the task's base_version is what is checked.
            base_version=round_number - 1,
            model=model,
            artifacts=dict(artifacts),
            training=asdict(TrainingConfig()),
            deadline_at=time.time() + 900.0,
            upload_url=None,
            max_inline_bytes=0,
            reply_to=self.topics.updates(experiment_id, self.device_id),
            grant=issue_grant(grant, signer),
        )
        self._transport.publish(self.topics.device(self.device_id), encode(task, signer))
        return task

    def send_come_back_later(self, experiment_id: str, retry_after_s: float) -> None:
        """Publish a signed come-back-later note to the device."""
        note = ComeBackLater(
            experiment_id=experiment_id,
            retry_after_s=retry_after_s,
            reason="not selected this round",
        )
        self._transport.publish(self.topics.device(self.device_id), encode(note, self.identity))

    def wait_check_in(self, timeout_s: float, *, since: float = 0.0) -> Arrival | None:
        """Return the device's first check-in frame at or after ``since`` (any but a check-out)."""
        return self.check_ins.wait(lambda a: not a.is_check_out, timeout_s, since=since)

    def answers_to(self, task: TrainTask, since: float = 0.0) -> list[tuple[Arrival, Message]]:
        """Return the updates and error replies (signatures unchecked) that answer ``task``."""
        found = []
        for arrival in self.answers.arrivals(since):
            message = arrival.message
            if message is not None and answers(message, task):
                found.append((arrival, message))
        return found

    def wait_answer(self, task: TrainTask, timeout_s: float) -> tuple[Arrival, Message] | None:
        """Return the first answer to ``task``, waiting up to ``timeout_s``."""

        def wanted(arrival: Arrival) -> bool:
            return arrival.message is not None and answers(arrival.message, task)

        arrival = self.answers.wait(wanted, timeout_s)
        if arrival is None or arrival.message is None:
            return None
        return arrival, arrival.message


def answers(message: Message, task: TrainTask) -> bool:
    """Return whether ``message`` is an update or an error reply to ``task``."""
    if isinstance(message, ModelUpdate):
        return message.task_id == task.message_id
    return isinstance(message, ErrorReply) and message.in_reply_to == task.message_id


@dataclass(frozen=True)
class TaskRun:
    """A task the kit sent, and every answer to it the device sent while the kit watched."""

    task: TrainTask
    answers: tuple[tuple[Arrival, Message], ...]

    @property
    def first(self) -> Message | None:
        """Return the first answer, or None if the device sent none."""
        return self.answers[0][1] if self.answers else None

    def updates(self) -> list[ModelUpdate]:
        """Return the model updates among the answers."""
        return [m for _, m in self.answers if isinstance(m, ModelUpdate)]

    def error_codes(self) -> list[str]:
        """Return the codes of the error replies among the answers."""
        return [m.code for _, m in self.answers if isinstance(m, ErrorReply)]

    def describe_answers(self) -> str:
        """Return what the device answered, for a report's detail."""
        if not self.answers:
            return "no answer"
        return ", ".join(_describe(message) for _, message in self.answers)


def _describe(message: Message) -> str:
    if isinstance(message, ErrorReply):
        return f"error_reply {message.code!r} ({message.detail[:120]})"
    return message.KIND.value
