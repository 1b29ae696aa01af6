"""The stages of secure aggregation as typed messages (docs/mobile-protocol.md, section 11).

A secure round (SecAgg+, Bell et al. 2020) runs beside training:

1. ``SecAggKeys``: each device of the cohort advertises two X25519 public
   keys as soon as its task arrives (device -> coordinator);
2. ``SecAggNeighbours``: once the keys are in (or the stage times out) the
   coordinator gives each device its neighbours' keys and the threshold;
3. ``SecAggShares``: each device Shamir-shares its self-mask seed and its
   mask key among its neighbours, each share encrypted for its recipient;
4. ``SecAggDelivery``: the coordinator hands each device the shares meant
   for it; who sent them is who the device masks against. The device then
   sends its update masked (an ordinary ``model_update`` of uint32 tensors);
5. ``SecAggUnmask`` / ``SecAggReveal``: once the sum is sealed, each device
   in it reveals, for each neighbour, the share of its self-mask seed (if the
   neighbour's update is in the sum) or of its mask key (if it is not) --
   never both for one neighbour.

Every message is signed by its sender like every other frame; a device
sends on its own check-in topic and receives on its own device topic, so
the broker's ACLs need no new rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from broker.messages import WIRE, Message, MessageKind

_SEGMENT: Mapping[str, Any] = {WIRE: {"$ref": "segment"}}
_MESSAGE_ID: Mapping[str, Any] = {WIRE: {"$ref": "message_id"}}
_ROUND: Mapping[str, Any] = {WIRE: {"minimum": 1}}
_KEY: Mapping[str, Any] = {WIRE: {"$ref": "public_key"}}
_BY_DEVICE: Mapping[str, Any] = {WIRE: {"keys": {"$ref": "segment"}}}


@dataclass(frozen=True)
class SecAggPeer:
    """One neighbour in a device's neighbourhood: its keys and its Shamir x-coordinate."""

    index: int = field(metadata={WIRE: {"minimum": 1}})
    """The x-coordinate at which shares for this device are evaluated."""
    cipher_key: str = field(metadata=_KEY)
    """X25519 public key (base64 of 32 raw bytes) the shares for this device are encrypted to."""
    mask_key: str = field(metadata=_KEY)
    """X25519 public key (base64 of 32 raw bytes) the pairwise masks are agreed with."""


@dataclass(frozen=True, kw_only=True)
class SecAggKeys(Message):
    """Stage 1, device to coordinator: this device's two public keys for the round.

    Sent once, as soon as the task arrives (training goes on meanwhile), on
    the device's check-in topic. A repeated task gets the same keys again.
    """

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_KEYS
    experiment_id: str = field(metadata=_SEGMENT)
    """The task's experiment_id."""
    round: int = field(metadata=_ROUND)
    """The task's round."""
    device_id: str = field(metadata=_SEGMENT)
    """This device's id (the sender)."""
    task_id: str = field(metadata=_MESSAGE_ID)
    """The message_id of the train_task this answers."""
    cipher_key: str = field(metadata=_KEY)
    """X25519 public key (base64) neighbours encrypt their shares for this device with."""
    mask_key: str = field(metadata=_KEY)
    """X25519 public key (base64) neighbours agree pairwise masks with."""


@dataclass(frozen=True, kw_only=True)
class SecAggNeighbours(Message):
    """Stage 2, coordinator to device: your neighbourhood (yourself included) and the threshold."""

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_NEIGHBOURS
    experiment_id: str = field(metadata=_SEGMENT)
    """The round's experiment."""
    round: int = field(metadata=_ROUND)
    """The round."""
    threshold: int = field(metadata={WIRE: {"minimum": 2}})
    """How many shares reconstruct a secret: share with this threshold."""
    peers: Mapping[str, SecAggPeer] = field(metadata=_BY_DEVICE)
    """Device id -> its keys and x-coordinate, for every neighbour and for this device.

    A device refuses the message if its own entry does not hold the keys it
    advertised.
    """


@dataclass(frozen=True, kw_only=True)
class SecAggShares(Message):
    """Stage 3, device to coordinator: shares of this device's secrets, one per neighbour.

    For each peer ``v`` (itself included), the AES-256-GCM encryption, under
    the key agreed with ``v``'s cipher key, of the share of its self-mask seed
    followed by the share of its mask key (66 bytes each).
    """

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_SHARES
    experiment_id: str = field(metadata=_SEGMENT)
    """The round's experiment."""
    round: int = field(metadata=_ROUND)
    """The round."""
    device_id: str = field(metadata=_SEGMENT)
    """This device's id (the sender)."""
    shares: Mapping[str, str] = field(metadata=_BY_DEVICE)
    """Recipient device id -> base64 of nonce | ciphertext | tag."""


@dataclass(frozen=True, kw_only=True)
class SecAggDelivery(Message):
    """Stage 4, coordinator to device: the shares your neighbours sent you.

    Its keys are the neighbours that completed stage 3: the device masks its
    update against exactly those (pairwise) and with its own seed, then sends it.
    """

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_DELIVERY
    experiment_id: str = field(metadata=_SEGMENT)
    """The round's experiment."""
    round: int = field(metadata=_ROUND)
    """The round."""
    shares: Mapping[str, str] = field(metadata=_BY_DEVICE)
    """Sender device id -> the ciphertext it sent for this device (as in secagg_shares)."""


@dataclass(frozen=True, kw_only=True)
class SecAggUnmask(Message):
    """Stage 5, coordinator to a device in the sum: reveal shares so the masks come off.

    A device answers once per round, and refuses a request naming a device in
    both lists or one that did not deliver it a share.
    """

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_UNMASK
    experiment_id: str = field(metadata=_SEGMENT)
    """The round's experiment."""
    round: int = field(metadata=_ROUND)
    """The round."""
    survivors: tuple[str, ...] = ()
    """Neighbours whose masked update is in the sum: reveal their self-mask seed shares."""
    dropped: tuple[str, ...] = ()
    """Neighbours whose update is not in the sum: reveal their mask-key shares."""


@dataclass(frozen=True, kw_only=True)
class SecAggReveal(Message):
    """Stage 5, device to coordinator: the shares an unmask request asked for."""

    KIND: ClassVar[MessageKind] = MessageKind.SECAGG_REVEAL
    experiment_id: str = field(metadata=_SEGMENT)
    """The round's experiment."""
    round: int = field(metadata=_ROUND)
    """The round."""
    device_id: str = field(metadata=_SEGMENT)
    """This device's id (the sender)."""
    seed_shares: Mapping[str, str] = field(default_factory=dict, metadata=_BY_DEVICE)
    """Survivor id -> base64 of the 66-byte share of its self-mask seed."""
    key_shares: Mapping[str, str] = field(default_factory=dict, metadata=_BY_DEVICE)
    """Dropped device id -> base64 of the 66-byte share of its mask key."""


@dataclass(frozen=True, kw_only=True)
class RoundMasked(Message):
    """Worker to coordinator: a secure round is sealed; its sum holds these devices' updates."""

    KIND: ClassVar[MessageKind] = MessageKind.ROUND_MASKED
    experiment_id: str
    round: int
    devices: tuple[str, ...]
    reported: int = 0


DEVICE_SENDS = (SecAggKeys, SecAggShares, SecAggReveal)
"""The stages' messages a device sends (on its check-in topic)."""
SERVICE_SENDS = (SecAggNeighbours, SecAggDelivery, SecAggUnmask)
"""The stages' messages the coordinator sends a device (on its device topic)."""

SECAGG_MESSAGE_TYPES: Mapping[MessageKind, type[Message]] = {
    cls.KIND: cls for cls in (*DEVICE_SENDS, *SERVICE_SENDS, RoundMasked)
}
