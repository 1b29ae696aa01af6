"""The coordinator's side of secure aggregation: drive each secure round's stages.

Every device message of a stage is written to the database before it is
acknowledged, and each fixed set (U1, U2, U3) before the next stage's
messages go out, so a restarted coordinator rebuilds the round from the
database (``recover``) and carries on; devices answer a repeated request
with what they sent before. Each stage waits for its devices at most the
experiment's ``stage_timeout_s``; what is asked and not answered is asked
again every ``REPEAT_S``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from aggregator_service.config import ExperimentConfig
from aggregator_service.persistence import Database
from aggregator_service.secagg.state import Abandon, SecureRound, Stage
from broker import Message, ModelRef, RoundOpened, decode
from broker.messages import SecAggSettings
from broker.secagg import SecAggError, scale_for
from broker.secagg.messages import RoundMasked, SecAggKeys, SecAggReveal, SecAggShares
from broker.topics import Topics
from model_store import ModelStore

log = logging.getLogger(__name__)

DeviceStage = SecAggKeys | SecAggShares | SecAggReveal
Publish = Callable[[str, Message], None]
Combine = Callable[[str, int, ModelRef], None]
"""Asks the combiner to commit a round with the unmasking at this reference."""
Abandoned = Callable[[str, int, str], None]
"""Ends a round as abandoned, with the reason."""
Narrow = Callable[[str, int, frozenset[str]], None]
"""Tells the round's closing which devices can still send an update."""


@dataclass
class _Live:
    round: SecureRound
    started: float
    """When the current stage began (a recovered round's: when it was recovered)."""
    asked: float = 0.0
    """When the current stage's messages were last sent."""
    unmasked: bool = False
    """The unmasking is in the store and the combiner asked: nothing more to wait for."""
    caps: dict[str, int] = field(default_factory=dict)
    """Each device's example cap, which the round's scale was sized for."""


class SecureRounds:
    """Runs the protocol of every secure round in flight (call under the service's lock)."""

    REPEAT_S = 5.0

    def __init__(
        self,
        db: Database,
        store: ModelStore,
        *,
        publish: Publish,
        topics: Topics,
        combine: Combine,
        abandon: Abandoned,
        narrow: Narrow,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._store = store
        self._publish = publish
        self._topics = topics
        self._combine = combine
        self._abandon = abandon
        self._narrow = narrow
        self._clock = clock
        self._rounds: dict[tuple[str, int], _Live] = {}

    def begin(
        self, opened: RoundOpened, config: ExperimentConfig, caps: Mapping[str, int]
    ) -> SecAggSettings:
        """Start a secure round's key stage; return the settings its tasks carry.

        ``caps`` is the most examples each selected device may weight its
        update by: the round's fixed-point scale is the largest at which
        their sum, at the clip, still fits 32 bits.
        """
        secure = config.secure_aggregation
        assert secure is not None
        scale = scale_for(secure.clip, max(sum(caps.values()), 1))
        live = self._track(opened, config, scale)
        live.caps = dict(caps)
        self._save(live)
        return SecAggSettings(secure.clip, scale, secure.max_examples)

    def caps(self, experiment_id: str, number: int) -> Mapping[str, int]:
        """Return each device's example cap in a secure round (what its scale was sized for)."""
        live = self._rounds.get((experiment_id, number))
        return {} if live is None else live.caps

    def settings(self, experiment_id: str, number: int) -> SecAggSettings | None:
        """Return the settings a secure round's tasks carry (None: not a secure round)."""
        live = self._rounds.get((experiment_id, number))
        if live is None:
            return None
        rnd = live.round
        return SecAggSettings(rnd.settings.clip, rnd.scale, rnd.settings.max_examples)

    def _track(self, opened: RoundOpened, config: ExperimentConfig, scale: float) -> _Live:
        """Hold a new round in memory at its key stage (nothing written)."""
        secure = config.secure_aggregation
        assert secure is not None
        rnd = SecureRound(
            opened.experiment_id,
            opened.round,
            frozenset(opened.selected),
            config.seed,
            secure,
            opened.min_reports,
            scale,
        )
        live = _Live(rnd, self._clock())
        self._rounds[(opened.experiment_id, opened.round)] = live
        return live

    def recover(self, opened: RoundOpened, config: ExperimentConfig) -> None:
        """Rebuild a secure round from the database after a restart, and ask again."""
        saved = self._db.secagg_round(opened.experiment_id, opened.round)
        if saved is None:  # the crash came before the round's state was written
            live = self._track(opened, config, 1.0)
            self._end(live, "secure aggregation state lost: the round's state was never saved")
            return
        live = self._track(opened, config, float(saved["scale"]))
        live.caps = {str(d): int(c) for d, c in saved.get("caps", {}).items()}
        rnd = live.round
        frames = [decode(f) for f in self._db.secagg_frames(opened.experiment_id, opened.round)]
        for message in frames:
            if isinstance(message, SecAggKeys):
                rnd.add_keys(message)
        stage = Stage(saved.get("stage", Stage.KEYS.value))
        try:
            if stage is not Stage.KEYS:
                rnd.keys = {d: rnd.keys[d] for d in saved["u1"]}
                rnd.fix_u1(saved["degree"])
                if rnd.threshold != saved["threshold"]:
                    raise Abandon(
                        f"threshold {rnd.threshold} is not the saved {saved['threshold']}"
                    )
                for message in frames:
                    if isinstance(message, SecAggShares):
                        rnd.add_shares(message)
            if stage in (Stage.MASKING, Stage.UNMASKING):
                rnd.shares = {d: rnd.shares[d] for d in saved["u2"]}
                rnd.fix_u2()
                self._narrow(rnd.experiment_id, rnd.number, frozenset(rnd.u2))
            if stage is Stage.UNMASKING:
                rnd.fix_u3(tuple(saved["u3"]))
                for message in frames:
                    if isinstance(message, SecAggReveal):
                        rnd.add_reveal(message)
        except (Abandon, KeyError, SecAggError) as exc:  # it was viable when saved
            log.exception("cannot rebuild secure round %s/%d", opened.experiment_id, opened.round)
            self._end(live, f"secure aggregation state lost: {exc}")
            return
        log.info(
            "recovered secure round %s/%d at stage %s", rnd.experiment_id, rnd.number, stage.value
        )
        self._ask(live, recovered=True)
        # The stage may have been complete when the crash cut it short: every
        # key, share or reveal in, the next step not taken. Repeats add nothing.
        self._advance(live, timed_out=False)

    def received(self, message: DeviceStage, frame: bytes) -> None:
        """Take a device's stage message (verified): keep it, then advance the round."""
        live = self._rounds.get((message.experiment_id, message.round))
        if live is None:
            return
        rnd = live.round
        try:
            if isinstance(message, SecAggKeys):
                new = rnd.add_keys(message)
            elif isinstance(message, SecAggShares):
                new = rnd.add_shares(message)
            else:
                new = rnd.add_reveal(message)
        except SecAggError as exc:
            log.warning("%s: refused %s: %s", message.device_id, message.KIND.value, exc)
            return
        if not new:
            return
        self._db.add_secagg_frame(
            rnd.experiment_id, rnd.number, message.device_id, message.KIND.value, frame
        )
        self._advance(live, timed_out=False)

    def masked(self, event: RoundMasked) -> None:
        """Start unmasking once the workers' sealed sum names its devices."""
        live = self._rounds.get((event.experiment_id, event.round))
        if live is None:
            return
        rnd = live.round
        if rnd.stage is Stage.UNMASKING:
            self._advance(live, timed_out=False)  # a repeated request: carry on
            return
        if rnd.stage is not Stage.MASKING:
            self._end(live, f"secure aggregation: the round closed at stage {rnd.stage.value}")
            return
        try:
            requests = rnd.fix_u3(event.devices)
        except Abandon as exc:
            self._end(live, str(exc))
            return
        self._save(live)
        self._start_stage(live)
        self._send(requests)

    def tick(self) -> None:
        """End stages whose time is up; ask again what is still unanswered."""
        now = self._clock()
        for live in list(self._rounds.values()):
            timeout = live.round.settings.stage_timeout_s
            if live.unmasked or live.round.stage is Stage.MASKING:
                continue  # the workers' deadline, or the combiner, has the round now
            if now - live.started >= timeout:
                self._advance(live, timed_out=True)
            elif now - live.asked >= self.REPEAT_S:
                self._ask(live)

    def ended(self, experiment_id: str, number: int) -> None:
        """Forget a round that ended, and its kept messages."""
        if self._rounds.pop((experiment_id, number), None) is not None:
            self._db.forget_secagg_round(experiment_id, number)

    # -- stages -------------------------------------------------------------------

    def _advance(self, live: _Live, *, timed_out: bool) -> None:
        """Move the round on if its stage is complete (or its time is up)."""
        rnd = live.round
        try:
            if rnd.stage is Stage.KEYS and (timed_out or rnd.keys_complete()):
                messages: Mapping[str, Message] = rnd.fix_u1()
            elif rnd.stage is Stage.SHARES and (timed_out or rnd.shares_complete()):
                messages = rnd.fix_u2()
                self._narrow(rnd.experiment_id, rnd.number, frozenset(rnd.u2))
            elif rnd.stage is Stage.UNMASKING:
                self._try_unmask(live, timed_out)
                return
            else:
                return
        except Abandon as exc:
            self._end(live, str(exc))
            return
        self._save(live)  # before the messages: a restart resumes the stage they start
        self._start_stage(live)
        self._send(messages)

    def _try_unmask(self, live: _Live, timed_out: bool) -> None:
        rnd = live.round
        if live.unmasked:
            return
        try:
            unmasking = rnd.unmasking()
        except (Abandon, SecAggError) as exc:
            self._end(live, f"secure aggregation: {exc}")
            return
        if unmasking is None:
            if timed_out:
                self._end(live, f"secure aggregation: too few shares to unmask; {rnd.missing()}")
            return
        data = unmasking.to_json()
        sha256 = self._store.put_blob(data)
        live.unmasked = True
        log.info(
            "%s round %d: unmasking ready (%d seeds, %d pair seeds)",
            rnd.experiment_id,
            rnd.number,
            len(unmasking.seeds),
            len(unmasking.pairs),
        )
        ref = ModelRef(self._store.blob_url(sha256), sha256, len(data), "json")
        self._combine(rnd.experiment_id, rnd.number, ref)

    def _start_stage(self, live: _Live) -> None:
        live.started = live.asked = self._clock()

    def _ask(self, live: _Live, *, recovered: bool = False) -> None:
        """Send the current stage's message again to each device that has not answered."""
        rnd = live.round
        live.asked = self._clock()
        if rnd.stage is Stage.SHARES:
            self._send({d: rnd.neighbours_message(d) for d in rnd.u1 if d not in rnd.shares})
        elif rnd.stage is Stage.MASKING and recovered:
            # The crash may have cut the deliveries short; a device that already
            # sent its masked update ignores a repeat. Only the workers know who
            # did, so it is sent once, not every REPEAT_S.
            self._send({d: rnd.delivery_for(d) for d in rnd.u2})
        elif rnd.stage is Stage.UNMASKING and not live.unmasked:
            self._send({d: rnd.unmask_request(d) for d in rnd.u3 if d not in rnd.reveals})

    def _send(self, messages: Mapping[str, Message]) -> None:
        for device, message in messages.items():
            self._publish(self._topics.device(device), message)

    def _save(self, live: _Live) -> None:
        rnd = live.round
        state = {
            "scale": rnd.scale,
            "caps": live.caps,
            "stage": rnd.stage.value,
            "u1": list(rnd.u1),
            "u2": list(rnd.u2),
            "u3": list(rnd.u3),
            "degree": rnd.degree,
            "threshold": rnd.threshold,
        }
        self._db.save_secagg_round(rnd.experiment_id, rnd.number, state)

    def _end(self, live: _Live, reason: str) -> None:
        rnd = live.round
        log.warning("%s round %d abandoned: %s", rnd.experiment_id, rnd.number, reason)
        self._abandon(rnd.experiment_id, rnd.number, reason)
