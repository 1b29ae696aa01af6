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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator_service.api.app import create_app
from aggregator_service.errors import Forbidden
from aggregator_service.links import SignedLinks
from tests.clocks import Clock

SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def clock() -> Clock:
    return Clock(1_000_000.0)


@pytest.fixture
def links(clock: Clock) -> SignedLinks:
    return SignedLinks(SECRET, "http://fedmq.test:8080", ttl_s=60, clock=clock)


def _app(stack: Any, links: SignedLinks) -> Any:
    return create_app(
        {"TESTING": True, "ADMIN_TOKEN": "t", "MAX_UPLOAD_BYTES": 1000},
        service=stack.service,
        store=stack.store,
        links=links,
    )


@pytest.fixture
def client(stack: Any, links: SignedLinks) -> Iterator[FlaskClient]:
    with _app(stack, links).test_client() as client:
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


def test_a_signed_upload_url_takes_one_upload(client: FlaskClient, links: SignedLinks) -> None:
    url = _local(links.upload("exp-1-task-1"))

    first = client.put(url, data=b"first")
    second = client.put(url, data=b"second")

    assert first.status_code == 201
    assert second.status_code == 409 and second.json["error"]["code"] == "conflict"
    assert client.put(_local(links.upload("exp-1-task-2")), data=b"other").status_code == 201


def test_a_used_upload_url_stays_used_across_a_restart(
    stack: Any, links: SignedLinks, clock: Clock
) -> None:
    url = _local(links.upload("exp-1-task-1"))
    with _app(stack, links).test_client() as before:
        assert before.put(url, data=b"first").status_code == 201
    restarted = SignedLinks(SECRET, "http://fedmq.test:8080", ttl_s=60, clock=clock)

    with _app(stack, restarted).test_client() as after:
        response = after.put(url, data=b"second")

    assert response.status_code == 409


def test_a_refused_upload_leaves_its_url_usable(client: FlaskClient, links: SignedLinks) -> None:
    url = _local(links.upload("exp-1-task-1"))

    refused = client.put(url, data=b"z" * 1001)
    accepted = client.put(url, data=b"fits")

    assert (refused.status_code, accepted.status_code) == (413, 201)


def test_receipts_cannot_be_forged_without_the_secret(links: SignedLinks, clock: Clock) -> None:
    other = SignedLinks(b"another secret, 32 bytes long!!!", "http://x", clock=clock)

    assert links.receipt("exp-task") == links.receipt("exp-task")
    assert links.receipt("exp-task") != other.receipt("exp-task")
    assert links.receipt("exp-task") != links.receipt("exp-task2")


@pytest.mark.parametrize(
    ("expires", "signature"),
    [
        ("\u00b2", "0" * 64),  # str.isdigit() holds, int() refuses
        ("9" * 5000, "0" * 64),  # above int()'s digit limit
        ("-1", "0" * 64),
        ("1e9", "0" * 64),
        (" 1000", "0" * 64),
        ("1000\n", "0" * 64),
        ("2000000", "\u00e9" * 64),  # compare_digest refuses non-ASCII text
        ("2000000", "0" * 63),
        ("2000000", "0" * 65),
        ("2000000", "0" * 100_000),
        ("2000000", "G" * 64),
        ("", ""),
    ],
    ids=[
        "superscript-two",
        "5000-digits",
        "negative",
        "exponent",
        "leading-space",
        "trailing-newline",
        "non-ascii-signature",
        "short-signature",
        "long-signature",
        "huge-signature",
        "non-hex-signature",
        "empty",
    ],
)
def test_malformed_expiries_and_signatures_are_403(
    client: FlaskClient, links: SignedLinks, expires: str, signature: str
) -> None:
    query = {"expires": expires, "signature": signature}

    download = client.get(f"/api/v1/blobs/{'a' * 64}", query_string=query)
    upload = client.put("/api/v1/uploads/exp-1-task", query_string=query, data=b"x")

    assert (download.status_code, upload.status_code) == (403, 403)
    assert download.json["error"]["code"] == upload.json["error"]["code"] == "forbidden"


_TEXT = st.text(max_size=80) | st.sampled_from(["", "0" * 64, "9" * 13, "\u00b2", "\ud800"])


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "PUT"]) | st.text(max_size=8),
    path=st.text(max_size=80),
    expires=st.none() | _TEXT | st.integers(min_value=-(10**20), max_value=10**20).map(str),
    signature=st.none() | _TEXT,
)
def test_verification_refuses_anything_unsigned_with_forbidden_only(
    method: str, path: str, expires: str | None, signature: str | None
) -> None:
    links = SignedLinks(SECRET, "http://x", clock=lambda: 1_000_000.0)

    with pytest.raises(Forbidden):
        links.verify(method, path, expires, signature)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # What the service signs: hashes and upload names, both URL-safe.
    subject=st.text(alphabet="abcdefABCDEF0123456789._-", min_size=1, max_size=40),
    field=st.sampled_from(["method", "path", "expires", "signature"]),
    junk=st.text(max_size=80),
)
def test_a_signed_url_with_any_one_part_changed_is_refused(
    subject: str, field: str, junk: str
) -> None:
    links = SignedLinks(SECRET, "http://x", ttl_s=60, clock=lambda: 1_000_000.0)
    parts = urlsplit(links.download(subject))
    signed = {k: v[0] for k, v in parse_qs(parts.query).items()}
    args = {"method": "GET", "path": parts.path, **signed}
    links.verify(args["method"], args["path"], args["expires"], args["signature"])

    if args[field] == junk:
        return
    args[field] = junk
    with pytest.raises(Forbidden):
        links.verify(args["method"], args["path"], args["expires"], args["signature"])


def test_uploads_may_exceed_the_json_body_limit(stack: Any, links: SignedLinks) -> None:
    app = create_app(
        {"TESTING": True, "ADMIN_TOKEN": "t", "MAX_UPLOAD_BYTES": 3 << 20},
        service=stack.service,
        store=stack.store,
        links=links,
    )
    data = b"w" * (2 << 20)  # twice the app-wide MAX_CONTENT_LENGTH

    with app.test_client() as client:
        response = client.put(_local(links.upload("exp-1-big")), data=data)
        json_response = client.post(
            "/api/v1/experiments",
            data=data,
            headers={"Authorization": "Bearer t"},
            content_type="application/json",
        )

    assert response.status_code == 201 and response.json["size"] == len(data)
    assert json_response.status_code == 413
