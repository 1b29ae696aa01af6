"""Signed, time-limited blob URLs: the only way a device reaches a local-folder store."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from flask.testing import FlaskClient

from aggregator_service.api.app import create_app
from aggregator_service.links import SignedLinks

SECRET = b"0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def links(clock: Clock) -> SignedLinks:
    return SignedLinks(SECRET, "http://fedmq.test:8080", ttl_s=60, clock=clock)


@pytest.fixture
def client(stack: Any, links: SignedLinks) -> Iterator[FlaskClient]:
    app = create_app(
        {"TESTING": True, "ADMIN_TOKEN": "t", "MAX_UPLOAD_BYTES": 1000},
        service=stack.service,
        store=stack.store,
        links=links,
    )
    with app.test_client() as client:
        yield client


def _local(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_a_signed_download_url_serves_the_blob(
    client: FlaskClient, stack: Any, links: SignedLinks
) -> None:
    sha = stack.store.put_blob(b"model bytes")

    response = client.get(_local(links.download(sha)))

    assert response.status_code == 200 and response.data == b"model bytes"


def test_an_expired_url_is_refused(
    client: FlaskClient, stack: Any, links: SignedLinks, clock: Clock
) -> None:
    url = links.download(stack.store.put_blob(b"x"))
    clock.now += 61

    response = client.get(_local(url))

    assert response.status_code == 403
    assert "expired" in response.json["error"]["message"]


@pytest.mark.parametrize("tamper", ["sha", "expiry", "signature", "unsigned", "method"])
def test_tampered_urls_are_refused(
    client: FlaskClient, stack: Any, links: SignedLinks, tamper: str
) -> None:
    sha = stack.store.put_blob(b"secret weights")
    other = stack.store.put_blob(b"other weights")
    parts = urlsplit(links.download(sha))
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    path = parts.path
    if tamper == "sha":
        path = path.replace(sha, other)
    elif tamper == "expiry":
        query["expires"] = str(int(query["expires"]) + 3600)
    elif tamper == "signature":
        query["signature"] = "0" * 64
    elif tamper == "unsigned":
        query = {}
    qs = "&".join(f"{k}={v}" for k, v in query.items())

    if tamper == "method":
        response = client.put(f"/api/v1/uploads/n?{parts.query}", data=b"x")
    else:
        response = client.get(f"{path}?{qs}")

    assert response.status_code == 403


def test_an_upload_stores_the_bytes_and_answers_their_hash(
    client: FlaskClient, stack: Any, links: SignedLinks
) -> None:
    data = b"u" * 500

    response = client.put(
        _local(links.upload("exp-1-dev")), data=data, content_type="application/octet-stream"
    )

    assert response.status_code == 201
    assert response.json == {"sha256": hashlib.sha256(data).hexdigest(), "size": 500}
    assert stack.store.get_blob(response.json["sha256"]) == data


def test_uploads_above_the_limit_and_empty_uploads_are_refused(
    client: FlaskClient, links: SignedLinks
) -> None:
    too_big = client.put(_local(links.upload("n")), data=b"z" * 1001)
    chunked = client.put(
        _local(links.upload("n")),
        input_stream=io.BytesIO(b"z" * 1200),  # streamed without a Content-Length
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    empty = client.put(_local(links.upload("n")), data=b"")

    assert too_big.status_code == 413
    assert chunked.status_code == 413
    assert empty.status_code == 400


def test_a_missing_blob_is_404(client: FlaskClient, links: SignedLinks) -> None:
    response = client.get(_local(links.download("a" * 64)))

    assert response.status_code == 404


def test_short_secrets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        SignedLinks(b"short", "http://x")
