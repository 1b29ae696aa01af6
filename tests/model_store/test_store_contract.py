"""The ModelStore contract, run against every backend."""

from __future__ import annotations

import hashlib
import threading
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest

from model_store import (
    Artifact,
    ArtifactNotFound,
    Manifest,
    ManifestError,
    ModelStore,
    StoreBase,
    StoreError,
)

WEIGHTS_V0 = (b"weights-v0", "application/vnd.fedmq.safetensors")
GRAPH = (b"onnx-graph", "application/onnx")


def test_store_satisfies_protocol(store: StoreBase) -> None:
    assert isinstance(store, ModelStore)


def test_blob_round_trip(store: StoreBase) -> None:
    # Prepare
    data = bytes(range(256)) * 100

    # Execute
    sha = store.put_blob(data)

    # Assert
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.has_blob(sha)
    assert store.get_blob(sha) == data


def test_put_blob_is_content_addressed_and_idempotent(store: StoreBase) -> None:
    first = store.put_blob(b"same bytes")
    second = store.put_blob(b"same bytes")
    other = store.put_blob(b"other bytes")

    assert first == second
    assert other != first
    assert store.get_blob(first) == b"same bytes"


def test_missing_blob_raises_artifact_not_found(store: StoreBase) -> None:
    absent = hashlib.sha256(b"never stored").hexdigest()

    assert not store.has_blob(absent)
    with pytest.raises(ArtifactNotFound):
        store.get_blob(absent)
    with pytest.raises(ArtifactNotFound):
        store.blob_url(absent)


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABC", "a" * 63, "g" * 64, ""])
def test_malformed_digest_is_refused(store: StoreBase, bad: str) -> None:
    with pytest.raises(StoreError):
        store.get_blob(bad)


def test_blob_url_names_the_blob(store: StoreBase) -> None:
    sha = store.put_blob(b"payload")

    url = store.blob_url(sha)

    # A presigned URL carries its signature in the query; the path names the blob.
    assert urlsplit(url).path.endswith(sha)


def test_publish_then_get_manifest_round_trip(store: StoreBase) -> None:
    # Execute
    published = store.publish(
        "digits",
        0,
        {"weights.safetensors": WEIGHTS_V0, "model.onnx": GRAPH},
        parent=None,
        metadata={"num_parameters": 650, "shape": (10, 64)},
    )
    loaded = store.get_manifest("digits", 0)

    # Assert
    assert loaded == published
    weights = loaded.artifacts["weights.safetensors"]
    assert weights == Artifact(
        name="weights.safetensors",
        sha256=hashlib.sha256(WEIGHTS_V0[0]).hexdigest(),
        size=len(WEIGHTS_V0[0]),
        media_type=WEIGHTS_V0[1],
    )
    assert store.get_blob(weights.sha256) == WEIGHTS_V0[0]
    assert loaded.metadata == {"num_parameters": 650, "shape": [10, 64]}
    assert loaded.created_at.endswith("Z")


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record what every backend hashes from now on; return the list it fills."""
    hashed: list[bytes] = []

    def sha256(data: bytes = b"") -> Any:
        hashed.append(bytes(data))
        return hashlib.sha256(data)

    counting = SimpleNamespace(sha256=sha256)
    for module in ("store", "local", "memory", "s3.store"):  # every backend's hashing
        monkeypatch.setattr(f"model_store.{module}.hashlib", counting)
    return hashed


def test_publish_hashes_each_artifact_once(
    store: StoreBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker checkpoints megabytes every few dozen updates: the digest the
    # manifest names is the one the blob is filed under, computed once.
    # Prepare
    hashed = _count_hashing(monkeypatch)

    # Execute
    published = store.publish("digits", 0, {"weights.safetensors": WEIGHTS_V0}, parent=None)

    # Assert
    assert hashed == [WEIGHTS_V0[0]]
    assert (
        published.artifacts["weights.safetensors"].sha256
        == hashlib.sha256(WEIGHTS_V0[0]).hexdigest()
    )
    monkeypatch.undo()
    assert store.get_blob(published.artifacts["weights.safetensors"].sha256) == WEIGHTS_V0[0]


def test_a_read_told_the_blob_was_checked_on_the_way_in_hashes_nothing(
    store: StoreBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker reads each update its service hashed on upload: a second sha256 of
    # 16 MB was half of its time per update. Any other read still checks.
    # Prepare
    sha = store.put_blob(WEIGHTS_V0[0])
    hashed = _count_hashing(monkeypatch)

    # Execute
    unchecked = store.get_blob(sha, verify=False)
    checked = store.get_blob(sha)

    # Assert
    assert unchecked == checked == WEIGHTS_V0[0]
    assert hashed == [WEIGHTS_V0[0]]  # the default read, alone


def test_missing_manifest_raises_artifact_not_found(store: StoreBase) -> None:
    store.publish("digits", 0, {"w": WEIGHTS_V0}, parent=None)

    with pytest.raises(ArtifactNotFound):
        store.get_manifest("digits", 1)
    with pytest.raises(ArtifactNotFound):
        store.get_manifest("other", 0)


def test_publishing_different_content_for_existing_version_is_refused(store: StoreBase) -> None:
    store.publish("digits", 0, {"w": WEIGHTS_V0}, parent=None)

    with pytest.raises(ManifestError, match="already exists"):
        store.publish("digits", 0, {"w": (b"other weights", WEIGHTS_V0[1])}, parent=None)

    assert store.get_blob(store.get_manifest("digits", 0).artifacts["w"].sha256) == WEIGHTS_V0[0]


def test_republishing_same_content_returns_stored_manifest(store: StoreBase) -> None:
    # A retried publish (at-least-once delivery) must succeed, not conflict.
    first = store.publish("digits", 0, {"w": WEIGHTS_V0}, parent=None, metadata={"a": 1})

    again = store.publish("digits", 0, {"w": WEIGHTS_V0}, parent=None, metadata={"a": 1})

    assert again == first


def test_put_manifest_refuses_overwrite(store: StoreBase) -> None:
    sha = store.put_blob(b"x")
    artifact = Artifact(name="w", sha256=sha, size=1, media_type="application/octet-stream")
    store.put_manifest(Manifest("m", 0, None, {"w": artifact}))

    with pytest.raises(ManifestError):
        store.put_manifest(Manifest("m", 0, None, {"w": artifact}, metadata={"changed": True}))


def test_put_manifest_refuses_missing_blobs(store: StoreBase) -> None:
    absent = hashlib.sha256(b"not uploaded").hexdigest()
    artifact = Artifact(name="w", sha256=absent, size=12, media_type="application/octet-stream")

    with pytest.raises(ManifestError, match="not in the store"):
        store.put_manifest(Manifest("m", 0, None, {"w": artifact}))

    assert store.latest_version("m") is None


def test_latest_version(store: StoreBase) -> None:
    assert store.latest_version("digits") is None

    store.publish("digits", 0, {"w": WEIGHTS_V0}, parent=None)
    store.publish("digits", 2, {"w": (b"v2", "x/y")}, parent=0)
    store.publish("digits", 1, {"w": (b"v1", "x/y")}, parent=0)
    store.publish("other", 7, {"w": (b"o", "x/y")}, parent=None)

    assert store.latest_version("digits") == 2
    assert store.latest_version("other") == 7
    assert store.get_manifest("digits", 2).parent == 0


@pytest.mark.parametrize("model_id", ["../evil", "a/b", "..", ".hidden", "", "x" * 200, "a\\b"])
def test_unsafe_model_id_is_refused(store: StoreBase, model_id: str) -> None:
    with pytest.raises(StoreError, match="invalid model id"):
        store.publish(model_id, 0, {"w": WEIGHTS_V0}, parent=None)
    with pytest.raises(StoreError, match="invalid model id"):
        store.get_manifest(model_id, 0)
    with pytest.raises(StoreError, match="invalid model id"):
        store.latest_version(model_id)


def test_concurrent_publishers_of_one_version_have_one_winner(store: StoreBase) -> None:
    # Prepare
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def publish(i: int) -> None:
        barrier.wait()
        try:
            store.publish("race", 0, {"w": (f"weights {i}".encode(), "x/y")}, parent=None)
            outcomes.append("won")
        except ManifestError:
            outcomes.append("refused")

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(8)]

    # Execute
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # Assert
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
