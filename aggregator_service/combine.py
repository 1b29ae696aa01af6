"""Combining a closed round: seal it, merge every worker's partial, commit or abandon.

Any worker may be asked (through the combiners' shared queue) and the whole
step may be repeated: the seal is idempotent, a version already in the store
is reported rather than computed again, and the ledgers are read back from
the sealed checkpoints, so a combiner that dies midway is simply replaced.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aggregator_service.checkpoints import AsideUpdate, Checkpoints, RoundCheckpoint
from aggregator_service.secagg.strategy import SecureSum, Unmasking
from aggregator_service.strategies import Strategy, merge_state
from aggregator_service.types import Weights
from aggregator_service.validation import Rejected, check_finite
from aggregator_service.versions import stored_ref, write_version
from broker import CombineRound, RoundAbandoned, RoundCommitted, StrategySpec, decode_weights
from broker.secagg.messages import RoundMasked
from model_store import ModelStore

log = logging.getLogger(__name__)

Outcome = RoundCommitted | RoundAbandoned
Answer = Outcome | RoundMasked
"""What a combine request gets: an outcome, or (a secure round's first) its sum's devices."""
StrategyFor = Callable[[str, StrategySpec, int], Strategy]
"""Returns an experiment's strategy with its server state at a base version."""
OwnShare = Callable[[str, int, int], RoundCheckpoint | None]
"""Returns this worker's own checkpoint ``(experiment, round, sequence)`` if still in memory."""


@dataclass
class Ledger:
    """What the partials of a round say about its reports, added up."""

    accepted: list[str] = field(default_factory=list)
    accepted_devices: set[str] = field(default_factory=set)
    rejected: Counter[str] = field(default_factory=Counter)
    reporters: set[str] = field(default_factory=set)
    examples: int = 0
    loss_sum: float = 0.0
    aside: set[str] = field(default_factory=set)
    """Ids of updates set aside by some worker (merged only if no share counted them)."""
    twice: set[str] = field(default_factory=set)
    """Update ids that two workers' shares both hold."""
    devices_twice: set[str] = field(default_factory=set)
    """Devices with an update (each its own id) in two workers' shares."""

    def add(self, share: RoundCheckpoint) -> None:
        """Add one worker's ledger, noting anything another share already holds."""
        self.twice.update(set(share.accepted).intersection(self.accepted))
        self.devices_twice.update(self.accepted_devices.intersection(share.accepted_devices))
        self.accepted.extend(share.accepted)
        self.accepted_devices.update(share.accepted_devices)
        self.rejected.update(share.rejected)
        self.reporters.update(share.reporters)
        self.examples += share.examples
        self.loss_sum += share.loss_sum
        self.aside.update(share.aside)

    def add_aside(self, aside: AsideUpdate) -> None:
        """Count an update set aside that no share counted."""
        if aside.device in self.accepted_devices:
            self.devices_twice.add(aside.device)
        self.accepted.append(aside.update_id)
        self.accepted_devices.add(aside.device)
        self.reporters.add(aside.device)
        self.examples += aside.examples
        self.loss_sum += aside.loss_sum

    @property
    def metrics(self) -> dict[str, float]:
        """Return the example-weighted mean training loss, if any example was reported."""
        if not self.examples or not math.isfinite(self.loss_sum):  # shares' sums may overflow
            return {}
        return {"train_loss": self.loss_sum / self.examples}


class Combiner:
    """Turns a sealed round's partials into its outcome.

    Parameters
    ----------
    store
        The model store: checkpoints in, the new version out.
    name
        This worker's name (its own checkpoints may still be in memory).
    strategy_for
        Returns the experiment's strategy at the round's base version.
    own_share
        Returns this worker's own last checkpoint without reading it back.
    """

    def __init__(
        self, store: ModelStore, *, name: str, strategy_for: StrategyFor, own_share: OwnShare
    ) -> None:
        self._store = store
        self._checkpoints = Checkpoints(store)
        self._name = name
        self._strategy_for = strategy_for
        self._own_share = own_share

    def combine(self, request: CombineRound) -> tuple[Answer, Strategy | None]:
        """Seal the round, merge its partials and commit (or abandon) it.

        Returns the outcome, and the strategy if this call advanced its server
        state to the new version (None: it did not, so any cached copy is stale).
        A secure round's first request (no ``unmask``) is answered with the
        devices its sealed sum holds instead: the coordinator gathers the
        seeds for exactly those and asks again.
        """
        exp, number = request.experiment_id, request.round
        last = self._checkpoints.seal(exp, number)
        strategy = self._strategy_for(exp, request.strategy, request.base_version)
        current = decode_weights(self._store.get_blob(request.model.sha256))
        state = strategy.begin(number, current)
        ledger = Ledger()
        for worker, sequence in sorted(last.items()):
            if sequence < 0:
                continue
            share = self._share(exp, number, worker, sequence)
            merge_state(state, share.partial)
            ledger.add(share)
        merged = sorted(worker for worker, sequence in last.items() if sequence >= 0)
        log.info("%s round %d: merged %d partial(s): %s", exp, number, len(merged), merged)
        self._merge_aside(exp, number, state, ledger)
        reason = None
        if ledger.devices_twice and not ledger.twice:
            # Two signed updates of one device, each to another worker: what a
            # compromised device can do (its weight counts twice, within its grant).
            log.warning(
                "%s round %d: devices counted by two workers: %s",
                exp,
                number,
                sorted(ledger.devices_twice)[:5],
            )
        if ledger.twice:
            # Two workers folded one update that came as two broker messages (a
            # publisher's resend after a reconnect); a redelivered copy is set aside
            # instead. Sums cannot be taken apart, and a double count is never
            # committed: the round is run again instead.
            reason = f"update(s) counted by two workers: {sorted(ledger.twice)[:5]}"
            log.warning("%s round %d abandoned: %s", exp, number, reason)
        elif len(ledger.accepted) < max(request.min_reports, 1):
            # "valid", not "accepted": an abandoned round's record accepts nothing.
            valid = len(ledger.accepted)
            reason = f"only {valid} valid update(s), {request.min_reports} needed"
        elif isinstance(strategy, SecureSum) and ledger.devices_twice:
            # A device's masks would be in the sum twice: it cannot be unmasked.
            reason = f"devices summed twice: {sorted(ledger.devices_twice)[:5]}"
        elif isinstance(strategy, SecureSum) and request.unmask is None:
            masked = RoundMasked(
                experiment_id=exp,
                round=number,
                devices=tuple(sorted(ledger.accepted_devices)),
                reported=len(ledger.reporters),
            )
            return masked, None
        else:
            try:
                if isinstance(strategy, SecureSum):
                    state = self._unmask(request, strategy, current, state, ledger)
                committed, advanced = self._commit(request, strategy, current, state, ledger)
                return committed, strategy if advanced else None
            except ValueError as exc:  # the rule cannot aggregate these (Krum with n <= 2f+2)
                reason = f"{strategy.name} could not aggregate: {exc}"
            except Rejected as exc:  # the aggregate itself is not finite: never written
                reason = f"the aggregate is not finite: {exc.detail}"
        abandoned = RoundAbandoned(
            experiment_id=exp,
            round=number,
            reason=reason,
            reported=len(ledger.reporters),
            accepted=len(ledger.accepted),
            rejected=dict(ledger.rejected),
        )
        return abandoned, None

    def _unmask(
        self,
        request: CombineRound,
        strategy: SecureSum,
        current: Weights,
        state: Any,
        ledger: Ledger,
    ) -> Any:
        """Return the merged sum with its masks removed (the seeds are in the store).

        ``ValueError`` (the round is abandoned) when the unmasking is for other
        devices than the sum holds: its seeds would leave noise, not a model.
        """
        assert request.unmask is not None
        unmasking = Unmasking.from_json(self._store.get_blob(request.unmask.sha256))
        if set(unmasking.seeds) != set(ledger.accepted_devices):
            extra = sorted(set(unmasking.seeds) ^ set(ledger.accepted_devices))
            raise ValueError(f"the unmasking does not match the sum's devices: {extra[:5]}")
        return strategy.unmask(current, state, unmasking)

    def _merge_aside(self, exp: str, number: int, state: Any, ledger: Ledger) -> None:
        """Merge each update set aside that no sealed share counted, once."""
        counted = set(ledger.accepted)
        kept = 0
        for update_id in sorted(ledger.aside - counted):
            aside = self._checkpoints.read_aside(exp, number, update_id)
            # A buffered step folds earlier steps' updates: their sealed shares count too.
            if any(
                update_id in self._checkpoints.counted_by_others(exp, earlier)
                for earlier in range(aside.round, number)
            ):
                continue
            merge_state(state, aside.partial)
            ledger.add_aside(aside)
            kept += 1
        if ledger.aside:
            log.info(
                "%s round %d: %d update(s) set aside, %d merged (the rest counted in a share)",
                exp,
                number,
                len(ledger.aside),
                kept,
            )

    def _share(self, exp: str, number: int, worker: str, sequence: int) -> RoundCheckpoint:
        """Return one worker's sealed checkpoint, from memory when it is this worker's."""
        if worker == self._name:
            mine = self._own_share(exp, number, sequence)
            if mine is not None:
                return mine
        return self._checkpoints.read(exp, number, worker, sequence)

    def _commit(
        self,
        request: CombineRound,
        strategy: Strategy,
        current: Weights,
        state: Any,
        ledger: Ledger,
    ) -> tuple[RoundCommitted, bool]:
        """Write the merged aggregate as the next version (or find it written); describe it."""
        exp, version = request.experiment_id, request.base_version + 1
        advanced = False
        if (self._store.latest_version(exp) or 0) >= version:
            # Combined before by a worker that died before its outcome was heard:
            # report that version; finishing again would advance the server state twice.
            ref = stored_ref(self._store, exp, version)
            strategy = self._strategy_for(exp, request.strategy, version)
        else:
            new = strategy.finish(request.round, current, state)
            advanced = True
            assert new is not None, "a round with accepted updates always aggregates"
            check_finite(new)
            ref = write_version(
                self._store, exp, request.base_version, version, new, strategy.state_dict()
            )
        committed = RoundCommitted(
            experiment_id=exp,
            round=request.round,
            version=version,
            model=ref,
            reported=len(ledger.reporters),
            accepted=tuple(ledger.accepted),
            accepted_devices=tuple(sorted(ledger.accepted_devices)),
            rejected=dict(ledger.rejected),
            num_examples=ledger.examples,
            metrics={**ledger.metrics, **strategy.round_metrics()},
        )
        return committed, advanced
