"""Typed, frozen messages: the whole vocabulary FedMQ speaks on the bus.

Every message carries the envelope fields (``message_id``, ``sender``,
``sent_at``, ``reply_to``); the codec adds ``kind`` and ``schema_version``.
Tensors never ride in these classes except as one optional ``bytes`` field on
an update small enough to travel inline; everything else is a ``ModelRef``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

SCHEMA_VERSION = 1

Scalar = float | int | str | bool


def new_message_id() -> str:
    """Return a fresh, globally unique message id."""
    return uuid.uuid4().hex


class MessageKind(Enum):
    """What a message is; written into the envelope as its ``kind``."""

    CHECK_IN = "check_in"
    CHECK_OUT = "check_out"
    TRAIN_TASK = "train_task"
    COME_BACK_LATER = "come_back_later"
    MODEL_UPDATE = "model_update"
    UPDATE_REJECTED = "update_rejected"
    ERROR_REPLY = "error_reply"
    ROUND_OPENED = "round_opened"
    CLOSE_ROUND = "close_round"
    ROUND_COMMITTED = "round_committed"
    ROUND_ABANDONED = "round_abandoned"
    TASK_GRANT = "task_grant"
    ROUND_PROGRESS = "round_progress"
    PARTIAL_READY = "partial_ready"
    COMBINE_ROUND = "combine_round"
    WORKER_ALIVE = "worker_alive"


class RejectReason(Enum):
    """Why an update was not folded into the aggregate."""

    UNDECODABLE = "undecodable"
    NAMES_MISMATCH = "names_mismatch"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    NON_FINITE = "non_finite"
    BAD_EXAMPLE_COUNT = "bad_example_count"
    UNKNOWN_ROUND = "unknown_round"
    ROUND_CLOSED = "round_closed"
    STALE = "stale"
    DUPLICATE = "duplicate"
    NOT_SELECTED = "not_selected"
    FETCH_FAILED = "fetch_failed"
    STRATEGY_REFUSED = "strategy_refused"
    BAD_GRANT = "bad_grant"
    BAD_SIGNATURE = "bad_signature"
    TOO_MANY_EXAMPLES = "too_many_examples"


@dataclass(frozen=True)
class ModelRef:
    """Where an artifact lives and how to check it: a claim check, not the bytes."""

    uri: str
    sha256: str
    size: int
    format: str = "safetensors"


@dataclass(frozen=True, kw_only=True)
class Message:
    """Envelope fields shared by every message."""

    KIND: ClassVar[MessageKind]

    message_id: str = field(default_factory=new_message_id)
    sender: str = ""
    sent_at: float = field(default_factory=time.time)
    reply_to: str | None = None


@dataclass(frozen=True, kw_only=True)
class ErrorReply(Message):
    """A message could not be served; says which one and why."""

    KIND: ClassVar[MessageKind] = MessageKind.ERROR_REPLY
    in_reply_to: str
    code: str
    detail: str = ""
    grant: str = ""
    """A device refusing its task returns the task's grant, as an update would."""


@dataclass(frozen=True, kw_only=True)
class TaskGrant(Message):
    """The service's word that a task went to a device: signed by the service, carried as text.

    It rides inside the ``TrainTask`` and comes back inside the device's
    ``ModelUpdate`` (the base64 of its own signed frame), so a worker learns
    from the pinned service key which device key must have signed the update,
    for which round and task, and how many examples it may claim, without a
    database or a list of every device.
    """

    KIND: ClassVar[MessageKind] = MessageKind.TASK_GRANT
    experiment_id: str
    round: int
    device_id: str
    task_id: str
    public_key: str
    """The device's Ed25519 public key (base64 of its 32 raw bytes)."""
    max_examples: int


@dataclass(frozen=True, kw_only=True)
class CheckIn(Message):
    """A device is online and willing to train."""

    KIND: ClassVar[MessageKind] = MessageKind.CHECK_IN
    TASKS_IN_PROGRESS: ClassVar[str] = "tasks_in_progress"
    """Capability: tasks the device still works on (0 or absent: idle, ready for one)."""
    EXAMPLES: ClassVar[str] = "examples"
    """Capability: how many training examples the device holds (bounds its updates' claims)."""
    device_id: str
    platform: str
    experiment_id: str | None = None
    capabilities: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CheckOut(Message):
    """A device is gone: sent on a clean stop, or by the broker as its last will."""

    KIND: ClassVar[MessageKind] = MessageKind.CHECK_OUT
    device_id: str
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class ComeBackLater(Message):
    """Pace steering: the device was not selected and should check in again later."""

    KIND: ClassVar[MessageKind] = MessageKind.COME_BACK_LATER
    experiment_id: str
    retry_after_s: float
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class TrainTask(Message):
    """A selected device's job for one round: what to train, how, and by when."""

    KIND: ClassVar[MessageKind] = MessageKind.TRAIN_TASK
    CHECK_IN_WHEN_DONE: ClassVar[str] = "check_in_when_done"
    """Training setting: check in (idle) right after answering, for the next task at once."""
    experiment_id: str
    round: int
    base_version: int
    model: ModelRef
    artifacts: Mapping[str, ModelRef] = field(default_factory=dict)
    training: Mapping[str, Scalar] = field(default_factory=dict)
    deadline_at: float = 0.0
    upload_url: str | None = None
    """Where to PUT an update too large to travel inline (claim check)."""
    max_inline_bytes: int = 0
    """Largest update that may travel inside the message; 0 means no limit."""
    grant: str = ""
    """The signed ``TaskGrant`` the device returns with its update."""
    aggregator_keys: Mapping[str, str] = field(default_factory=dict)
    """Public keys of the workers whose ``UpdateRejected`` notices the device may trust."""

    def error_reply(self, code: str, detail: str, *, sender: str) -> ErrorReply:
        """Return the reply a device sends when it cannot do this task."""
        return ErrorReply(
            in_reply_to=self.message_id, code=code, detail=detail, sender=sender, grant=self.grant
        )


@dataclass(frozen=True, kw_only=True)
class ModelUpdate(Message):
    """A device's trained weights for one round, inline or by reference."""

    KIND: ClassVar[MessageKind] = MessageKind.MODEL_UPDATE
    experiment_id: str
    round: int
    device_id: str
    base_version: int
    task_id: str
    num_examples: int
    weights: ModelRef | None = None
    inline_weights: bytes | memoryview | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    grant: str = ""
    """The task's signed ``TaskGrant``, returned as it came."""


@dataclass(frozen=True, kw_only=True)
class UpdateRejected(Message):
    """The aggregator refused an update; tells the device why."""

    KIND: ClassVar[MessageKind] = MessageKind.UPDATE_REJECTED
    experiment_id: str
    round: int
    update_id: str
    reason: RejectReason
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class RoundOpened(Message):
    """Coordinator to workers: a round is open; here is what to aggregate into."""

    KIND: ClassVar[MessageKind] = MessageKind.ROUND_OPENED
    experiment_id: str
    round: int
    base_version: int
    model: ModelRef
    selected: tuple[str, ...]
    target_reports: int
    min_reports: int
    deadline_at: float
    strategy: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class CloseRound(Message):
    """Coordinator to workers: stop taking the round's updates, make your share durable."""

    KIND: ClassVar[MessageKind] = MessageKind.CLOSE_ROUND
    experiment_id: str
    round: int


@dataclass(frozen=True, kw_only=True)
class RoundProgress(Message):
    """Worker to coordinator: devices that answered this worker since its last progress.

    Several workers share a round's updates, so only the coordinator sees
    them all: it closes the round when the devices accepted across workers
    meet the target, or every selected device has answered.
    """

    KIND: ClassVar[MessageKind] = MessageKind.ROUND_PROGRESS
    experiment_id: str
    round: int
    reported: tuple[str, ...] = ()
    accepted: tuple[str, ...] = ()
    folded: int = 0
    """Updates in the sender's share of the round so far (a buffered step counts updates)."""


@dataclass(frozen=True, kw_only=True)
class WorkerAlive(Message):
    """Worker to coordinator: this worker is up and consumes ``group`` (repeated while it runs).

    The coordinator is ready to run rounds only once it has heard from a worker.
    """

    KIND: ClassVar[MessageKind] = MessageKind.WORKER_ALIVE
    group: str


@dataclass(frozen=True, kw_only=True)
class PartialReady(Message):
    """Worker to coordinator: its share of a closing round is durable up to ``sequence``."""

    KIND: ClassVar[MessageKind] = MessageKind.PARTIAL_READY
    experiment_id: str
    round: int
    sequence: int
    """The worker's last checkpoint of the round (-1: it has nothing to add)."""


@dataclass(frozen=True, kw_only=True)
class CombineRound(Message):
    """Coordinator to one worker (a shared queue): seal the round, merge the partials, commit."""

    KIND: ClassVar[MessageKind] = MessageKind.COMBINE_ROUND
    experiment_id: str
    round: int
    base_version: int
    model: ModelRef
    min_reports: int
    strategy: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RoundCommitted(Message):
    """Worker to coordinator: a round's aggregate is durable as a new model version."""

    KIND: ClassVar[MessageKind] = MessageKind.ROUND_COMMITTED
    experiment_id: str
    round: int
    version: int
    model: ModelRef
    reported: int
    accepted: tuple[str, ...]
    accepted_devices: tuple[str, ...]
    rejected: Mapping[str, int] = field(default_factory=dict)
    num_examples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    refused: Mapping[str, int] = field(default_factory=dict)
    """The worker's count of refused frames so far, by reason (forged, unsigned, ...)."""


@dataclass(frozen=True, kw_only=True)
class RoundAbandoned(Message):
    """Worker to coordinator: a round closed without enough reports."""

    KIND: ClassVar[MessageKind] = MessageKind.ROUND_ABANDONED
    experiment_id: str
    round: int
    reason: str
    reported: int = 0
    accepted: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    refused: Mapping[str, int] = field(default_factory=dict)
    """The worker's count of refused frames so far, by reason (forged, unsigned, ...)."""


MESSAGE_TYPES: Mapping[MessageKind, type[Message]] = {
    cls.KIND: cls
    for cls in (
        ErrorReply,
        CheckIn,
        CheckOut,
        ComeBackLater,
        TrainTask,
        ModelUpdate,
        UpdateRejected,
        RoundOpened,
        CloseRound,
        RoundCommitted,
        RoundAbandoned,
        TaskGrant,
        RoundProgress,
        PartialReady,
        CombineRound,
        WorkerAlive,
    )
}
