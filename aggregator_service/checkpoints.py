"""Durable checkpoints of a round's running aggregate, so updates can be acked early.

The worker acknowledges a batch of folded updates only after a checkpoint
holding their contribution is in the store: the float64 sums, the total
weight, and the ledger of counted update ids and devices. A worker that
takes over the round restores the newest checkpoint; updates folded after it
were never acked, so the broker redelivers them and they are folded once.
Checkpoints are store versions of a model id of their own,
``<experiment>.r<round>.ckpt``, written with the store's create-only
manifests, so two workers can never both claim the same sequence number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from broker import decode_weights, encode_weights
from model_store import ModelStore

AGGREGATE = "aggregate.safetensors"
MEDIA_TYPE = "application/vnd.fedmq.aggregate+safetensors"


@dataclass
class RoundCheckpoint:
    """Everything needed to resume a round's aggregation."""

    sequence: int
    sums: dict[str, np.ndarray]
    total_weight: float
    count: int
    accepted: list[str] = field(default_factory=list)
    accepted_devices: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    reporters: list[str] = field(default_factory=list)
    examples: int = 0
    loss_sum: float = 0.0


class Checkpoints:
    """Writes and reads round checkpoints in a model store."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store

    @staticmethod
    def model_id(experiment_id: str, round_number: int) -> str:
        """Return the store id checkpoints of a round are versions of."""
        return f"{experiment_id}.r{round_number}.ckpt"

    def save(self, experiment_id: str, round_number: int, checkpoint: RoundCheckpoint) -> None:
        """Write ``checkpoint`` durably (raises the store's error if it cannot)."""
        metadata: dict[str, Any] = {
            "total_weight": checkpoint.total_weight,
            "count": checkpoint.count,
            "accepted": checkpoint.accepted,
            "accepted_devices": checkpoint.accepted_devices,
            "rejected": checkpoint.rejected,
            "reporters": checkpoint.reporters,
            "examples": checkpoint.examples,
            "loss_sum": checkpoint.loss_sum,
        }
        seq = checkpoint.sequence
        self._store.publish(
            self.model_id(experiment_id, round_number),
            seq,
            {AGGREGATE: (encode_weights(checkpoint.sums), MEDIA_TYPE)},
            parent=seq - 1 if seq > 0 else None,
            metadata=metadata,
        )

    def latest(self, experiment_id: str, round_number: int) -> RoundCheckpoint | None:
        """Return the newest checkpoint of a round, or None if it has none."""
        model_id = self.model_id(experiment_id, round_number)
        seq = self._store.latest_version(model_id)
        if seq is None:
            return None
        manifest = self._store.get_manifest(model_id, seq)
        meta: Mapping[str, Any] = manifest.metadata
        sums = decode_weights(self._store.get_blob(manifest.artifacts[AGGREGATE].sha256), copy=True)
        return RoundCheckpoint(
            sequence=seq,
            sums=sums,
            total_weight=float(meta["total_weight"]),
            count=int(meta["count"]),
            accepted=list(meta["accepted"]),
            accepted_devices=list(meta["accepted_devices"]),
            rejected={str(k): int(v) for k, v in meta["rejected"].items()},
            reporters=list(meta["reporters"]),
            examples=int(meta["examples"]),
            loss_sum=float(meta["loss_sum"]),
        )
