"""Tables of the service's state: experiments, rounds and devices."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

experiments = Table(
    "experiments",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("config", JSON, nullable=False),
    Column("state", String(20), nullable=False),
    Column("model_version", Integer, nullable=False),
    Column("current_round", Integer, nullable=False),
    Column("rounds_requested", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
)

rounds = Table(
    "rounds",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("experiment_id", String(64), ForeignKey("experiments.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("state", String(20), nullable=False),
    Column("base_version", Integer, nullable=False),
    Column("version", Integer),
    Column("selected", JSON, nullable=False),
    Column("reported", Integer, nullable=False, default=0),
    Column("accepted", JSON, nullable=False),
    Column("accepted_devices", JSON, nullable=False),
    Column("rejected", JSON, nullable=False),
    Column("dropped", Integer, nullable=False, default=0),
    Column("metrics", JSON, nullable=False),
    Column("reason", Text),
    Column("started_at", Float, nullable=False),
    Column("deadline_at", Float, nullable=False),
    Column("ended_at", Float),
    # The lengths of ``selected`` and ``accepted``: a run's rounds are listed
    # without reading a 1,000-device cohort's lists back.
    Column("selected_count", Integer, nullable=False, server_default="0"),
    Column("accepted_count", Integer, nullable=False, server_default="0"),
    UniqueConstraint("experiment_id", "number", name="uq_round_number"),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("platform", String(32), nullable=False),
    Column("token_sha256", String(64)),
    Column("registered_at", Float, nullable=False),
    Column("last_seen", Float),
    Column("rounds_served", Integer, nullable=False, default=0),
    Column("public_key", String(64)),
    Column("revoked_at", Float),
)

secagg_rounds = Table(
    "secagg_rounds",
    metadata,
    Column("experiment_id", String(64), primary_key=True),
    Column("number", Integer, primary_key=True),
    # The stage, the sets the protocol fixed so far and the round's scale
    # ({"stage", "u1", "u2", "u3", "scale"}).
    Column("state", JSON, nullable=False),
)

secagg_frames = Table(
    "secagg_frames",
    metadata,
    Column("experiment_id", String(64), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("kind", String(32), primary_key=True),
    # The device's signed frame as received (verified before it was written).
    Column("frame", LargeBinary, nullable=False),
)
