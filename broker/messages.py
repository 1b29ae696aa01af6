"""Typed, frozen messages: the whole vocabulary FedMQ speaks on the bus.

Every message carries the envelope fields (``message_id``, ``sender``,
``sent_at``, ``reply_to``); the codec adds ``kind`` and ``schema_version``.
Tensors never ride in these classes except as one optional ``bytes`` field on
an update small enough to travel inline; everything else is a ``ModelRef``.

The classes are also the mobile protocol's contract: ``broker.schema_gen``
writes ``broker/schema/*.json`` from them, taking each description from a
class's or a field's docstring and each constraint beyond a field's type from
its ``WIRE`` metadata. Edit a phone-facing message here, then run
``python -m broker.schema_gen``.
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

WIRE = "wire"
"""The key of a field's metadata that narrows its JSON Schema beyond its type.

``broker.schema_gen`` reads it. Its value holds JSON Schema keywords
(``minimum``, ``pattern``, ``examples``, ...) for the field's value (the
non-null one of an optional field), and four words of the generator's own:
``$ref`` names one of the shared definitions (``segment``, ``message_id``,
``unix_time``, ``public_key``, ``grant``, ``sha256``, ``uri``); ``keys``
narrows a map's keys as the whole narrows a string field (a ``$ref``
included); ``values`` narrows a map's values likewise; ``instead_of``
names the field a binary payload stands in for (exactly one of the two is
sent).
"""

_SEGMENT: Mapping[str, Any] = {WIRE: {"$ref": "segment"}}
_MESSAGE_ID: Mapping[str, Any] = {WIRE: {"$ref": "message_id"}}
_AT_LEAST_0: Mapping[str, Any] = {WIRE: {"minimum": 0}}
_AT_LEAST_1: Mapping[str, Any] = {WIRE: {"minimum": 1}}
_NAMED: Mapping[str, Any] = {"minLength": 1}
_FORMATS = ("safetensors", "onnx", "torchscript", "torchscript-lite", "json", "binary")
ERROR_CODES = (
    "fetch_failed",
    "checksum_mismatch",
    "bad_task",
    "training_failed",
    "device_error",
    "broker_error",
)
"""The codes FedMQ's own devices send in an ``ErrorReply``."""
ERROR_CODE_PATTERN = "^[a-z][a-z0-9_]{0,63}$"
"""The shape of any ``ErrorReply.code``; a worker refuses a reply whose code has another."""


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
    SECAGG_KEYS = "secagg_keys"
    SECAGG_NEIGHBOURS = "secagg_neighbours"
    SECAGG_SHARES = "secagg_shares"
    SECAGG_DELIVERY = "secagg_delivery"
    SECAGG_UNMASK = "secagg_unmask"
    SECAGG_REVEAL = "secagg_reveal"
    ROUND_MASKED = "round_masked"


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
    """A claim check: where an artifact's bytes are, and the sha256 they must hash to.

    The bytes can be fetched from (or were uploaded to) ``uri``. Messages never
    carry models; they carry these references.
    """

    uri: str = field(metadata={WIRE: {"$ref": "uri"}})
    """Where the bytes are.

    For a phone an https (or http) URL, usually presigned or signed and valid
    for a limited time; GET it without credentials. In a model_update the
    upload URL without its query string.
    """
    sha256: str = field(metadata={WIRE: {"$ref": "sha256"}})
    """SHA-256 of the artifact's bytes, 64 lowercase hex digits.

    A device refuses bytes that do not hash to it, and caches artifacts by it.
    """
    size: int = field(metadata=_AT_LEAST_0)
    """Length of the artifact in bytes."""
    format: str = field(
        default="safetensors",
        metadata={WIRE: {**_NAMED, "examples": _FORMATS}},
    )
    """What the bytes are, from the artifact's file name.

    The coordinator writes safetensors for .safetensors files (the weights),
    onnx for .onnx, torchscript for model.torchscript.pt, torchscript-lite for
    .ptl, json for .json, and binary for everything else.
    """


@dataclass(frozen=True)
class MaskedSumTerms:
    """Secure aggregation's terms, which a worker needs to sum masked updates.

    Each device clips its update to ``clip`` (L2 norm) and weighs it by at
    most ``max_examples`` examples before it masks it.
    """

    clip: float
    max_examples: int


@dataclass(frozen=True)
class StrategySpec:
    """The rule that combines a round's updates: a strategy by name, with its settings.

    Workers build the strategy from it. ``settings`` are the keyword arguments
    of the strategy's class, including those the experiment derives (SCAFFOLD's
    client count, say); ``masked`` is present when the round's updates come
    masked by secure aggregation.
    """

    name: str = "fedavg"
    settings: Mapping[str, Scalar | None] = field(default_factory=dict)
    masked: MaskedSumTerms | None = None


@dataclass(frozen=True, kw_only=True)
class Message:
    """Envelope fields shared by every message."""

    KIND: ClassVar[MessageKind]

    message_id: str = field(default_factory=new_message_id, metadata=_MESSAGE_ID)
    """Globally unique id of this message (FedMQ writes a random UUID as 32 lowercase hex digits).

    A message sent again after a reconnect keeps its id: receivers drop
    copies by it.
    """
    sender: str = field(default="", metadata={WIRE: _NAMED})
    """Who wrote and signed the message: the name of the key the signature verifies with.

    A device writes its device id; the service writes "coordinator"; an
    aggregator worker writes its worker name (a key of the task's
    aggregator_keys).
    """
    sent_at: float = field(default_factory=time.time, metadata={WIRE: {"$ref": "unix_time"}})
    """When the message was signed, in seconds since the Unix epoch (fractions allowed).

    Receivers refuse a frame more than 120 s in the future (from_the_future),
    and a check_in, train_task, come_back_later or round control frame signed
    more than 600 s ago (stale).
    """
    reply_to: str | None = None
    """The topic answers to this message go to, or null.

    A train_task names its device's own update topic,
    fedmq/updates/<experiment_id>/<device_id>.
    """


@dataclass(frozen=True, kw_only=True)
class ErrorReply(Message):
    """A message could not be served; says which one and why.

    A device sends it to refuse a train_task it cannot serve (an artifact it
    cannot fetch or that fails its checksum, a setting it cannot honour,
    training that failed). It is signed with the device's key, carries the
    task's grant, and is published where the update would have gone (the
    device's own update topic, the task's reply_to); the worker counts it as the
    device's answer, under device_<code>, so a round need not wait for the
    deadline.
    """

    KIND: ClassVar[MessageKind] = MessageKind.ERROR_REPLY
    in_reply_to: str = field(metadata=_MESSAGE_ID)
    """The message_id of the refused train_task (the grant's task_id)."""
    code: str = field(
        metadata={
            WIRE: {
                "pattern": ERROR_CODE_PATTERN,
                "examples": list(ERROR_CODES),
            }
        }
    )
    """A stable, machine-readable reason.

    The examples are the codes FedMQ's own devices send; a device may send
    others of the same shape, which a worker logs and counts as ``other``
    (so the reasons a round records stay few). A code of another shape is
    refused as malformed.
    """
    detail: str = ""
    """A human-readable explanation, for logs."""
    grant: str = field(default="", metadata={WIRE: {"$ref": "grant"}})
    """The refused task's grant (train_task.grant), copied unchanged.

    FedMQ's reader assumes "" when it is absent, and a worker refuses a reply
    without a valid grant.
    """


@dataclass(frozen=True, kw_only=True)
class TaskGrant(Message):
    """The service's word that a task went to a device: signed by the service, carried as text.

    It never travels as a frame of its own: the service signs it as a whole
    frame (payload empty) and puts the standard base64 of that frame in the
    task's grant; the device returns the text unchanged with its answer
    (model_update or error_reply). A worker decodes it, verifies it with the
    pinned service key, and learns which device key must have signed the answer,
    for which experiment, round and task, and how many examples it may claim,
    without a database or a list of every device. A device need not read it, but
    may (it is an ordinary signed frame).
    """

    KIND: ClassVar[MessageKind] = MessageKind.TASK_GRANT
    experiment_id: str = field(metadata=_SEGMENT)
    """The task's experiment_id."""
    round: int = field(metadata=_AT_LEAST_1)
    """The task's round."""
    device_id: str = field(metadata=_SEGMENT)
    """The device the task went to: the only sender whose answer the grant admits."""
    task_id: str = field(metadata=_MESSAGE_ID)
    """The task's message_id: the answer's task_id (model_update) or in_reply_to (error_reply)."""
    public_key: str = field(metadata={WIRE: {"$ref": "public_key"}})
    """The device's registered Ed25519 public key (base64 of its 32 raw bytes), with
    which the answer's signature is verified.
    """
    max_examples: int = field(metadata=_AT_LEAST_1)
    """The largest num_examples an update under this grant may claim:

    the examples the device declared at check-in, capped by the service's
    limit (1,000,000 by default).
    """


@dataclass(frozen=True, kw_only=True)
class CheckIn(Message):
    """A device is online and willing to train.

    Sent after every (re)connect and again periodically, on the device's own
    check-in topic, signed with its registered key; the coordinator selects a
    round's participants from the devices checked in. A check_in signed more
    than 600 s ago is refused as stale.
    """

    KIND: ClassVar[MessageKind] = MessageKind.CHECK_IN
    TASKS_IN_PROGRESS: ClassVar[str] = "tasks_in_progress"
    """Capability: tasks the device still works on (0 or absent: idle, ready for one)."""
    EXAMPLES: ClassVar[str] = "examples"
    """Capability: how many training examples the device holds (bounds its updates' claims)."""
    HEARTBEAT_S: ClassVar[str] = "heartbeat_s"
    """Capability: the device checks in again at least this often, in seconds, while online."""
    STARTED_AT: ClassVar[str] = "started_at"
    """Capability: when the device's process started (Unix time): a new one means a restart."""
    device_id: str = field(metadata=_SEGMENT)
    """This device's id; also its MQTT client id, the envelope's sender, and the last
    segment of its topics fedmq/checkin/<device_id> and fedmq/device/<device_id>.
    """
    platform: str = field(
        metadata={
            WIRE: {
                **_NAMED,
                "maxLength": 32,
                "examples": ["android", "ios", "python", "emulated"],
            }
        }
    )
    """What the device runs on (at most 32 characters); recorded by the service
    (GET /api/v1/devices).
    """
    experiment_id: str | None = field(default=None, metadata=_SEGMENT)
    """Join only this experiment; null offers the device to any experiment."""
    capabilities: Mapping[str, Scalar] = field(
        default_factory=dict,
        metadata={
            WIRE: {
                "properties": {
                    TASKS_IN_PROGRESS: {"type": "integer", "minimum": 0},
                    EXAMPLES: {"type": "integer", "minimum": 1},
                    HEARTBEAT_S: {"type": "number", "exclusiveMinimum": 0},
                    STARTED_AT: {"type": "number", "minimum": 0},
                }
            }
        },
    )
    """Facts about the device (for example ram_mb).

    Four keys are read: tasks_in_progress, how many tasks the device still
    works on (0 or absent means idle, and an asynchronous experiment hands an
    idle device its next task); examples, how many training examples the
    device holds, a positive integer: the service grants its tasks at most
    that many (task_grant.max_examples, capped by the service's own limit)
    and workers refuse an update claiming more; heartbeat_s, how often the
    device promises to check in while online: the service takes a device
    that stays silent for three such intervals for gone, as it takes one
    whose broker published its last will (a broker without last wills, such
    as AMQP's, publishes none). Without heartbeat_s a device stays online
    until it checks out; started_at, when the device's process (or app
    session) started: a device whose started_at changes has restarted and
    lost the tasks it held in memory, so the service sends it the task of a
    round it was selected for and has not answered again, 5 s later if
    still unanswered then (not in a secure round, whose keys were shared
    without it).
    """


@dataclass(frozen=True, kw_only=True)
class CheckOut(Message):
    """A device is leaving: sent on a clean stop, or by the broker as its last will.

    The device publishes it on a clean stop; the broker publishes it as the
    device's MQTT last will when the connection dies. Either way the device
    signed it (the will is built and signed before connecting, and check_outs
    have no age limit). The coordinator removes it from the pool of online
    devices.
    """

    KIND: ClassVar[MessageKind] = MessageKind.CHECK_OUT
    device_id: str = field(metadata=_SEGMENT)
    """The id of the device that leaves."""
    reason: str = ""
    """Why, for logs: FedMQ writes "stopped" on a clean stop and "connection lost" in
    the last will.
    """


@dataclass(frozen=True, kw_only=True)
class ComeBackLater(Message):
    """Pace steering: the device was not selected and should check in again later.

    It was online when a round started but was not selected; it should publish a
    new check_in after retry_after_s seconds. Signed by the service: a device
    refuses one that the pinned service key did not sign, or that was signed
    more than 600 s ago.
    """

    KIND: ClassVar[MessageKind] = MessageKind.COME_BACK_LATER
    experiment_id: str = field(metadata=_SEGMENT)
    """The experiment whose round started without this device."""
    retry_after_s: float = field(metadata=_AT_LEAST_0)
    """Seconds to wait before checking in again (the time left until the round's
    deadline; 0 means now).
    """
    reason: str = ""
    """Why, for logs ("not selected this round")."""


@dataclass(frozen=True)
class SecAggSettings:
    """How a device prepares its update for secure aggregation (docs/mobile-protocol.md).

    The device clips each value of its update's delta (trained minus task
    weights) to [-clip, clip], multiplies it by its weight (its example count,
    at most max_examples) and by scale, rounds it to an integer and masks it
    modulo 2^32. Its model_update then claims at most max_examples examples.
    """

    clip: float = field(metadata={WIRE: {"exclusiveMinimum": 0}})
    """The largest magnitude of one value of the delta; larger values are clipped."""
    scale: float = field(metadata={WIRE: {"exclusiveMinimum": 0}})
    """The fixed-point scale (a power of two): integer = round(delta * weight * scale)."""
    max_examples: int = field(metadata=_AT_LEAST_1)
    """The largest example count an update may be weighted by (and claim)."""


@dataclass(frozen=True, kw_only=True)
class TrainTask(Message):
    """A selected device's job for one round: what to train, how, and by when.

    It names the weights to start from, the artifacts the device may need, the
    training settings, the deadline, how to return a large update, the service's
    signed grant of the task and the keys of the workers that may answer the
    update. Signed by the service (a device refuses a task the pinned service
    key did not sign, or signed more than 600 s ago). The device answers with
    exactly one model_update or error_reply, signed with its own key, carrying
    this task's grant unchanged, on its own update topic
    fedmq/updates/<experiment_id>/<device_id> (the envelope's reply_to), whose
    task_id / in_reply_to is this message's message_id.
    """

    KIND: ClassVar[MessageKind] = MessageKind.TRAIN_TASK
    CHECK_IN_WHEN_DONE: ClassVar[str] = "check_in_when_done"
    """Training setting: check in (idle) right after answering, for the next task at once."""
    experiment_id: str = field(metadata=_SEGMENT)
    """The experiment this round belongs to."""
    round: int = field(metadata=_AT_LEAST_1)
    """The round number (1, 2, ...); copy it into the update."""
    base_version: int = field(metadata=_AT_LEAST_0)
    """The model version the round trains from; copy it into the update (an update on
    another version is rejected as stale).
    """
    model: ModelRef
    """The global weights to start from: safetensors (weights.safetensors)."""
    artifacts: Mapping[str, ModelRef] = field(
        default_factory=dict, metadata={WIRE: {"keys": _NAMED}}
    )
    """The model version's other artifacts by file name (for example model.onnx,
    model.torchscript.pt, strategy_state.safetensors, and the mobile packages'
    android/... and ios/... files). Fetch only those you need.
    """
    training: Mapping[str, Scalar] = field(
        default_factory=dict,
        metadata={WIRE: {"properties": {CHECK_IN_WHEN_DONE: {"type": "boolean"}}}},
    )
    """Local training settings:

    epochs, batch_size, optimizer (sgd or adam), lr, momentum, weight_decay,
    and strategy terms such as proximal_mu (FedProx) or scaffold (true for
    SCAFFOLD); check_in_when_done (true in asynchronous experiments) asks the
    device to check in, idle, right after answering. A device that cannot
    honour a setting answers with an error_reply (code bad_task).
    """
    deadline_at: float = field(default=0.0, metadata={WIRE: {"$ref": "unix_time"}})
    """When the round closes, in seconds since the Unix epoch; an update arriving later
    is rejected (round_closed).
    """
    upload_url: str | None = field(default=None, metadata={WIRE: {"$ref": "uri"}})
    """Where to PUT an update too large to travel inline (a claim check; Content-Type
    application/octet-stream); null when this deployment takes every update inline.
    """
    max_inline_bytes: int = field(default=0, metadata=_AT_LEAST_0)
    """The largest safetensors update that may travel inside the model_update frame; 0
    means no limit.
    """
    grant: str = field(default="", metadata={WIRE: {"$ref": "grant"}})
    """The service's signed grant of this task, which the device returns with its answer:

    the base64 of a signed task_grant frame naming this experiment, round,
    device, the task's message_id, the device's public key and how many
    examples an update may claim. Return it unchanged in the model_update or
    error_reply. FedMQ's reader assumes "" when it is absent, and a worker
    refuses an answer without a valid grant (bad_grant).
    """
    aggregator_keys: Mapping[str, str] = field(
        default_factory=dict,
        metadata={WIRE: {"keys": _NAMED, "values": {"$ref": "public_key"}}},
    )
    """Public keys of the workers whose update_rejected notices the device may trust:

    worker name -> Ed25519 public key (base64 of 32 raw bytes) of the
    aggregator workers the service trusts. An update_rejected is believed
    only if the key its sender names here (in the latest task) signed it.
    """
    secure_aggregation: SecAggSettings | None = None
    """Present when the round runs secure aggregation: the device takes part in its
    stages (secagg_keys first, at once) and sends its update masked, never in the clear.
    """

    def error_reply(self, code: str, detail: str, *, sender: str) -> ErrorReply:
        """Return the reply a device sends when it cannot do this task."""
        return ErrorReply(
            in_reply_to=self.message_id, code=code, detail=detail, sender=sender, grant=self.grant
        )


@dataclass(frozen=True, kw_only=True)
class ModelUpdate(Message):
    """A device's trained weights for one round, inline or by reference.

    Signed with the device's key and carrying its task's grant. The weights
    travel either inline, as the frame's binary payload (payload_field
    "inline_weights", body.weights null, payload_sha256 the digest of the
    safetensors bytes), or by reference after a PUT to the task's upload_url
    (payload_field null, body.weights a ModelRef). Exactly one of the two. A
    worker admits it only if the grant verifies with the service key, the frame
    with the key the grant names, experiment_id, round, device_id and task_id
    equal the grant's, num_examples is at most the grant's max_examples, and the
    topic is the device's own.
    """

    KIND: ClassVar[MessageKind] = MessageKind.MODEL_UPDATE
    experiment_id: str = field(metadata=_SEGMENT)
    """The task's experiment_id."""
    round: int = field(metadata=_AT_LEAST_1)
    """The task's round."""
    device_id: str = field(metadata=_SEGMENT)
    """This device's id (the grant's device_id); rejections of this update go to
    fedmq/device/<device_id>.
    """
    base_version: int = field(metadata=_AT_LEAST_0)
    """The task's base_version: the version the device trained from."""
    task_id: str = field(metadata=_MESSAGE_ID)
    """The message_id of the train_task this answers."""
    num_examples: int = field(metadata=_AT_LEAST_1)
    """How many local examples the device trained on; the aggregate weighs the update by it.

    At most the grant's max_examples (more is refused unread); 0 or less is
    rejected as bad_example_count.
    """
    weights: ModelRef | None = None
    """The uploaded weights (safetensors) by reference, or null when they travel inline."""
    inline_weights: bytes | memoryview | None = field(
        default=None, metadata={WIRE: {"instead_of": "weights"}}
    )
    """Present (as null) only when the weights do not travel inline: inline weights are
    the frame's binary payload, never JSON.
    """
    metrics: Mapping[str, float] = field(default_factory=dict)
    """Local training metrics:

    loss (mean loss of the last epoch), loss_before (loss of the global
    weights on the local data, q-FedAvg needs it), local_steps (optimizer
    steps taken, FedNova needs it), and any others.
    """
    grant: str = field(default="", metadata={WIRE: {"$ref": "grant"}})
    """The task's grant (train_task.grant), copied unchanged.

    FedMQ's reader assumes "" when it is absent, and a worker refuses an
    update without a valid grant.
    """


@dataclass(frozen=True, kw_only=True)
class UpdateRejected(Message):
    """The aggregator refused an update; tells the device why.

    The model_update was not folded into the round's aggregate. Signed by the
    worker: a device believes it only if the key its sender names in the latest
    train_task's aggregator_keys signed it (it has no age limit). The verdict is
    final for that update; accepted updates get no acknowledgement message.
    """

    KIND: ClassVar[MessageKind] = MessageKind.UPDATE_REJECTED
    experiment_id: str = field(metadata=_SEGMENT)
    """The update's experiment_id."""
    round: int
    """The update's round."""
    update_id: str = field(metadata=_MESSAGE_ID)
    """The message_id of the rejected model_update."""
    reason: RejectReason
    """Why (broker.messages.RejectReason); docs/mobile-protocol.md says what each one
    means and what a device should do.
    """
    detail: str = ""
    """A human-readable explanation, for logs."""


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
    strategy: StrategySpec = field(default_factory=StrategySpec)


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
    strategy: StrategySpec = field(default_factory=StrategySpec)
    unmask: ModelRef | None = None
    """Secure aggregation: the seeds that remove the masks from the sealed sum (a JSON
    object in the store, so they never ride the bus). Absent on the first request of a
    secure round, which the combiner answers with ``RoundMasked`` instead of committing.
    """


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
