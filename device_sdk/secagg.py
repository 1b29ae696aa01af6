"""A device's side of secure aggregation: keys, shares, the masked update, the reveal.

The device keeps one round's secrets (two X25519 keys and a self-mask seed)
from its task until the round is over, and answers each stage once; a
repeated request gets the same answer again (the coordinator may have
restarted). Its update leaves the device only masked: quantised to
integers modulo 2^32, plus its own seed's mask, plus or minus a pairwise
mask with each neighbour that completed the key exchange. It reveals, for
each neighbour, the share of its seed or of its mask key, never both.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from broker import Message, TrainTask, encode
from broker.identity import Identity
from broker.messages import SecAggSettings
from broker.secagg import (
    AgreementKey,
    SecAggError,
    agree,
    apply_mask,
    flatten,
    open_sealed,
    quantize,
    seal,
    split,
    unflatten,
)
from broker.secagg.messages import (
    SecAggDelivery,
    SecAggKeys,
    SecAggNeighbours,
    SecAggPeer,
    SecAggReveal,
    SecAggShares,
    SecAggUnmask,
)
from broker.secagg.protocol import (
    SEED_BYTES,
    b64,
    cipher_context,
    mask_context,
    pair_sign,
    share_aad,
    unb64,
)
from broker.secagg.shamir import SHARE_BYTES
from broker.topics import Topics

log = logging.getLogger(__name__)

SendUpdate = Callable[[TrainTask, dict[str, np.ndarray], int, dict[str, float]], None]
"""Sends a masked update for a task: weights (uint32), example count, metrics."""


class Vanish(enum.Enum):
    """Where an emulated device drops out of a secure round (to test dropouts)."""

    KEYS = "keys"
    """Before advertising its keys."""
    SHARES = "shares"
    """After its keys, before sending its shares."""
    UPLOAD = "upload"
    """After its shares, before sending its masked update."""
    UNMASK = "unmask"
    """After its masked update, before revealing any share."""


@dataclass
class _Trained:
    task: TrainTask
    delta: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


@dataclass
class _Round:
    """One round's secrets and what this device has answered so far."""

    task: TrainTask
    settings: SecAggSettings
    cipher: AgreementKey = field(default_factory=AgreementKey.generate)
    mask: AgreementKey = field(default_factory=AgreementKey.generate)
    seed: bytes = field(default_factory=lambda: os.urandom(SEED_BYTES))
    peers: Mapping[str, SecAggPeer] | None = None
    shares: SecAggShares | None = None
    delivered: Mapping[str, str] | None = None
    trained: _Trained | None = None
    sent: bool = False
    reveal: tuple[SecAggUnmask, SecAggReveal] | None = None


class SecureParticipant:
    """Takes part in the secure rounds of one device.

    Parameters
    ----------
    identity
        The device's identity: its id and the key its messages are signed with.
    publish
        Publishes a frame on a topic.
    topics
        The deployment's topics.
    send_update
        Sends the masked update the normal way (inline or uploaded).
    vanish
        For an emulated device: the stage at which it stops answering.
    """

    KEEP_ROUNDS = 2
    """Rounds of one experiment whose secrets are kept (the newest): older ones cannot complete."""

    def __init__(
        self,
        identity: Identity,
        publish: Callable[[str, bytes], None],
        topics: Topics,
        send_update: SendUpdate,
        *,
        vanish: Vanish | None = None,
    ) -> None:
        self._identity = identity
        self._me = identity.name
        self._publish = publish
        self._topics = topics
        self._send_update = send_update
        self._vanish = vanish
        self._lock = threading.Lock()
        self._rounds: dict[tuple[str, int], _Round] = {}

    def task(self, task: TrainTask) -> bool:
        """Start (or repeat) a secure task's key stage; return False for a repeated task."""
        assert task.secure_aggregation is not None
        key = (task.experiment_id, task.round)
        with self._lock:
            rnd = self._rounds.get(key)
            new = rnd is None
            if rnd is None:
                rnd = _Round(task, task.secure_aggregation)
                self._rounds[key] = rnd
                same = sorted(k for k in self._rounds if k[0] == task.experiment_id)
                for old in sorted(same, key=lambda k: k[1])[: -self.KEEP_ROUNDS]:
                    del self._rounds[old]
        if self._vanish is Vanish.KEYS:
            return new
        self._send(
            SecAggKeys(
                experiment_id=task.experiment_id,
                round=task.round,
                device_id=self._me,
                task_id=rnd.task.message_id,
                cipher_key=b64(rnd.cipher.public_bytes()),
                mask_key=b64(rnd.mask.public_bytes()),
            )
        )
        return new

    def holds(self, experiment_id: str, number: int) -> bool:
        """Return whether this device takes part in that round securely (its task said so)."""
        return (experiment_id, number) in self._rounds

    def may_train(self) -> bool:
        """Return whether this device trains at all (an emulated dropout before upload does not)."""
        return self._vanish not in (Vanish.KEYS, Vanish.SHARES, Vanish.UPLOAD)

    def neighbours(self, message: SecAggNeighbours) -> None:
        """Share this round's seed and mask key among the neighbourhood, encrypted per peer."""
        rnd = self._round(message)
        if rnd is None or self._vanish in (Vanish.KEYS, Vanish.SHARES):
            return
        with self._lock:
            if rnd.shares is None:
                rnd.shares = self._make_shares(rnd, message)
                rnd.peers = dict(message.peers)
            shares = rnd.shares
        self._send(shares)

    def _make_shares(self, rnd: _Round, message: SecAggNeighbours) -> SecAggShares:
        own = message.peers.get(self._me)
        if own is None or (own.cipher_key, own.mask_key) != (
            b64(rnd.cipher.public_bytes()),
            b64(rnd.mask.public_bytes()),
        ):
            raise SecAggError("the neighbourhood does not hold the keys this device advertised")
        if message.threshold < 2 or 2 * message.threshold <= len(message.peers):
            # Below a strict majority, a coordinator telling two halves of the
            # neighbourhood different stories could rebuild both of a secret's
            # halves (its seed and its mask key): this device's update in the clear.
            raise SecAggError(
                f"threshold {message.threshold} is not a majority of {len(message.peers)} peers"
            )
        xs = {v: peer.index for v, peer in message.peers.items()}
        seed_shares = split(rnd.seed, list(xs.values()), message.threshold)
        key_shares = split(rnd.mask.private_bytes(), list(xs.values()), message.threshold)
        task = rnd.task
        context = cipher_context(task.experiment_id, task.round)
        sealed = {}
        for v, peer in message.peers.items():
            key = agree(rnd.cipher, unb64(peer.cipher_key, size=32), context=context)
            plain = seed_shares[xs[v]] + key_shares[xs[v]]
            aad = share_aad(task.experiment_id, task.round, self._me, v)
            sealed[v] = b64(seal(key, plain, aad=aad))
        return SecAggShares(
            experiment_id=task.experiment_id, round=task.round, device_id=self._me, shares=sealed
        )

    def delivery(self, message: SecAggDelivery) -> None:
        """Note whom to mask against; send the masked update if training is done."""
        rnd = self._round(message)
        if rnd is None:
            return
        with self._lock:
            if rnd.delivered is None and rnd.peers is not None:
                if not set(message.shares) <= set(rnd.peers) or self._me not in message.shares:
                    raise SecAggError("a delivery from devices outside the neighbourhood")
                rnd.delivered = dict(message.shares)
        self._send_masked(rnd)

    def trained(
        self,
        task: TrainTask,
        base: Mapping[str, np.ndarray],
        weights: Mapping[str, np.ndarray],
        num_examples: int,
        metrics: dict[str, float],
    ) -> None:
        """Keep the trained delta; send it masked once the delivery is in."""
        rnd = self._rounds.get((task.experiment_id, task.round))
        if rnd is None:
            raise SecAggError("no secure round for this task")
        delta = {k: np.subtract(weights[k], base[k], dtype=np.float64) for k in base}
        with self._lock:
            if rnd.trained is None:
                rnd.trained = _Trained(task, delta, num_examples, metrics)
        self._send_masked(rnd)

    def _send_masked(self, rnd: _Round) -> None:
        with self._lock:
            if rnd.sent or rnd.trained is None or rnd.delivered is None or rnd.peers is None:
                return
            if self._vanish is Vanish.UPLOAD:
                return
            rnd.sent = True
            trained, delivered, peers = rnd.trained, rnd.delivered, rnd.peers
        settings = rnd.settings
        weight = min(trained.num_examples, settings.max_examples)
        shapes = {k: v.shape for k, v in trained.delta.items()}
        values, clipped = quantize(
            flatten(trained.delta), clip=settings.clip, weight=weight, scale=settings.scale
        )
        apply_mask(values, rnd.seed, 1)
        task = rnd.task
        context = mask_context(task.experiment_id, task.round)
        for v in delivered:
            if v != self._me:
                pair = agree(rnd.mask, unb64(peers[v].mask_key, size=32), context=context)
                apply_mask(values, pair, pair_sign(self._me, v))
        metrics = {**trained.metrics, "secagg_clipped": float(clipped)}
        try:
            self._send_update(trained.task, unflatten(values, shapes), weight, metrics)
        except Exception:
            with self._lock:  # the same masked values may go again on the next delivery
                rnd.sent = False
            raise

    def unmask(self, message: SecAggUnmask) -> None:
        """Reveal, per neighbour, its seed's share (in the sum) or its key's share (not)."""
        rnd = self._round(message)
        if rnd is None or self._vanish in (Vanish.KEYS, Vanish.SHARES, Vanish.UNMASK):
            return
        with self._lock:
            if rnd.reveal is None:
                rnd.reveal = (message, self._make_reveal(rnd, message))
            asked, reveal = rnd.reveal
        if (asked.survivors, asked.dropped) != (message.survivors, message.dropped):
            raise SecAggError("a second, different unmask request for one round")
        self._send(reveal)

    def _make_reveal(self, rnd: _Round, message: SecAggUnmask) -> SecAggReveal:
        survivors, dropped = set(message.survivors), set(message.dropped)
        delivered = rnd.delivered or {}
        if survivors & dropped:
            raise SecAggError("asked for both shares of one device")
        if self._me in dropped or not (survivors | dropped) <= set(delivered):
            raise SecAggError("asked about devices that delivered this device no share")
        assert rnd.peers is not None
        task = rnd.task
        context = cipher_context(task.experiment_id, task.round)
        seeds, keys = {}, {}
        for v in sorted(survivors | dropped):
            key = agree(rnd.cipher, unb64(rnd.peers[v].cipher_key, size=32), context=context)
            aad = share_aad(task.experiment_id, task.round, v, self._me)
            try:
                plain = open_sealed(key, unb64(delivered[v], what="share"), aad=aad)
            except SecAggError as exc:  # v sent garbage: reveal the others' shares
                log.warning("%s: the share %s sent does not open: %s", self._me, v, exc)
                continue
            if v in survivors:
                seeds[v] = b64(plain[:SHARE_BYTES])
            else:
                keys[v] = b64(plain[SHARE_BYTES:])
        return SecAggReveal(
            experiment_id=task.experiment_id,
            round=task.round,
            device_id=self._me,
            seed_shares=seeds,
            key_shares=keys,
        )

    def _round(self, message: SecAggNeighbours | SecAggDelivery | SecAggUnmask) -> _Round | None:
        rnd = self._rounds.get((message.experiment_id, message.round))
        if rnd is None:
            log.info("%s: %s for a round it has no task of", self._me, message.KIND.value)
        return rnd

    def _send(self, message: Message) -> None:
        self._publish(self._topics.checkin(self._me), encode(message, self._identity))
