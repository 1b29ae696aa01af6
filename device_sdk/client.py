"""The device client: check in, take a task, fetch what it lacks, train, push the update."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from broker import (
    BrokerError,
    CheckIn,
    CheckOut,
    ComeBackLater,
    Delivery,
    FetchError,
    MessageKind,
    ModelRef,
    ModelUpdate,
    TrainTask,
    Transport,
    UpdateRejected,
    decode_weights,
    encode,
    encode_weights,
)
from broker.errors import IdentityError, Refused
from broker.identity import SERVICE_NAME, Identity, KeyRing, decode_public_key
from broker.secagg import SecAggError
from broker.secagg.messages import SecAggDelivery, SecAggNeighbours, SecAggUnmask
from broker.topics import Topics
from broker.verify import Refusal, Refusals, Verifier
from device_sdk.answered import AnsweredTasks
from device_sdk.app import DeviceApp, DeviceContext
from device_sdk.errors import DeviceError, TaskError
from device_sdk.fetch import ArtifactFetcher, upload
from device_sdk.scheduler import Scheduler
from device_sdk.secagg import SecureParticipant, Vanish

log = logging.getLogger(__name__)

SecureStage = SecAggNeighbours | SecAggDelivery | SecAggUnmask
"""The secure aggregation requests a device answers."""


@dataclass
class DeviceStats:
    """What happened to this device so far (for tests, logs and the fleet's summary)."""

    tasks: int = 0
    updates_sent: int = 0
    failures: int = 0
    uploads: int = 0
    abandoned: int = 0
    """Tasks that ended unanswered (the device went offline mid-task)."""
    rejections: list[UpdateRejected] = field(default_factory=list)
    come_back_after_s: float | None = None
    refused: Counter[str] = field(default_factory=Counter)
    """Frames on this device's topic it did not believe, by reason (forged tasks, ...)."""


class DeviceClient:
    """One device on the bus, running a ``DeviceApp``'s training handler.

    Parameters
    ----------
    app
        The application whose ``on_train`` handler trains.
    transport
        The bus to the coordinator.
    identity
        This device's registered identity: its id (letters, digits, ``-`` and
        ``_``) and the private key it signs with.
    fetcher
        Fetches task artifacts by reference (share one across a fleet).
    service_key
        The service's public key, pinned at registration: tasks must carry its signature.
    topics
        The deployment's topics (its namespace).
    platform
        Reported at check-in (``python``, ``android``, ``ios``, ``emulated``).
    experiment_id
        Join only this experiment (default: any).
    examples
        How many training examples the device holds, declared at check-in: the
        service lets no update of this device claim more.
    scheduler
        Runs the check-in a ``ComeBackLater`` asks for when it is due (share one
        across a fleet); default: one of the device's own, whose thread starts
        with the first such message and ends at ``close()``.
    vanish
        For an emulated device: the secure aggregation stage at which it drops
        out (``device_sdk.secagg.Vanish``); None takes part to the end.
    """

    TASK_MAX_AGE_S = 600.0
    """A task signed longer ago than this is a replay."""

    def __init__(
        self,
        app: DeviceApp,
        transport: Transport,
        identity: Identity,
        fetcher: ArtifactFetcher,
        *,
        service_key: bytes,
        topics: Topics | None = None,
        platform: str = "python",
        experiment_id: str | None = None,
        run: Callable[[Callable[[], None]], None] | None = None,
        examples: int | None = None,
        scheduler: Scheduler | None = None,
        vanish: Vanish | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        self._topics = topics or Topics()
        self._topics.device(identity.name)  # refuses an id that cannot be a topic segment
        if app.train_handler is None:
            raise TaskError("the device app has no @on_train handler")
        self.device_id = identity.name
        self.stats = DeviceStats()
        self._identity = identity
        self._examples = examples
        self._started_at = time.time()  # a restart changes it: the coordinator resends a task
        self.heartbeat_s = heartbeat_s
        """How often this device checks in while online, told to the coordinator with each
        check-in: it takes a device silent for three intervals for gone (None: no promise).
        Whoever calls ``check_in`` that often sets it (a fleet, before ``start``)."""
        self._service = Verifier(
            KeyRing({SERVICE_NAME: service_key}),
            kinds=(
                MessageKind.TRAIN_TASK,
                MessageKind.COME_BACK_LATER,
                MessageKind.SECAGG_NEIGHBOURS,
                MessageKind.SECAGG_DELIVERY,
                MessageKind.SECAGG_UNMASK,
            ),
            max_age_s=self.TASK_MAX_AGE_S,
        )
        self._refusals = Refusals(f"device {self.device_id}", self.stats.refused)
        self._workers: dict[str, bytes] = {}  # aggregator keys the latest task vouched for
        self._rejections = Verifier(
            self._workers.get, kinds=(MessageKind.UPDATE_REJECTED,), max_age_s=None
        )
        self._app = app
        self._transport = transport
        self._fetcher = fetcher
        self._platform = platform
        self._experiment_id = experiment_id
        # Where training runs: inline by default; a fleet on a real broker passes
        # an executor so long training never blocks the connection's thread.
        self._run = run or (lambda job: job())
        self._own_scheduler = scheduler is None
        self._scheduler = scheduler or Scheduler(f"fedmq-come-back-{self.device_id}")
        self._present = True
        """False from ``stop()`` until ``rejoin()``: a device that left stays quiet."""
        self._presence = threading.Lock()
        self._secure = SecureParticipant(
            identity, transport.publish, self._topics, self._send_update, vanish=vanish
        )
        self._answered = AnsweredTasks()

    def start(self) -> None:
        """Subscribe to this device's topic and check in (again after every reconnect)."""
        self._transport.subscribe(self._topics.device(self.device_id), self._on_message)
        # A broker shutting down publishes every client's last will, so the
        # coordinator takes this device for gone until it checks in again.
        self._transport.on_reconnect(self.check_in)
        self.check_in()

    def check_in(self) -> None:
        """Tell the coordinator this device is online, and whether it is still busy.

        Nothing is sent after ``stop()``: a heartbeat, a reconnect or a
        come-back-later timer firing while the device is away must not put it
        back in the coordinator's pool (only ``rejoin()`` does).
        """
        # Held across the publish: a check-in that saw the device present must
        # reach the broker before a concurrent stop()'s check-out.
        with self._presence:
            if self._present:
                self._publish_check_in()

    def rejoin(self) -> None:
        """Come back after ``stop()``: check in, and let later check-ins through again."""
        with self._presence:
            self._present = True
            self._publish_check_in()

    def _publish_check_in(self) -> None:
        stats = self.stats
        capabilities: dict[str, int | float] = {
            CheckIn.TASKS_IN_PROGRESS: max(
                stats.tasks - stats.updates_sent - stats.failures - stats.abandoned, 0
            ),
            CheckIn.STARTED_AT: self._started_at,
        }
        if self._examples is not None:
            capabilities[CheckIn.EXAMPLES] = self._examples
        if self.heartbeat_s is not None:
            capabilities[CheckIn.HEARTBEAT_S] = self.heartbeat_s
        message = CheckIn(
            device_id=self.device_id,
            platform=self._platform,
            experiment_id=self._experiment_id,
            capabilities=capabilities,
        )
        self._transport.publish(
            self._topics.checkin(self.device_id), encode(message, self._identity)
        )

    def stop(self, reason: str = "stopped") -> None:
        """Tell the coordinator this device is leaving; it stays quiet until ``rejoin()``."""
        message = CheckOut(device_id=self.device_id, reason=reason)
        with self._presence:
            self._present = False
            self._transport.publish(
                self._topics.checkin(self.device_id), encode(message, self._identity)
            )

    def close(self, reason: str = "stopped") -> None:
        """Leave for good: ``stop()``, then end the device's own come-back timer thread."""
        try:
            self.stop(reason)
        finally:  # a check-out the broker did not take still ends the timer thread
            if self._own_scheduler:
                self._scheduler.close()

    def _open(self, delivery: Delivery) -> TrainTask | ComeBackLater | UpdateRejected | SecureStage:
        """Verify a frame on this device's topic: the service's, or a vouched-for worker's."""
        try:
            message = self._service.open(delivery.body)
        except Refused as exc:
            if exc.reason != Refusal.NOT_PERMITTED.value:
                raise
            message = self._rejections.open(delivery.body)
        assert isinstance(
            message,
            TrainTask
            | ComeBackLater
            | UpdateRejected
            | SecAggNeighbours
            | SecAggDelivery
            | SecAggUnmask,
        )
        return message

    def _on_message(self, delivery: Delivery) -> None:
        message = self._refusals.admit(delivery, self._open)
        if message is None:
            return
        if isinstance(message, TrainTask):
            self._trust_workers(message)
            if message.secure_aggregation is None and self._secure.holds(
                message.experiment_id, message.round
            ):
                # The round's first task was secure: never send this round's update in the clear.
                log.warning(
                    "%s: a plain task for secure round %d refused", self.device_id, message.round
                )
                self.stats.refused["secagg_plain_task"] += 1
                delivery.ack()
                return
            if message.secure_aggregation is not None and not self._secure.task(message):
                # A repeat (the coordinator restarted): keys sent again, no retraining.
                delivery.ack()
                return
            if message.secure_aggregation is None and not self._answered.take(message):
                log.info("%s: round %d's task again: taken already", self.device_id, message.round)
                self.stats.refused["repeated_task"] += 1
                delivery.ack()
                return
            self.stats.tasks += 1
            if message.secure_aggregation is None or self._secure.may_train():
                self._run(lambda: self.serve(message))
        elif isinstance(message, SecAggNeighbours | SecAggDelivery | SecAggUnmask):
            self._secure_stage(message)
        elif isinstance(message, UpdateRejected):
            log.info(
                "%s: update %s rejected: %s %s",
                self.device_id,
                message.update_id,
                message.reason.value,
                message.detail,
            )
            self.stats.rejections.append(message)
        elif isinstance(message, ComeBackLater):
            # Pace steering: not picked this round; offer ourselves again when told.
            self.stats.come_back_after_s = message.retry_after_s
            self._scheduler.call_later(message.retry_after_s, self._come_back)
        delivery.ack()

    def _secure_stage(self, message: SecureStage) -> None:
        """Answer a secure aggregation stage; a request that does not add up is refused."""
        try:
            if isinstance(message, SecAggNeighbours):
                self._secure.neighbours(message)
            elif isinstance(message, SecAggDelivery):
                self._secure.delivery(message)
            else:
                self._secure.unmask(message)
        except SecAggError as exc:
            log.warning("%s: refused %s: %s", self.device_id, message.KIND.value, exc)
            self.stats.refused[f"secagg_{message.KIND.value}"] += 1
        except (BrokerError, FetchError) as exc:  # sending the masked update failed
            log.warning("%s: could not answer %s: %s", self.device_id, message.KIND.value, exc)

    def _trust_workers(self, task: TrainTask) -> None:
        """Pin the aggregator keys the service vouched for in a task."""
        for name, text in task.aggregator_keys.items():
            try:
                self._workers[name] = decode_public_key(text)
            except IdentityError:
                log.warning("%s: task lists a bad key for worker %s", self.device_id, name[:64])

    def _come_back(self, why: str = "come-back-later") -> None:
        """Check in again after a ``ComeBackLater`` or a task (a failed publish waits)."""
        try:
            self.check_in()
        except BrokerError as exc:
            log.warning("%s: check-in after %s failed: %s", self.device_id, why, exc)

    def serve(self, task: TrainTask) -> None:
        """Train on ``task`` and publish the update, or an error reply if that fails."""
        try:
            self._serve(task)
        except BaseException:  # it ended unanswered (offline mid-task): a resend is taken
            self._answered.release(task)
            # Not in progress any more: a device back online must not look busy for good.
            self.stats.abandoned += 1
            raise

    def _serve(self, task: TrainTask) -> None:
        # Never the task's reply_to: this device publishes only to its own update topic.
        reply_to = self._topics.updates(task.experiment_id, self.device_id)
        try:
            weights = decode_weights(self._fetcher.fetch(task.model), copy=True)
            ctx = DeviceContext(self.device_id, weights, task.artifacts, self._fetcher)
            assert self._app.train_handler is not None
            result = self._app.train_handler(task, ctx)
        except (BrokerError, DeviceError) as exc:
            self._refuse(task, reply_to, exc.code, exc)
            return
        except Exception as exc:  # a trainer's own failure (torch, bad settings): say so
            log.exception("%s: training on task %s failed", self.device_id, task.message_id)
            self._refuse(task, reply_to, "training_failed", exc)
            return
        # Non-finite metrics cannot travel as JSON; the weights are checked by the worker.
        metrics = {k: float(v) for k, v in result.metrics.items() if math.isfinite(v)}
        if task.secure_aggregation is not None:
            # Never in the clear: sent masked once the key exchange has told whom to mask with.
            base = decode_weights(self._fetcher.fetch(task.model))
            try:
                self._secure.trained(task, base, result.weights, result.num_examples, metrics)
            except (BrokerError, FetchError) as exc:
                self._refuse(task, reply_to, exc.code, exc)
            except SecAggError as exc:
                self._refuse(task, reply_to, "bad_task", exc)
            return
        try:
            self._send_update(task, dict(result.weights), result.num_examples, metrics)
        except FetchError as exc:
            self._refuse(task, reply_to, exc.code, exc)

    def _send_update(
        self,
        task: TrainTask,
        weights: dict[str, np.ndarray],
        num_examples: int,
        metrics: dict[str, float],
    ) -> None:
        """Publish a model update for ``task`` (uploaded first if too large to go inline)."""
        data = encode_weights(weights)
        ref = self._claim_check(task, data)
        update = ModelUpdate(
            experiment_id=task.experiment_id,
            round=task.round,
            device_id=self.device_id,
            base_version=task.base_version,
            task_id=task.message_id,
            num_examples=num_examples,
            weights=ref,
            inline_weights=None if ref is not None else data,
            metrics=metrics,
            grant=task.grant,
        )
        reply_to = self._topics.updates(task.experiment_id, self.device_id)
        self._transport.publish(reply_to, encode(update, self._identity))
        self.stats.updates_sent += 1
        if task.training.get(TrainTask.CHECK_IN_WHEN_DONE):
            # Ready for more: an asynchronous coordinator hands an idle device its next task.
            self._come_back("update")

    def _refuse(self, task: TrainTask, reply_to: str, code: str, error: Exception) -> None:
        """Tell the aggregator this device cannot serve ``task``, and why."""
        self.stats.failures += 1
        log.warning("%s: task %s refused: %s", self.device_id, task.message_id, error)
        reply = task.error_reply(code, str(error)[:1000], sender=self.device_id)
        self._transport.publish(reply_to, encode(reply, self._identity))
        if task.training.get(TrainTask.CHECK_IN_WHEN_DONE):
            self._come_back("refusal")

    def _claim_check(self, task: TrainTask, data: bytes) -> ModelRef | None:
        """Upload ``data`` if it may not travel inline; return its reference (None: inline)."""
        if not task.max_inline_bytes or len(data) <= task.max_inline_bytes:
            return None
        if task.upload_url is None:
            raise FetchError(
                f"update of {len(data)} bytes exceeds the {task.max_inline_bytes}-byte inline "
                "limit and the task gives no upload URL"
            )
        sha256 = upload(task.upload_url, data)
        self.stats.uploads += 1
        return ModelRef(task.upload_url.split("?", 1)[0], sha256, len(data))
