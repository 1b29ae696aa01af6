"""One secure round as the coordinator sees it: a pure state machine, no I/O.

Stages, each fixing a set of devices (Bonawitz et al.'s U1..U3):

- ``KEYS``: the cohort advertises keys; fixing U1 draws the neighbourhoods;
- ``SHARES``: U1 sends encrypted shares; fixing U2 decides who masks with whom;
- ``MASKING``: U2 trains and sends masked updates to the workers;
- ``UNMASKING``: the sealed sum names U3; its devices reveal shares until
  every self-mask seed of U3, and every mask key of U2 minus U3 that a
  member of U3 masked against, can be rebuilt.

A stage that cannot go on (too few devices) raises ``Abandon`` with the
reason the round records.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from aggregator_service.config import SecureAggregationConfig
from aggregator_service.secagg.graph import degree_for, neighbourhoods, threshold_for
from aggregator_service.secagg.strategy import Unmasking
from broker.secagg import AgreementKey, SecAggError, agree, combine
from broker.secagg.messages import (
    SecAggDelivery,
    SecAggKeys,
    SecAggNeighbours,
    SecAggPeer,
    SecAggReveal,
    SecAggShares,
    SecAggUnmask,
)
from broker.secagg.protocol import mask_context, unb64
from broker.secagg.shamir import SHARE_BYTES


class Abandon(Exception):
    """The protocol cannot complete: the round is abandoned with this reason."""


class Stage(enum.Enum):
    """Where a secure round is (the device messages it is waiting for)."""

    KEYS = "keys"
    SHARES = "shares"
    MASKING = "masking"
    UNMASKING = "unmasking"


@dataclass
class SecureRound:
    """The protocol state of one round.

    Parameters
    ----------
    experiment_id, number
        The round.
    cohort
        The devices selected (tasked) for the round.
    seed
        The experiment's seed: with the round it fixes the neighbourhoods.
    settings
        The experiment's secure aggregation settings.
    min_reports
        The reports the round needs; fewer devices left at any stage abandon it.
    scale
        The round's fixed-point scale (its tasks carry it; the unmasking too).
    """

    experiment_id: str
    number: int
    cohort: frozenset[str]
    seed: int
    settings: SecureAggregationConfig
    min_reports: int
    scale: float
    stage: Stage = Stage.KEYS
    keys: dict[str, SecAggKeys] = field(default_factory=dict)
    shares: dict[str, SecAggShares] = field(default_factory=dict)
    reveals: dict[str, SecAggReveal] = field(default_factory=dict)
    u1: tuple[str, ...] = ()
    u2: tuple[str, ...] = ()
    u3: tuple[str, ...] = ()
    graph: dict[str, tuple[str, ...]] = field(default_factory=dict)
    degree: int = 0
    threshold: int = 0
    seed_shares: Counter[str] = field(default_factory=Counter)
    """Revealed shares of each device's self-mask seed, counted as they arrive."""
    key_shares: Counter[str] = field(default_factory=Counter)
    """Revealed shares of each device's mask key, counted as they arrive."""

    @property
    def needed(self) -> int:
        """Return how many devices must remain at every stage."""
        return max(self.min_reports, 3, self.threshold)

    # -- stage 1: keys --------------------------------------------------------------

    def add_keys(self, message: SecAggKeys) -> bool:
        """Take a cohort device's keys (first copy wins); return whether they are new."""
        if (
            self.stage is not Stage.KEYS
            or message.device_id not in self.cohort
            or message.device_id in self.keys
        ):
            return False
        unb64(message.cipher_key, size=32, what="cipher_key")
        unb64(message.mask_key, size=32, what="mask_key")
        self.keys[message.device_id] = message
        return True

    def keys_complete(self) -> bool:
        """Return whether every cohort device advertised its keys."""
        return len(self.keys) == len(self.cohort)

    def fix_u1(self, degree: int | None = None) -> dict[str, SecAggNeighbours]:
        """End stage 1: draw the neighbourhoods; return each U1 device's message.

        ``degree`` replays a recovered round's (the one its devices shared with).
        """
        self.u1 = tuple(sorted(self.keys))
        n = len(self.u1)
        settings = self.settings
        if degree is None:
            degree = settings.neighbours or degree_for(n, settings.dropout, settings.threshold)
        self.degree = min(degree, n - 1)
        self.graph = neighbourhoods(self.u1, self.degree, [self.seed, self.number])
        self.threshold = threshold_for(self.degree, self.settings.threshold)
        if n < self.needed:
            raise Abandon(
                f"secure aggregation: {n} device(s) advertised keys, {self.needed} needed"
            )
        self.stage = Stage.SHARES
        return {d: self._neighbours_of(d) for d in self.u1}

    def _neighbours_of(self, device: str) -> SecAggNeighbours:
        index = {d: i + 1 for i, d in enumerate(self.u1)}
        peers = {
            v: SecAggPeer(index[v], self.keys[v].cipher_key, self.keys[v].mask_key)
            for v in (device, *self.graph[device])
        }
        return SecAggNeighbours(
            experiment_id=self.experiment_id,
            round=self.number,
            threshold=self.threshold,
            peers=peers,
        )

    def neighbours_message(self, device: str) -> SecAggNeighbours:
        """Return the stage-2 message of a U1 device (for repeats)."""
        return self._neighbours_of(device)

    # -- stage 2: shares ------------------------------------------------------------

    def add_shares(self, message: SecAggShares) -> bool:
        """Take a U1 device's shares if they go to exactly its neighbourhood."""
        sender = message.device_id
        if self.stage is not Stage.SHARES or sender not in self.graph or sender in self.shares:
            return False
        if set(message.shares) != {sender, *self.graph[sender]}:
            raise SecAggError(f"{sender} sent shares for other devices than its neighbourhood")
        self.shares[sender] = message
        return True

    def shares_complete(self) -> bool:
        """Return whether every U1 device sent its shares."""
        return len(self.shares) == len(self.u1)

    def fix_u2(self) -> dict[str, SecAggDelivery]:
        """End stage 2: return each U2 device's delivery of the shares meant for it."""
        self.u2 = tuple(sorted(self.shares))
        if len(self.u2) < self.needed:
            raise Abandon(
                f"secure aggregation: {len(self.u2)} device(s) sent shares, {self.needed} needed"
            )
        self.stage = Stage.MASKING
        return {d: self.delivery_for(d) for d in self.u2}

    def delivery_for(self, device: str) -> SecAggDelivery:
        """Return the stage-3 message of a U2 device (for repeats)."""
        u2 = set(self.u2)
        senders = [v for v in (device, *self.graph[device]) if v in u2]
        return SecAggDelivery(
            experiment_id=self.experiment_id,
            round=self.number,
            shares={v: self.shares[v].shares[device] for v in senders},
        )

    # -- stage 3: unmasking ---------------------------------------------------------

    def fix_u3(self, devices: tuple[str, ...]) -> dict[str, SecAggUnmask]:
        """Take the sealed sum's devices; return each one's unmask request."""
        outside = sorted(set(devices) - set(self.u2))
        if outside:
            raise Abandon(
                f"secure aggregation: the sum holds devices that shared no keys: {outside[:5]}"
            )
        if len(devices) < self.needed:
            raise Abandon(
                f"secure aggregation: {len(devices)} masked update(s) in the sum, "
                f"{self.needed} needed"
            )
        summed = set(devices)
        for owner in self.u2:  # only devices in the sum reveal: enough of them near each secret?
            holders = summed.intersection((owner, *self.graph[owner]))
            needs_rebuild = owner in summed or any(v in summed for v in self.graph[owner])
            if needs_rebuild and len(holders) < self.threshold:
                raise Abandon(
                    f"secure aggregation: {owner}'s neighbourhood has {len(holders)} device(s) "
                    f"in the sum, {self.threshold} needed to unmask"
                )
        self.u3 = tuple(sorted(devices))
        self.stage = Stage.UNMASKING
        return {d: self.unmask_request(d) for d in self.u3}

    def unmask_request(self, device: str) -> SecAggUnmask:
        """Return what a U3 device is asked to reveal (for repeats)."""
        u2, u3 = set(self.u2), set(self.u3)
        peers = [v for v in (device, *self.graph[device]) if v in u2]
        return SecAggUnmask(
            experiment_id=self.experiment_id,
            round=self.number,
            survivors=tuple(v for v in peers if v in u3),
            dropped=tuple(v for v in peers if v not in u3),
        )

    def add_reveal(self, message: SecAggReveal) -> bool:
        """Take a U3 device's revealed shares (first copy wins); ``SecAggError`` if unasked."""
        sender = message.device_id
        if self.stage is not Stage.UNMASKING or sender not in self.u3 or sender in self.reveals:
            return False
        asked = self.unmask_request(sender)
        if not set(message.seed_shares) <= set(asked.survivors) or not set(
            message.key_shares
        ) <= set(asked.dropped):
            raise SecAggError(f"{sender} revealed shares it was not asked for")
        for text in (*message.seed_shares.values(), *message.key_shares.values()):
            unb64(text, size=SHARE_BYTES, what="share")  # refused here, not when unmasking
        self.reveals[sender] = message
        self.seed_shares.update(message.seed_shares.keys())
        self.key_shares.update(message.key_shares.keys())
        return True

    def unmasking(self) -> Unmasking | None:
        """Return the seeds that unmask the sum, or None while some secret lacks shares."""
        u3 = set(self.u3)
        dropped_keys = [d for d in self.u2 if d not in u3 and any(u in u3 for u in self.graph[d])]
        t = self.threshold
        if any(self.seed_shares[d] < t for d in self.u3) or any(
            self.key_shares[d] < t for d in dropped_keys
        ):
            return None  # cheap, and asked after every reveal
        index = {d: i + 1 for i, d in enumerate(self.u1)}
        seeds = {d: combine(self._shares_of(d, index, seed=True), t) for d in self.u3}
        pairs: list[tuple[str, str, bytes]] = []
        for dropped in dropped_keys:
            summed = [u for u in self.graph[dropped] if u in u3]
            shares = self._shares_of(dropped, index, seed=False)
            key = AgreementKey.from_private_bytes(combine(shares, self.threshold))
            if key.public_bytes() != unb64(self.keys[dropped].mask_key, size=32):
                raise Abandon(f"secure aggregation: {dropped}'s mask key does not rebuild")
            context = mask_context(self.experiment_id, self.number)
            for survivor in summed:
                peer = unb64(self.keys[survivor].mask_key, size=32)
                pairs.append((survivor, dropped, agree(key, peer, context=context)))
        return Unmasking(seeds, tuple(pairs), self.scale)

    def _shares_of(self, owner: str, index: Mapping[str, int], *, seed: bool) -> dict[int, bytes]:
        """Return the revealed shares of ``owner``'s seed (or mask key), by x-coordinate."""
        out: dict[int, bytes] = {}
        for holder in (owner, *self.graph[owner]):  # only its neighbourhood holds shares
            reveal = self.reveals.get(holder)
            if reveal is None:
                continue
            shares = reveal.seed_shares if seed else reveal.key_shares
            text = shares.get(owner)
            if text is not None:
                out[index[holder]] = unb64(text, size=SHARE_BYTES, what="share")
        return out

    def missing(self) -> str:
        """Return which stage's devices are still awaited, for an abandoned round's reason."""
        if self.stage is Stage.UNMASKING:
            return f"{len(self.reveals)} of {len(self.u3)} device(s) revealed shares"
        return f"stage {self.stage.value}"
