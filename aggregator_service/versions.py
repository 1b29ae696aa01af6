"""Committed model versions: new weights, the parent's other artifacts, the strategy's state.

A strategy's server state (momentum, adaptive moments, DP accounting) is
saved with the version it produced, so any worker can continue the
experiment from the store alone: arrays as a safetensors artifact, scalars in
the manifest's metadata (JSON keeps Python's big integers exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import numpy as np

from aggregator_service.strategies.base import StateValue
from aggregator_service.types import Weights
from broker import ModelRef, decode_weights, encode_weights
from model_store import MEDIA_SAFETENSORS, WEIGHTS, Artifact, Manifest, ModelStore
from model_store.ptd import PTD_KEY_PREFIX, PTD_WEIGHTS, rewrite_weights

WEIGHTS_ARTIFACT = WEIGHTS
WEIGHTS_MEDIA_TYPE = MEDIA_SAFETENSORS
STATE_ARTIFACT = "strategy_state.safetensors"
STATE_SCALARS = "strategy_state"


def write_version(
    store: ModelStore,
    model_id: str,
    parent: int,
    version: int,
    weights: Weights,
    strategy_state: Mapping[str, StateValue],
) -> ModelRef:
    """Store ``weights`` as ``version`` of ``model_id``, with the strategy's state.

    If ``version`` already exists (a worker committed it, then died before
    announcing it), the stored version wins and its reference is returned.
    """
    latest = store.latest_version(model_id)
    if latest is not None and latest >= version:
        return stored_ref(store, model_id, version)
    data = encode_weights(weights)
    sha = store.put_blob(data)
    base = store.get_manifest(model_id, parent)
    artifacts = {k: v for k, v in base.artifacts.items() if k != STATE_ARTIFACT}
    artifacts[WEIGHTS_ARTIFACT] = Artifact(WEIGHTS_ARTIFACT, sha, len(data), WEIGHTS_MEDIA_TYPE)
    artifacts.update(_phone_weights(store, base.artifacts, weights))
    arrays = {k: v for k, v in strategy_state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in strategy_state.items() if not isinstance(v, np.ndarray)}
    if arrays:
        blob = encode_weights(arrays)
        artifacts[STATE_ARTIFACT] = Artifact(
            STATE_ARTIFACT, store.put_blob(blob), len(blob), WEIGHTS_MEDIA_TYPE
        )
    metadata = {**base.metadata, STATE_SCALARS: {k: _scalar(v) for k, v in scalars.items()}}
    store.put_manifest(
        Manifest(
            model_id=model_id,
            version=version,
            parent=parent,
            artifacts=artifacts,
            created_at=datetime.now(UTC).isoformat(),
            metadata=metadata,
        )
    )
    return ModelRef(store.blob_url(sha), sha, len(data))


def _phone_weights(
    store: ModelStore, parent: Mapping[str, Artifact], weights: Weights
) -> dict[str, Artifact]:
    """Return the version's ExecuTorch weights files, the parent's with the new values.

    A phone loads its programs once and fetches each version's ``.ptd`` only;
    every version holds the same tensors, so its file is its parent's with
    the bytes replaced (``model_store.ptd``), not a new export.
    """
    files: dict[str, Artifact] = {}
    written: dict[str, tuple[str, int]] = {}  # Android's and iOS's files are the same bytes
    for name, artifact in parent.items():
        if name.endswith("/" + PTD_WEIGHTS):
            if artifact.sha256 not in written:
                data = rewrite_weights(
                    store.get_blob(artifact.sha256), weights, key_prefix=PTD_KEY_PREFIX
                )
                written[artifact.sha256] = (store.put_blob(data), len(data))
            sha, size = written[artifact.sha256]
            files[name] = Artifact(name, sha, size, artifact.media_type)
    return files


def stored_ref(store: ModelStore, model_id: str, version: int) -> ModelRef:
    """Return the reference of a stored version's weights."""
    artifact = store.get_manifest(model_id, version).artifacts[WEIGHTS_ARTIFACT]
    return ModelRef(store.blob_url(artifact.sha256), artifact.sha256, artifact.size)


def read_strategy_state(store: ModelStore, model_id: str, version: int) -> dict[str, StateValue]:
    """Return the strategy state saved with a version (empty for version 0)."""
    manifest = store.get_manifest(model_id, version)
    state: dict[str, StateValue] = dict(manifest.metadata.get(STATE_SCALARS, {}))
    artifact = manifest.artifacts.get(STATE_ARTIFACT)
    if artifact is not None:
        state.update(decode_weights(store.get_blob(artifact.sha256), copy=True))
    return state


def _scalar(value: StateValue) -> float | int:
    """Return a JSON-safe scalar (numpy scalars become Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value  # type: ignore[return-value]
