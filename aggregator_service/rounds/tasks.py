"""What a round sends devices: their tasks, with signed references, and come-back-later notes."""

from __future__ import annotations

import time
from collections.abc import Callable

from aggregator_service.config import ExperimentConfig, build_strategy, is_asynchronous
from aggregator_service.links import ArtifactLinks, upload_name
from broker import (
    ComeBackLater,
    ModelRef,
    RoundOpened,
    TrainTask,
    Transport,
    encode,
    new_message_id,
    topics,
)
from model_store import ModelStore
from model_store.artifacts import TORCHSCRIPT, WEIGHTS


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
        max_inline_bytes: int = 0,
        clock: Callable[[], float] = time.time,
        sender: str = "coordinator",
    ) -> None:
        self._transport = transport
        self._store = store
        self._links = links
        self._max_inline = max_inline_bytes
        self._clock = clock
        self._sender = sender

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
    ) -> None:
        """Send each participant its task and tell the others when to come back."""
        exp, number = opened.experiment_id, opened.round
        strategy = build_strategy(config.strategy)
        training = {**config.training_settings(), **strategy.configure_round(number)}
        if is_asynchronous(config.strategy):
            # No cohort barrier: a device that answers is idle, and says so at once.
            training[TrainTask.CHECK_IN_WHEN_DONE] = True
        # The strategy's saved state rides along by reference: SCAFFOLD devices
        # read the server control variate from it; others never fetch it.
        # Every version's weights travel as the task's model; a platform package's
        # own weights file holds version 0's and would only mislead a device.
        artifacts = {k: v for k, v in refs.items() if not k.endswith(WEIGHTS)}
        for device_id in opened.selected:
            task_id = new_message_id()  # names the task's upload, so known before the task
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
                reply_to=topics.updates(exp),
                sender=self._sender,
            )
            self._transport.publish(topics.device(device_id), encode(task))
        retry_after = max(opened.deadline_at - self._clock(), 0.0)
        for device_id in later:
            message = ComeBackLater(
                experiment_id=exp,
                retry_after_s=retry_after,
                reason="not selected this round",
                sender=self._sender,
            )
            self._transport.publish(topics.device(device_id), encode(message))


def artifact_format(artifact_name: str) -> str:
    """Return the format tag a device sees for an artifact, from its file name."""
    if artifact_name == TORCHSCRIPT:
        return "torchscript"
    suffixes = {".safetensors": "safetensors", ".onnx": "onnx", ".ptl": "torchscript-lite"}
    suffix = artifact_name[artifact_name.rfind(".") :] if "." in artifact_name else ""
    return suffixes.get(suffix, "json" if suffix == ".json" else "binary")
