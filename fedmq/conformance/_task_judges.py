"""Judging the device's answers to tasks: their fields, their weights, their signatures.

Each function looks at what the kit recorded and returns one ``CheckResult``;
none of them waits or talks to the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from aggregator_service.gate import UpdateGate
from broker import CodecError, Message, ModelUpdate, WeightsMismatch, check_weights, decode_weights
from broker.errors import Refused
from fedmq.conformance._blobs import BlobServer
from fedmq.conformance._model import KitModel
from fedmq.conformance._report import Check, CheckResult
from fedmq.conformance._standin import Arrival, ServiceStandIn, TaskRun

REQUIRED_METRICS = ("loss", "loss_before", "local_steps")
"""Metrics every update reports: the strategies q-FedAvg and FedNova need the last two."""


def judge_task_handling(run: TaskRun, standin: ServiceStandIn, max_examples: int) -> CheckResult:
    """Judge the answer to the baseline task: one update, on the right topic, fields copied."""
    check = Check.TASK_HANDLING
    task = run.task
    if not run.answers:
        return CheckResult.failing(check, f"no answer to task {task.message_id[:8]} in time")
    arrival, message = run.answers[0]
    if not isinstance(message, ModelUpdate):
        return CheckResult.failing(check, f"answered {run.describe_answers()}, not a model_update")
    problems = []
    expected_topic = standin.topics.updates(task.experiment_id, standin.device_id)
    if arrival.topic != expected_topic:
        problems.append(f"published on {arrival.topic}, not the task's reply_to {expected_topic}")
    if arrival.sender != standin.device_id:
        problems.append(f"header sender {arrival.sender!r} is not the device id")
    copied = {
        "experiment_id": (message.experiment_id, task.experiment_id),
        "round": (message.round, task.round),
        "base_version": (message.base_version, task.base_version),
        "task_id": (message.task_id, task.message_id),
        "device_id": (message.device_id, standin.device_id),
    }
    problems += [
        f"{name} {got!r} != {want!r}" for name, (got, want) in copied.items() if got != want
    ]
    if message.grant != task.grant:
        problems.append("the grant is not the task's, unchanged")
    if message.num_examples > max_examples:
        problems.append(f"claims {message.num_examples} examples, the grant allows {max_examples}")
    distinct = {m.message_id for _, m in run.answers}
    if len(distinct) > 1:
        problems.append(f"answered {len(distinct)} times with different message ids (send one)")
    if problems:
        return CheckResult.failing(check, "; ".join(problems))
    return CheckResult.passing(
        check,
        f"one model_update (round {task.round}, base_version {task.base_version}) on "
        f"{arrival.topic}",
    )


def judge_forged_task(forged: TaskRun, baseline: TaskRun, blobs: BlobServer) -> CheckResult:
    """Judge the device's silence towards a task signed by a key it must not trust."""
    check = Check.FORGED_TASK
    if not baseline.answers:
        return CheckResult.unchecked(
            check, "the device answered no task, so silence proves nothing"
        )
    if forged.answers:
        return CheckResult.failing(
            check, f"answered a task not signed by the service key: {forged.describe_answers()}"
        )
    if blobs.fetches(forged.task.model):
        return CheckResult.failing(
            check, "downloaded the model of a task not signed by the service key (verify first)"
        )
    return CheckResult.passing(check, "no download, no answer to a task signed by another key")


def judge_result_shape(baseline: TaskRun, model: KitModel) -> CheckResult:
    """Judge the baseline update's weights, example count and metrics."""
    check = Check.RESULT_SHAPE
    updates = baseline.updates()
    if not updates:
        return CheckResult.unchecked(check, "no model_update to inspect (see task_handling)")
    update = updates[0]
    if update.weights is not None or update.inline_weights is None:
        return CheckResult.failing(
            check, "weights not inline, though the task has no upload URL and no inline limit"
        )
    try:
        weights = decode_weights(bytes(update.inline_weights))
        check_weights(weights, model.spec_of_weights())
    except WeightsMismatch as exc:
        return CheckResult.failing(check, f"weights differ from the model's: {exc}")
    except CodecError as exc:
        return CheckResult.failing(check, f"weights are not safetensors: {exc}")
    problems = [
        f"{name} holds NaN or Infinity" for name, t in weights.items() if not np.isfinite(t).all()
    ]
    if update.num_examples < 1:
        problems.append(f"num_examples {update.num_examples} is not positive")
    for name in REQUIRED_METRICS:
        value = update.metrics.get(name)
        if not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"metric {name} missing or not a finite number")
    steps = update.metrics.get("local_steps")
    if isinstance(steps, int | float) and steps < 1:
        problems.append(f"local_steps {steps} is not positive")
    if problems:
        return CheckResult.failing(check, "; ".join(problems))
    metrics = update.metrics
    return CheckResult.passing(
        check,
        f"{len(weights)} F32 tensors as the model's, {update.num_examples} examples, "
        f"loss {metrics['loss_before']:.3f} -> {metrics['loss']:.3f} in "
        f"{metrics['local_steps']:g} steps",
    )


def judge_signed_update(
    answers: Sequence[tuple[Arrival, Message]], standin: ServiceStandIn
) -> CheckResult:
    """Judge every answer the device sent to a genuine task by the aggregator worker's own gate."""
    check = Check.SIGNED_UPDATE
    if not any(isinstance(message, ModelUpdate) for _, message in answers):
        return CheckResult.unchecked(check, "no model_update to verify (see task_handling)")
    gate = UpdateGate(standin.identity.public_key, standin.topics)
    for arrival, message in answers:
        try:
            gate.admit(arrival)
        except Refused as exc:
            return CheckResult.failing(
                check,
                f"the worker's gate refuses {message.KIND.value} {message.message_id[:8]} as "
                f"{exc.reason} ({exc.detail})",
            )
    return CheckResult.passing(
        check,
        f"{len(answers)} answers admitted by the worker's gate (signature with the pinned key, "
        "payload sha256, grant, topic)",
    )
