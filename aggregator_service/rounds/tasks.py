"""What a round sends devices: their tasks, with signed references, and come-back-later notes."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Mapping

from aggregator_service.config import ExperimentConfig, build_strategy
from aggregator_service.links import ArtifactLinks, upload_name
from broker import (
    ComeBackLater,
    ModelRef,
    RoundOpened,
    TrainTask,
    Transport,
    encode,
    new_message_id,
)
from broker.identity import Identity, encode_key
from broker.messages import SecAggSettings, TaskGrant
from broker.topics import Topics
from broker.transport import publish_all
from broker.verify import issue_grant
from model_store import ModelStore
from model_store.artifacts import TORCHSCRIPT, WEIGHTS

log = logging.getLogger(__name__)

GrantLimits = Callable[[str], tuple[str, int] | None]
"""Device id -> (its pinned public key, base64; its example limit), None if it may not train."""


class TaskDispatch:
    """Builds and publishes the messages that tell devices what to do in a round.

    Parameters
    ----------
    transport
        Where tasks are published (each device's own topic).
    store
        The model store whose manifests list a version's artifacts.
    links
        Makes the URLs a device fetches artifacts from and uploads to.
    max_inline_bytes
        Updates above this size are uploaded, not inlined (0: no limit).
    """

    def __init__(
        self,
        transport: Transport,
        store: ModelStore,
        links: ArtifactLinks,
        *,
        identity: Identity,
        topics: Topics,
        grant_limits: GrantLimits,
        aggregator_keys: Callable[[], Mapping[str, bytes]],
        max_inline_bytes: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._transport = transport
        self._store = store
        self._links = links
        self._identity = identity
        self._topics = topics
        self._grant_limits = grant_limits
        self._aggregator_keys = aggregator_keys
        self._max_inline = max_inline_bytes
        self._clock = clock

    def refs(self, experiment_id: str, version: int) -> dict[str, ModelRef]:
        """Return signed references to every artifact of a model version."""
        manifest = self._store.get_manifest(experiment_id, version)
        return {
            name: ModelRef(self._links.download(a.sha256), a.sha256, a.size, artifact_format(name))
            for name, a in manifest.artifacts.items()
        }

    def send(
        self,
        opened: RoundOpened,
        config: ExperimentConfig,
        refs: dict[str, ModelRef],
        *,
        later: list[str],
        secure: SecAggSettings | None = None,
        caps: Mapping[str, int] | None = None,
        only: Collection[str] | None = None,
    ) -> None:
        """Send each participant its task and tell the others when to come back.

        ``only`` limits the tasks to those participants (one that came back, say).

        ``secure`` is a secure round's settings (``SecureRounds.begin``) and
        ``caps`` each device's example cap, which its scale was sized for:
        each task carries them, and its grant admits no more examples.
        Without them a secure experiment's round gets no tasks: a device
        must never be asked for its update in the clear.
        """
        exp, number = opened.experiment_id, opened.round
        if (config.secure_aggregation is None) != (secure is None):
            log.error("%s round %d: secure aggregation settings missing; no tasks", exp, number)
            return
        strategy = build_strategy(config.strategy)
        training = {**config.training_settings(), **strategy.configure_round(number)}
        if config.buffered:
            # No cohort barrier: a device that answers is idle, and says so at once.
            training[TrainTask.CHECK_IN_WHEN_DONE] = True
        # The strategy's saved state rides along by reference: SCAFFOLD devices
        # read the server control variate from it; others never fetch it.
        # Every version's weights travel as the task's model; a platform package's
        # own weights file holds version 0's and would only mislead a device.
        artifacts = {k: v for k, v in refs.items() if not k.endswith(WEIGHTS)}
        workers = {name: encode_key(key) for name, key in self._aggregator_keys().items()}
        tasks: list[tuple[str, bytes]] = []
        participants = (
            opened.selected if only is None else [d for d in opened.selected if d in only]
        )
        for device_id in participants:
            limits = self._grant_limits(device_id)
            if limits is None:
                log.info("%s round %d: %s is revoked; no task", exp, number, device_id)
                continue
            examples = limits[1]
            if secure is not None:
                cap = (caps or {}).get(device_id)
                if cap is None:  # not in the cohort the round's scale was sized for
                    continue
                examples = min(examples, cap)
            task_id = new_message_id()  # names the task's upload, so known before the task
            grant = TaskGrant(
                experiment_id=exp,
                round=number,
                device_id=device_id,
                task_id=task_id,
                public_key=limits[0],
                max_examples=examples,
            )
            task = TrainTask(
                message_id=task_id,
                experiment_id=exp,
                round=number,
                base_version=opened.base_version,
                model=opened.model,
                artifacts=artifacts,
                training=training,
                deadline_at=opened.deadline_at,
                upload_url=self._links.upload(upload_name(exp, task_id)),
                max_inline_bytes=self._max_inline,
                reply_to=self._topics.updates(exp, device_id),
                grant=issue_grant(grant, self._identity),
                aggregator_keys=workers,
                secure_aggregation=None
                if secure is None
                else dataclasses.replace(secure, max_examples=examples),
            )
            tasks.append((self._topics.device(device_id), encode(task, self._identity)))
        # All in flight at once (one broker round trip each made a cohort of
        # 10,000 take minutes to send), in the cohort's order.
        publish_all(self._transport, tasks)
        if not later:
            return
        # Every device left out is told the same, so the note is signed once: it
        # names no device (a device checks the service's signature and its age).
        message = ComeBackLater(
            experiment_id=exp,
            retry_after_s=max(opened.deadline_at - self._clock(), 0.0),
            reason="not selected this round",
        )
        frame = encode(message, self._identity)
        publish_all(self._transport, [(self._topics.device(d), frame) for d in later])


def artifact_format(artifact_name: str) -> str:
    """Return the format tag a device sees for an artifact, from its file name."""
    if artifact_name == TORCHSCRIPT:
        return "torchscript"
    suffixes = {".safetensors": "safetensors", ".onnx": "onnx", ".ptl": "torchscript-lite"}
    suffix = artifact_name[artifact_name.rfind(".") :] if "." in artifact_name else ""
    return suffixes.get(suffix, "json" if suffix == ".json" else "binary")
