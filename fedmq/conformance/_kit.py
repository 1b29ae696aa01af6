"""The kit's script: the steps it plays against a device, in order, and the report they make."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from broker import BrokerError, Message, ModelRef, ModelUpdate
from broker.identity import SERVICE_NAME, Identity
from broker.topics import is_valid_segment
from fedmq.conformance._blobs import BlobServer, Fault
from fedmq.conformance._fetch_judges import (
    judge_download_checksum,
    judge_retries,
    judge_tampered_artifact,
)
from fedmq.conformance._model import KitModel
from fedmq.conformance._report import Check, CheckResult, Report
from fedmq.conformance._session_judges import (
    examples_declared,
    judge_check_in,
    judge_come_back_later,
)
from fedmq.conformance._standin import Arrival, ServiceStandIn, TaskRun
from fedmq.conformance._task_judges import (
    judge_forged_task,
    judge_result_shape,
    judge_signed_update,
    judge_task_handling,
)
from model_store import WEIGHTS

TakeOver = Callable[[], None]
"""Takes the device's broker connection away from it (raises ``BrokerError`` if it cannot)."""

_TASK_CHECKS = (
    Check.TASK_HANDLING,
    Check.FORGED_TASK,
    Check.DOWNLOAD_CHECKSUM,
    Check.TAMPERED_ARTIFACT,
    Check.RESULT_SHAPE,
    Check.SIGNED_UPDATE,
    Check.RETRIES,
)


@dataclass(frozen=True)
class KitOptions:
    """How long the kit waits, and what it asks of the device.

    Parameters
    ----------
    timeout_s
        How long to wait for each thing the device should do (check in, answer a task).
    settle_s
        How long to keep watching after an answer, for a second one (or an
        update after a refusal).
    come_back_after_s
        The ``retry_after_s`` of the come-back-later note.
    come_back_grace_s
        How long after ``come_back_after_s`` the device may take to check in again.
    max_examples
        The service's cap on a grant's ``max_examples``.
    """

    timeout_s: float = 60.0
    settle_s: float = 1.0
    come_back_after_s: float = 5.0
    come_back_grace_s: float = 30.0
    max_examples: int = 1_000_000


DEFAULT_OPTIONS = KitOptions()


class Conformance:
    """Plays the service against one device and reports, check by check, what it did.

    Parameters
    ----------
    standin
        The service's side of the bus, subscribed before the device starts.
    blobs
        The artifact server the tasks point at.
    model
        The model the tasks carry.
    take_over
        Drops the device's broker connection (None: reconnect is not checked).
    options
        Timeouts and the come-back-later delay.
    """

    def __init__(
        self,
        standin: ServiceStandIn,
        blobs: BlobServer,
        model: KitModel,
        *,
        take_over: TakeOver | None,
        options: KitOptions = DEFAULT_OPTIONS,
    ) -> None:
        self._standin = standin
        self._blobs = blobs
        self._model = model
        self._take_over = take_over
        self._options = options
        self._experiment_id = f"conformance-{uuid.uuid4().hex[:8]}"
        self._max_examples = options.max_examples
        self._round = 0
        self._phone_refs: dict[str, dict[str, ModelRef]] = {}
        """A phone's weights file for each task model offered, by the model's sha256."""
        self._answers: list[tuple[Arrival, Message]] = []
        """Every answer to a genuine task, for the signature check."""

    def run(self) -> Report:
        """Run every check in order; return the report."""
        opts = self._options
        arrival = self._standin.wait_check_in(opts.timeout_s)
        results = [judge_check_in(arrival, self._standin, opts.timeout_s)]
        if arrival is None:
            why = "the device never checked in"
            return Report.of(
                [
                    *results,
                    *(CheckResult.unchecked(c, why) for c in Check if c is not Check.CHECK_IN),
                ]
            )
        named = getattr(arrival.message, "experiment_id", None)
        if isinstance(named, str) and is_valid_segment(named):  # the device asked for one
            self._experiment_id = named
        self._max_examples = examples_declared(arrival, opts.max_examples)
        results += self._task_checks()
        results.append(self._come_back_later())
        answers_tasks = any(isinstance(m, ModelUpdate) for _, m in self._answers)
        results.append(self._reconnect(answers_tasks=answers_tasks))
        return Report.of(results)

    # -- the task scenarios ----------------------------------------------------------

    def _task_checks(self) -> list[CheckResult]:
        forged_signer = Identity.generate(SERVICE_NAME)  # names itself the service; is not
        forged = self._send(signer=forged_signer)
        baseline = self._task()
        forged = TaskRun(forged.task, tuple(self._standin.answers_to(forged.task)))
        if not baseline.updates():
            why = "the device sent no model_update for a plain task (see task_handling)"
            return [
                judge_task_handling(baseline, self._standin, self._max_examples),
                *(
                    CheckResult.unchecked(c, why)
                    for c in _TASK_CHECKS
                    if c is not Check.TASK_HANDLING
                ),
            ]
        tampered_model = self._task(model=self._offer_model(tampered=True))
        tampered_refs = {
            name: self._blobs.offer(name, data, tampered=True)
            for name, data in self._model.artifacts.items()
        }
        tampered_artifacts = self._task(artifacts=tampered_refs)
        transient_ref = self._offer_model(faults=(Fault.UNAVAILABLE, Fault.DROPPED))
        transient = self._task(model=transient_ref)
        expired_ref = self._offer_model(expired=True)
        expired = self._task(model=expired_ref)
        return [
            judge_task_handling(baseline, self._standin, self._max_examples),
            judge_forged_task(forged, baseline, self._blobs),
            judge_download_checksum(baseline, tampered_model, self._blobs),
            judge_tampered_artifact(tampered_artifacts, list(tampered_refs.values()), self._blobs),
            judge_result_shape(baseline, self._model),
            judge_signed_update(self._answers, self._standin),
            judge_retries(transient, transient_ref, expired, expired_ref, self._blobs),
        ]

    def _offer_model(
        self, *, tampered: bool = False, faults: tuple[Fault, ...] = (), expired: bool = False
    ) -> ModelRef:
        """Serve weights no device has cached, so the device must download them.

        A phone's task also carries the same weights as its ExecuTorch weights
        file, served alike (tampered, failing, expired), whichever it fetches.
        """
        data = self._model.fresh_weights()
        model = self._blobs.offer(WEIGHTS, data, tampered=tampered, faults=faults, expired=expired)
        self._phone_refs[model.sha256] = {
            name: self._blobs.offer(
                name, ptd, tampered=tampered, faults=faults, expired=expired, twin_of=model
            )
            for name, ptd in self._model.phone_weights(data).items()
        }
        return model

    def _artifact_refs(self) -> dict[str, ModelRef]:
        return {name: self._blobs.offer(name, data) for name, data in self._model.artifacts.items()}

    def _send(
        self,
        *,
        model: ModelRef | None = None,
        artifacts: Mapping[str, ModelRef] | None = None,
        signer: Identity | None = None,
    ) -> TaskRun:
        """Publish a task (fresh weights and the model's artifacts unless given); do not wait."""
        self._round += 1
        model = model or self._offer_model()
        listed = self._artifact_refs() if artifacts is None else artifacts
        task = self._standin.send_task(
            experiment_id=self._experiment_id,
            round_number=self._round,
            model=model,
            artifacts={**listed, **self._phone_refs.get(model.sha256, {})},
            max_examples=self._max_examples,
            signer=signer,
        )
        return TaskRun(task, ())

    def _task(
        self, *, model: ModelRef | None = None, artifacts: Mapping[str, ModelRef] | None = None
    ) -> TaskRun:
        """Send a task, wait for its answer, and watch a while longer for another."""
        task = self._send(model=model, artifacts=artifacts).task
        if self._standin.wait_answer(task, self._options.timeout_s) is not None:
            time.sleep(self._options.settle_s)
        answers = tuple(self._standin.answers_to(task))
        self._answers.extend(answers)
        return TaskRun(task, answers)

    # -- presence ----------------------------------------------------------------------

    def _come_back_later(self) -> CheckResult:
        opts = self._options
        sent_at = time.monotonic()
        self._standin.send_come_back_later(self._experiment_id, opts.come_back_after_s)
        check_in = self._standin.wait_check_in(
            opts.come_back_after_s + opts.come_back_grace_s, since=sent_at
        )
        return judge_come_back_later(
            sent_at, check_in, opts.come_back_after_s, opts.come_back_grace_s
        )

    def _reconnect(self, *, answers_tasks: bool) -> CheckResult:
        check = Check.RECONNECT
        if self._take_over is None:
            return CheckResult.unchecked(
                check, "the kit cannot take over a connection on this broker"
            )
        taken_at = time.monotonic()
        try:
            self._take_over()
        except BrokerError as exc:
            return CheckResult.unchecked(
                check, f"the broker refused the kit the device's client id: {exc}"
            )
        back = self._standin.wait_check_in(self._options.timeout_s, since=taken_at)
        if back is None:
            return CheckResult.failing(
                check,
                f"no check-in within {self._options.timeout_s:g} s after the broker closed the "
                "device's connection (reconnect with back-off, subscribe, check in)",
            )
        after = back.at - taken_at
        if not answers_tasks:
            return CheckResult.passing(
                check,
                f"checked in {after:.2f} s after losing its connection (no task: it answers none)",
            )
        run = self._task()
        if not run.updates():
            return CheckResult.failing(
                check,
                f"checked in again after {after:.2f} s, then answered a task with "
                f"{run.describe_answers()}",
            )
        return CheckResult.passing(
            check, f"checked in {after:.2f} s after losing its connection, then answered a task"
        )
