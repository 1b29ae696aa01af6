"""Typed contracts of the REST API: every request and response body, as pydantic models.

The OpenAPI document (``openapi.py``) is generated from these, so a body
cannot be documented one way and described another. They describe; they do
not validate at run time: the views keep their own checks, and an
experiment config is still parsed by ``ExperimentConfig.from_dict``, which
lists every problem at once. The config's models are generated from
``config.py``'s dataclasses (``config_contract.py``). Tests check the
views' real answers against these models.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aggregator_service.api.config_contract import ExperimentConfigBody, choice
from aggregator_service.rounds.closing import RoundStatus
from aggregator_service.rounds.records import Waiting
from aggregator_service.rounds.registry import PLATFORMS as DEVICE_PLATFORMS

_DESCRIBED = ConfigDict(use_attribute_docstrings=True)
"""Field docstrings (``records.Waiting``'s, ``RoundStatus``'s) become descriptions."""


# -- errors and liveness -------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong, by a stable code and a message for people."""

    code: str = Field(examples=["invalid_config", "not_found", "unauthorized"])
    message: str
    problems: list[str] = Field(
        default_factory=list,
        description="invalid_config only: every problem of the config, one per entry.",
    )


class ErrorBody(BaseModel):
    """Every 4xx answer of the API."""

    error: ErrorDetail


class Health(BaseModel):
    """The service answers."""

    status: Literal["ok"]


class Check(BaseModel):
    """One readiness check: whether it passes, and what was seen."""

    ok: bool
    detail: str


class Readiness(BaseModel):
    """Whether the service can run rounds now: its database, broker and workers."""

    ready: bool
    checks: dict[str, Check] = Field(examples=[{"database": {"ok": True, "detail": "answers"}}])


# -- experiments and rounds ----------------------------------------------------


class Created(BaseModel):
    """A new experiment's id; its model is published as version 0."""

    id: str


class Experiment(BaseModel):
    """One experiment: its state, progress through its rounds, model version and config."""

    model_config = _DESCRIBED

    id: str
    name: str
    state: Literal["idle", "running", "waiting"]
    current_round: int
    rounds_requested: int
    model_version: int
    created_at: float
    config: ExperimentConfigBody  # type: ignore[valid-type]
    waiting: Waiting | None = Field(
        description="Why a waiting experiment waits; null unless its state is waiting."
    )


class ExperimentList(BaseModel):
    """Every experiment."""

    experiments: list[Experiment]


class RoundsRequest(BaseModel):
    """How many rounds to queue; they run one after another."""

    model_config = ConfigDict(extra="forbid")

    count: int = Field(1, ge=1, le=10_000)


class Round(BaseModel):
    """One round: its outcome once ended, and live progress while in flight."""

    model_config = _DESCRIBED

    round: int
    state: Literal["training", "committed", "abandoned"]
    base_version: int
    version: int | None = Field(description="The version the round committed (else null).")
    selected: int
    selected_devices: list[str] | None = Field(
        description="The selected devices' ids, up to 100 of them; null for a longer list "
        "(page through it at /experiments/{experiment_id}/rounds/{number}/devices)."
    )
    reported: int
    accepted: int
    accepted_updates: list[str] | None = Field(
        description="The accepted updates' ids, up to 100 of them; null for a longer list "
        "(paged like selected_devices)."
    )
    rejected: dict[str, int] = Field(description="Refused updates by reason.")
    dropped: int
    metrics: dict[str, float] = Field(
        description="loss, accuracy, train_loss, and epsilon with DP, once committed."
    )
    reason: str | None = Field(description="Why the round was abandoned (else null).")
    started_at: float
    deadline_at: float
    ended_at: float | None
    duration_s: float | None
    progress: RoundStatus | None = Field(
        None,
        description="Rounds in flight only: what the workers reported so far "
        "(null until the coordinator has heard of the round).",
    )


class RoundList(BaseModel):
    """An experiment's rounds, oldest first."""

    rounds: list[Round]


class RoundDevice(BaseModel):
    """A device a round selected."""

    id: str
    accepted: bool = Field(description="Whether its update was accepted (in flight: so far).")


class RoundDevices(BaseModel):
    """A page of a round's selected devices, and the same slice of its accepted updates."""

    round: int
    selected: int = Field(description="How many devices the round selected.")
    accepted: int = Field(description="How many updates it accepted (in flight: so far).")
    offset: int
    next_offset: int | None = Field(description="Where the next page starts (null: none).")
    devices: list[RoundDevice] = Field(description="Selected devices from offset, in order.")
    accepted_updates: list[str] = Field(
        description="Accepted updates' ids from offset (empty until the round commits)."
    )


# -- devices -------------------------------------------------------------------


class Registration(BaseModel):
    """A device to register: its platform, and optionally its own key and id."""

    platform: choice(DEVICE_PLATFORMS)  # type: ignore[valid-type]
    public_key: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Its Ed25519 public key, base64; without one the service makes the pair.",
    )
    device_id: str | None = Field(
        None,
        pattern="^[A-Za-z0-9_-]{1,128}$",
        description="An id of its own choosing (default: one made up from the platform).",
    )


class Rotation(BaseModel):
    """A device's new public key (without one the service makes a new pair)."""

    public_key: str | None = Field(None, min_length=1, max_length=128)


class BrokerUser(BaseModel):
    """The device's own broker user, where the service provisions them."""

    username: str
    password: str


class Registered(BaseModel):
    """What a device is told once: its id, token, keys and broker credentials."""

    device_id: str
    token: str = Field(description="Stored only as a hash: shown this once.")
    public_key: str
    service_key: str = Field(description="The service's public key: it signs every task.")
    namespace: str
    private_key: str | None = Field(
        None, description="Only when the service made the key pair (base64 of 32 raw bytes)."
    )
    broker: BrokerUser | None = None


class Revoked(BaseModel):
    """A revoked device: its frames are refused and its broker user removed."""

    device_id: str
    revoked: Literal[True]


class Device(BaseModel):
    """A known device as an operator sees it."""

    id: str
    platform: choice(DEVICE_PLATFORMS)  # type: ignore[valid-type]
    state: Literal["online", "offline", "revoked"]
    registered_at: float
    last_seen: float | None
    rounds_served: int
    public_key: str | None
    revoked: bool


class DeviceCounts(BaseModel):
    """Every registered device, counted by state."""

    online: int
    offline: int
    revoked: int


class DeviceList(BaseModel):
    """The known devices by id: all of them, or a page (``?limit=n&after=id``)."""

    devices: list[Device]
    counts: DeviceCounts
    next_after: str | None = Field(
        description="The last id of this page when more follow (pass it as after), else null."
    )


# -- example configs and uploads -------------------------------------------------


class ConfigFile(BaseModel):
    """An example config's name and file."""

    name: str
    file: str


class ConfigList(BaseModel):
    """The example configs the dashboard offers."""

    configs: list[ConfigFile]


class ExampleConfig(BaseModel):
    """One example config, parsed and checked like a POSTed one."""

    name: str
    file: str
    config: ExperimentConfigBody  # type: ignore[valid-type]


class Uploaded(BaseModel):
    """A stored upload: its sha256 for the device's claim check."""

    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    size: int


REQUESTS: tuple[type[BaseModel], ...] = (
    ExperimentConfigBody,
    RoundsRequest,
    Registration,
    Rotation,
)
"""Request bodies (JSON Schema in validation mode)."""

RESPONSES: tuple[type[BaseModel], ...] = (
    ErrorBody,
    Health,
    Readiness,
    Created,
    Experiment,
    ExperimentList,
    RoundList,
    RoundDevices,
    Registered,
    Revoked,
    DeviceList,
    ConfigList,
    ExampleConfig,
    Uploaded,
)
"""Response bodies (JSON Schema in serialization mode)."""

__all__ = [
    "REQUESTS",
    "RESPONSES",
    "BrokerUser",
    "Check",
    "ConfigFile",
    "ConfigList",
    "Created",
    "Device",
    "DeviceCounts",
    "DeviceList",
    "ErrorBody",
    "ErrorDetail",
    "ExampleConfig",
    "Experiment",
    "ExperimentConfigBody",
    "ExperimentList",
    "Health",
    "Readiness",
    "Registered",
    "Registration",
    "Revoked",
    "Rotation",
    "Round",
    "RoundDevice",
    "RoundDevices",
    "RoundList",
    "RoundsRequest",
    "Uploaded",
]
