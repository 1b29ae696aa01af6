"""A device reaches an S3 store only through presigned URLs, and refuses what fails them."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np
import pytest

from aggregator_service.links import PresignedLinks
from broker import (
    Delivery,
    ErrorReply,
    MemoryTransport,
    Message,
    ModelRef,
    ModelUpdate,
    TrainTask,
    decode,
    encode_weights,
)
from device_sdk import ArtifactFetcher, DeviceApp, DeviceClient, DeviceContext, TrainResult
from model_store import S3Store
from tests.identities import SERVICE, TOPICS, device, grant
from tests.s3_server import MotoS3, list_keys, s3_server

WEIGHTS = encode_weights({"w": np.arange(6, dtype=np.float32)})
SHA = hashlib.sha256(WEIGHTS).hexdigest()


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def store(s3: MotoS3) -> S3Store:
    store = s3.store()
    store.put_blob(WEIGHTS)
    return store


def _serve(model: ModelRef, *, upload_url: str | None = None) -> list[Message]:
    """Give one device one task; return what it sent back."""
    transport = MemoryTransport()
    replies: list[Message] = []

    def capture(delivery: Delivery) -> None:
        replies.append(decode(delivery.body))
        delivery.ack()

    transport.subscribe(TOPICS.updates("exp", "phone-1"), capture)
    app = DeviceApp()

    @app.on_train
    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        return TrainResult({"w": ctx.weights["w"] + 1}, 5)

    client = DeviceClient(
        app,
        transport,
        device("phone-1"),
        ArtifactFetcher(retry_for_s=0),
        service_key=SERVICE.public_key,
        topics=TOPICS,
    )
    task = TrainTask(
        experiment_id="exp",
        round=1,
        base_version=0,
        model=model,
        deadline_at=0.0,
        upload_url=upload_url,
        max_inline_bytes=1 if upload_url else 0,
    )
    client.serve(dataclasses.replace(task, grant=grant("exp", 1, "phone-1", task.message_id)))
    transport.join(timeout=10)
    transport.close()
    return replies


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return urlunsplit(parts._replace(query=urlencode(query)))


def test_a_task_carries_presigned_urls_and_the_device_trains_and_uploads(store: S3Store) -> None:
    links = PresignedLinks(store, ttl_s=60)
    url = links.download(SHA)
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["60"]
    assert "X-Amz-Signature" in url and "X-Amz-Credential" in url

    [reply] = _serve(ModelRef(url, SHA, len(WEIGHTS)), upload_url=links.upload("exp-1-phone-1"))

    assert isinstance(reply, ModelUpdate) and reply.weights is not None
    uploaded = store.claim_upload("exp-1-phone-1", reply.weights.sha256)
    assert hashlib.sha256(uploaded).hexdigest() == reply.weights.sha256


def test_an_expired_url_is_refused_with_a_clear_error(store: S3Store, s3: MotoS3) -> None:
    url = PresignedLinks(store, ttl_s=60).download(SHA)

    with s3.clock_ahead(120):
        [reply] = _serve(ModelRef(url, SHA, len(WEIGHTS)))

    assert isinstance(reply, ErrorReply)
    assert reply.code == "fetch_failed"
    assert "HTTP 403" in reply.detail


def test_a_tampered_url_is_refused(store: S3Store) -> None:
    url = PresignedLinks(store, ttl_s=60).download(SHA)
    stretched = _with_query(url, **{"X-Amz-Expires": "604800"})

    [reply] = _serve(ModelRef(stretched, SHA, len(WEIGHTS)))

    assert isinstance(reply, ErrorReply) and "HTTP 403" in reply.detail


def test_an_artifact_with_the_wrong_checksum_is_refused(store: S3Store) -> None:
    other = encode_weights({"w": np.zeros(6, dtype=np.float32)})
    sha_other = store.put_blob(other)
    url = PresignedLinks(store, ttl_s=60).download(sha_other)

    [reply] = _serve(ModelRef(url, SHA, len(WEIGHTS)))  # the URL serves other bytes

    assert isinstance(reply, ErrorReply)
    assert reply.code == "checksum_mismatch"
    assert "refused" in reply.detail


def test_an_expired_upload_url_is_refused_and_nothing_is_stored(store: S3Store, s3: MotoS3) -> None:
    links = PresignedLinks(store, ttl_s=60)
    upload = links.upload("exp-1-phone-1")
    download = PresignedLinks(store, ttl_s=600).download(SHA)

    with s3.clock_ahead(120):  # the download URL is still valid, the upload URL is not
        [reply] = _serve(ModelRef(download, SHA, len(WEIGHTS)), upload_url=upload)

    assert isinstance(reply, ErrorReply) and "HTTP 403" in reply.detail
    assert list_keys(s3, f"{store.prefix}/uploads/") == []


def test_the_refusal_does_not_repeat_the_url_signature(store: S3Store, s3: MotoS3) -> None:
    url = PresignedLinks(store, ttl_s=60).download(SHA)

    with s3.clock_ahead(120):
        [reply] = _serve(ModelRef(url, SHA, len(WEIGHTS)))

    assert isinstance(reply, ErrorReply) and "X-Amz-Signature" not in reply.detail
