"""Durable checkpoints of a round's partial aggregates, and the seal that ends a round's intake.

A worker acknowledges folded updates only after a checkpoint holding their
contribution is in the store: its share of the round state (a ``Partial``:
float64 sums and totals) and the ledger of counted update ids and devices.
Each worker of a cohort round keeps a chain of its own,
``<experiment>.r<round>.<worker>.ckpt``, whose versions are the checkpoint
sequence; the asynchronous intake keeps one chain per step. Versions are
written with the store's create-only manifests, which is what makes the
seal safe.

A round's roster (``<experiment>.r<round>.roster``) lists the workers that
folded any of it, each joining before its first checkpoint. Whoever combines
the round seals it: every listed chain gets a seal version after its newest
checkpoint, then the roster gets one naming those checkpoints. A worker that
tries to checkpoint or join after that finds the version taken and acks
nothing, so its unsaved updates go back to the broker. Hence every acked
update is in exactly one sealed checkpoint, however many workers there were
and whichever of them died.

An update that comes back redelivered while another worker is on the roster
may still be in that worker's unsaved share: its first receiver lost its
connection without knowing it, so it may save the update yet. Such an update
is set aside (``AsideUpdate``: its contribution alone, a store object of its
own) and listed in the checkpoint; the combiner merges it only if no sealed
share counted it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator_service.strategies import Partial
from broker import decode_weights, encode_weights
from model_store import ModelStore
from model_store.errors import ManifestError

AGGREGATE = "aggregate.safetensors"
MEDIA_TYPE = "application/vnd.fedmq.aggregate+safetensors"
_SEALED = "sealed"


class Sealed(Exception):
    """The round was sealed for combining: nothing more may be saved for it."""


class NameClash(Exception):
    """Another process saved a checkpoint under this worker's name: two workers share it."""


class _Taken(Exception):
    """A create-only version number is already used by other content."""


@dataclass
class RoundCheckpoint:
    """Everything needed to resume, or combine, one worker's share of a round."""

    sequence: int
    partial: Partial = field(default_factory=Partial)
    accepted: list[str] = field(default_factory=list)
    accepted_devices: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    reporters: list[str] = field(default_factory=list)
    examples: int = 0
    loss_sum: float = 0.0
    aside: list[str] = field(default_factory=list)
    """Ids of the updates set aside (``AsideUpdate``), not in ``partial``."""
    aside_devices: list[str] = field(default_factory=list)
    """Their devices (not in ``accepted_devices``: another share may count them)."""


@dataclass
class AsideUpdate:
    """One redelivered update's contribution, kept out of its worker's sums until combined."""

    update_id: str
    device: str
    round: int
    """The round (or step) the update answered; a buffered step folds earlier ones too."""
    examples: int
    loss_sum: float
    partial: Partial


class Checkpoints:
    """Writes, reads and seals round checkpoints in a model store."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store

    @staticmethod
    def model_id(experiment_id: str, round_number: int, worker: str | None = None) -> str:
        """Return the store id a chain of checkpoints are versions of."""
        chain = f".{worker}" if worker else ""
        return f"{experiment_id}.r{round_number}{chain}.ckpt"

    @staticmethod
    def roster_id(experiment_id: str, round_number: int) -> str:
        """Return the store id of a round's roster of workers."""
        return f"{experiment_id}.r{round_number}.roster"

    def save(
        self,
        experiment_id: str,
        round_number: int,
        checkpoint: RoundCheckpoint,
        worker: str | None = None,
    ) -> None:
        """Write ``checkpoint`` durably; ``Sealed`` if the chain was sealed first."""
        metadata: dict[str, Any] = {
            "scalars": checkpoint.partial.scalars,
            "accepted": checkpoint.accepted,
            "accepted_devices": checkpoint.accepted_devices,
            "rejected": checkpoint.rejected,
            "reporters": checkpoint.reporters,
            "examples": checkpoint.examples,
            "loss_sum": checkpoint.loss_sum,
            "aside": checkpoint.aside,
            "aside_devices": checkpoint.aside_devices,
        }
        model_id = self.model_id(experiment_id, round_number, worker)
        artifacts = {AGGREGATE: (encode_weights(checkpoint.partial.tensors), MEDIA_TYPE)}
        try:
            self._create(model_id, checkpoint.sequence, artifacts, metadata)
        except _Taken as exc:
            if self._is_seal(model_id, checkpoint.sequence):
                raise Sealed(f"{model_id} was sealed for combining") from exc
            raise NameClash(
                f"{model_id} v{checkpoint.sequence} was saved by another process: "
                "give every worker a --name of its own"
            ) from exc

    @staticmethod
    def aside_id(experiment_id: str, round_number: int, update_id: str) -> str:
        """Return the store id of an update set aside (devices name their own update ids)."""
        digest = hashlib.sha256(update_id.encode()).hexdigest()[:32]
        return f"{experiment_id}.r{round_number}.aside.{digest}"

    def set_aside(self, experiment_id: str, round_number: int, aside: AsideUpdate) -> bool:
        """Write ``aside`` durably; False if another device's update holds its id.

        Written once: a second worker setting the same update aside holds the
        same contribution.
        """
        metadata: dict[str, Any] = {
            "update_id": aside.update_id,
            "device": aside.device,
            "round": aside.round,
            "examples": aside.examples,
            "loss_sum": aside.loss_sum,
            "scalars": aside.partial.scalars,
        }
        artifacts = {AGGREGATE: (encode_weights(aside.partial.tensors), MEDIA_TYPE)}
        model_id = self.aside_id(experiment_id, round_number, aside.update_id)
        try:
            self._create(model_id, 0, artifacts, metadata)
        except _Taken:
            held = self._store.get_manifest(model_id, 0).metadata
            return bool(held["update_id"] == aside.update_id and held["device"] == aside.device)
        return True

    def read_aside(self, experiment_id: str, round_number: int, update_id: str) -> AsideUpdate:
        """Return an update set aside in the round."""
        model_id = self.aside_id(experiment_id, round_number, update_id)
        manifest = self._store.get_manifest(model_id, 0)
        meta: Mapping[str, Any] = manifest.metadata
        return AsideUpdate(
            update_id=str(meta["update_id"]),
            device=str(meta["device"]),
            round=int(meta["round"]),
            examples=int(meta["examples"]),
            loss_sum=float(meta["loss_sum"]),
            partial=self._partial(manifest.artifacts[AGGREGATE].sha256, meta["scalars"]),
        )

    def latest(
        self, experiment_id: str, round_number: int, worker: str | None = None
    ) -> RoundCheckpoint | None:
        """Return a chain's newest checkpoint (before its seal), or None if it has none."""
        model_id = self.model_id(experiment_id, round_number, worker)
        seq = self._newest(model_id)
        return None if seq < 0 else self._read(model_id, seq)

    def read(
        self, experiment_id: str, round_number: int, worker: str, sequence: int
    ) -> RoundCheckpoint:
        """Return one checkpoint of a worker's chain."""
        return self._read(self.model_id(experiment_id, round_number, worker), sequence)

    def counted_by_others(
        self, experiment_id: str, round_number: int, worker: str | None = None
    ) -> set[str]:
        """Return the update ids the newest checkpoints of the round's other workers hold.

        Folded or set aside: either way the round counts it once. Reads
        manifests only; ``worker=None`` reads every worker's, sealed or not. A
        worker asks when an update comes back redelivered: a predecessor may
        have saved it and died before its ack.
        """
        counted: set[str] = set()
        for member in self.roster(experiment_id, round_number):
            if member == worker:
                continue
            model_id = self.model_id(experiment_id, round_number, member)
            seq = self._newest(model_id)
            if seq >= 0:
                metadata = self._store.get_manifest(model_id, seq).metadata
                counted.update(metadata["accepted"], metadata.get("aside", ()))
        return counted

    def saved_devices(self, experiment_id: str, round_number: int) -> tuple[set[str], set[str]]:
        """Return the devices the round's newest saved shares heard from, and those they count.

        Counted: folded or set aside (the round counts those once either way).
        The coordinator reads them when a training round goes quiet: a worker
        may have saved devices and died before it reported them. Manifests only.
        """
        reported: set[str] = set()
        counted: set[str] = set()
        for member in self.roster(experiment_id, round_number):
            model_id = self.model_id(experiment_id, round_number, member)
            seq = self._newest(model_id)
            if seq >= 0:
                metadata = self._store.get_manifest(model_id, seq).metadata
                reported.update(metadata["reporters"])
                counted.update(metadata["accepted_devices"], metadata.get("aside_devices", ()))
        return reported, counted

    def roster(self, experiment_id: str, round_number: int) -> list[str]:
        """Return the workers on the round's roster (sealed or not)."""
        roster = self.roster_id(experiment_id, round_number)
        latest = self._store.latest_version(roster)
        metadata = [
            self._store.get_manifest(roster, v).metadata
            for v in range(0 if latest is None else latest + 1)
        ]
        return [str(m["worker"]) for m in metadata if "worker" in m]

    def is_sealed(self, experiment_id: str, round_number: int) -> bool:
        """Return whether the round was sealed for combining."""
        return self._roster(self.roster_id(experiment_id, round_number)) is None

    def join(self, experiment_id: str, round_number: int, worker: str) -> None:
        """Put ``worker`` on the round's roster; ``Sealed`` if the round was sealed first."""
        roster = self.roster_id(experiment_id, round_number)
        while True:
            members = self._roster(roster)
            if members is None:
                raise Sealed(f"{experiment_id} round {round_number} is sealed")
            if worker in members:
                return
            try:
                self._create(roster, len(members), {}, {"worker": worker})
                return
            except _Taken:
                continue  # another worker joined at that number, or a seal: look again

    def seal(self, experiment_id: str, round_number: int) -> dict[str, int]:
        """Seal the round (idempotent); return each worker's last checkpoint sequence (-1: none).

        A second sealer (the first died midway) finishes the same seal: the
        roster's seal, once written, fixes the answer.
        """
        roster = self.roster_id(experiment_id, round_number)
        while True:
            members = self._roster(roster)
            if members is None:
                manifest = self._store.get_manifest(roster, self._store.latest_version(roster) or 0)
                return {str(k): int(v) for k, v in manifest.metadata[_SEALED].items()}
            last = {w: self._seal_chain(experiment_id, round_number, w) for w in members}
            try:
                self._create(roster, len(members), {}, {_SEALED: last})
            except _Taken:
                continue  # a worker joined meanwhile (its chain is sealed next time round)
            return last

    def _seal_chain(self, experiment_id: str, round_number: int, worker: str) -> int:
        """Seal one worker's chain after its newest checkpoint; return that checkpoint's number."""
        model_id = self.model_id(experiment_id, round_number, worker)
        while True:
            latest = self._store.latest_version(model_id)
            if latest is not None and self._is_seal(model_id, latest):
                return latest - 1
            following = -1 if latest is None else latest
            try:
                self._create(model_id, following + 1, {}, {_SEALED: True})
                return following
            except _Taken:
                continue  # the worker saved one more first: seal after it

    def _roster(self, roster: str) -> list[str] | None:
        """Return the roster's workers in joining order, or None once it is sealed."""
        latest = self._store.latest_version(roster)
        members: list[str] = []
        for version in range(0 if latest is None else latest + 1):
            metadata = self._store.get_manifest(roster, version).metadata
            if _SEALED in metadata:
                return None
            members.append(str(metadata["worker"]))
        return members

    def _newest(self, model_id: str) -> int:
        """Return a chain's newest checkpoint number, skipping its seal (-1: none)."""
        seq = self._store.latest_version(model_id)
        if seq is not None and self._is_seal(model_id, seq):
            seq -= 1
        return -1 if seq is None else seq

    def _is_seal(self, model_id: str, version: int) -> bool:
        return _SEALED in self._store.get_manifest(model_id, version).metadata

    def _create(
        self,
        model_id: str,
        version: int,
        artifacts: Mapping[str, tuple[bytes, str]],
        metadata: Mapping[str, Any],
    ) -> None:
        """Create a version, or raise ``_Taken`` if that number holds other content."""
        try:
            self._store.publish(
                model_id,
                version,
                artifacts,
                parent=version - 1 if version > 0 else None,
                metadata=metadata,
            )
        except ManifestError as exc:
            if self._store.latest_version(model_id) is None:
                raise  # not a conflict: the store refused the manifest itself
            raise _Taken(f"{model_id} v{version}") from exc

    def _read(self, model_id: str, sequence: int) -> RoundCheckpoint:
        manifest = self._store.get_manifest(model_id, sequence)
        meta: Mapping[str, Any] = manifest.metadata
        return RoundCheckpoint(
            sequence=sequence,
            partial=self._partial(manifest.artifacts[AGGREGATE].sha256, meta["scalars"]),
            accepted=list(meta["accepted"]),
            accepted_devices=list(meta["accepted_devices"]),
            rejected={str(k): int(v) for k, v in meta["rejected"].items()},
            reporters=list(meta["reporters"]),
            examples=int(meta["examples"]),
            loss_sum=float(meta["loss_sum"]),
            aside=list(meta.get("aside", ())),
            aside_devices=list(meta.get("aside_devices", ())),
        )

    def _partial(self, sha256: str, scalars: Mapping[str, Any]) -> Partial:
        tensors: dict[str, np.ndarray] = decode_weights(self._store.get_blob(sha256), copy=True)
        return Partial(tensors, {str(k): float(v) for k, v in scalars.items()})
