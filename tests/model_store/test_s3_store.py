"""S3Store against a real S3 API on loopback (moto's server behind a SigV4 gate, see conftest)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

import model_store
import model_store.s3.store as s3_module
from model_store import (
    ArtifactNotFound,
    IntegrityError,
    LocalStore,
    MemoryStore,
    ModelStore,
    PresignedAccess,
    S3Store,
    StoreError,
    StoreUnavailable,
    open_store,
)
from tests.ports import free_port

MIB = 1024 * 1024


def raw_key(store: S3Store, *parts: str) -> str:
    """Return the object key the store uses (its layout is part of the contract)."""
    return "/".join((store.prefix, *parts))


def fetch(url: str, data: bytes | None = None, content_type: str | None = None) -> bytes:
    """GET (or PUT ``data`` to) a URL with plain urllib, as a device does."""
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(
        url, data=data, method="PUT" if data is not None else "GET", headers=headers
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return bytes(response.read())


def http_status(url: str, data: bytes | None = None, content_type: str | None = None) -> int:
    """Return the HTTP status a device gets for a URL."""
    try:
        fetch(url, data, content_type)
    except urllib.error.HTTPError as exc:
        return exc.code
    return 200


class RecordingClient:
    """Passes calls to a boto3 client and records the operations' names."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if not callable(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attribute(*args, **kwargs)

        return call


@pytest.fixture
def s3_store(s3_server: Any) -> S3Store:
    store: S3Store = s3_server.store()
    return store


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials for boto3's chain from the environment only (no profile files)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fedmq-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fedmq-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    for name in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# -- blobs -----------------------------------------------------------------------


def test_s3_store_offers_both_protocols_and_the_others_do_not(s3_store: S3Store) -> None:
    assert isinstance(s3_store, ModelStore)
    assert isinstance(s3_store, PresignedAccess)
    assert not isinstance(MemoryStore(), PresignedAccess)
    assert not isinstance(LocalStore("/tmp/unused-fedmq-store"), PresignedAccess)


def test_blob_round_trip_uses_the_content_addressed_layout(
    s3_server: Any, s3_store: S3Store
) -> None:
    data = b"weights" * 1000

    sha = s3_store.put_blob(data)

    head = s3_server.client().head_object(
        Bucket=s3_store.bucket, Key=raw_key(s3_store, "blobs", sha)
    )
    assert head["ContentLength"] == len(data)
    assert s3_store.get_blob(sha) == data


def test_put_blob_skips_an_existing_blob(s3_server: Any) -> None:
    recording = RecordingClient(s3_server.client())
    store = S3Store(recording, s3_server.bucket, "t/idempotent-" + hashlib.md5(b"x").hexdigest())
    store.put_blob(b"once")
    recording.calls.clear()

    store.put_blob(b"once")

    assert recording.calls == ["head_object"]


def test_get_blob_checks_the_bytes_on_every_read(s3_server: Any, s3_store: S3Store) -> None:
    # Prepare: a good read first, so a cache could not explain the second one.
    sha = s3_store.put_blob(b"the real bytes")
    assert s3_store.get_blob(sha) == b"the real bytes"
    key = raw_key(s3_store, "blobs", sha)
    s3_server.client().put_object(Bucket=s3_store.bucket, Key=key, Body=b"other bytes!!!")

    # Execute / Assert
    with pytest.raises(IntegrityError, match=sha):
        s3_store.get_blob(sha)


def test_large_blob_goes_up_in_parts(s3_server: Any) -> None:
    # Prepare: 5 MiB parts (S3's minimum) and an 11 MiB blob make three parts.
    store = s3_server.store(multipart_threshold=5 * MIB, part_size=5 * MIB)
    data = hashlib.sha256(b"seed").digest() * (11 * MIB // 32)
    small = b"under the threshold"

    # Execute
    sha = store.put_blob(data)
    small_sha = store.put_blob(small)

    # Assert: a multipart object's ETag ends in "-<number of parts>".
    client = s3_server.client()
    etag = client.head_object(Bucket=store.bucket, Key=raw_key(store, "blobs", sha))["ETag"]
    small_etag = client.head_object(Bucket=store.bucket, Key=raw_key(store, "blobs", small_sha))[
        "ETag"
    ]
    assert etag.strip('"').endswith("-3")
    assert "-" not in small_etag
    assert store.get_blob(sha) == data
    uploads = client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    assert uploads.get("Uploads", []) == []


@pytest.mark.parametrize(
    "options",
    [{"part_size": 5 * MIB - 1}, {"multipart_threshold": 0}, {"download_ttl_s": 0}],
)
def test_invalid_settings_are_refused(s3_server: Any, options: dict[str, Any]) -> None:
    with pytest.raises(StoreError):
        S3Store(s3_server.client(), s3_server.bucket, "t/x", **options)


# -- manifests -------------------------------------------------------------------


def test_versions_are_listed_across_pages_and_stray_keys_ignored(
    s3_server: Any, s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: two keys a page, so five versions take three pages.
    monkeypatch.setattr(s3_module, "_LIST_PAGE_SIZE", 2)
    for version in (0, 1, 2, 3, 11):
        s3_store.publish("digits", version, {"w": (b"v%d" % version, "x/y")}, parent=None)
    s3_store.publish("digits-2", 40, {"w": (b"other", "x/y")}, parent=None)
    client = s3_server.client()
    for stray in ("notes.txt", "sub/00000099.json", "00000077.json.tmp"):
        client.put_object(Bucket=s3_store.bucket, Key=raw_key(s3_store, "models", "digits", stray))

    # Execute / Assert
    assert sorted(s3_store._list_versions("digits")) == [0, 1, 2, 3, 11]
    assert s3_store.latest_version("digits") == 11
    assert s3_store.latest_version("digits-2") == 40


def test_manifest_create_is_a_conditional_put(s3_store: S3Store) -> None:
    first = s3_store._create_manifest("m", 0, b'{"first": true}')
    second = s3_store._create_manifest("m", 0, b'{"second": true}')

    assert first is None
    assert second == b'{"first": true}'
    assert s3_store._read_manifest("m", 0) == b'{"first": true}'


# -- open_store ------------------------------------------------------------------


def test_open_store_parses_an_s3_url(s3_server: Any, aws_env: None) -> None:
    url = f"s3://{s3_server.bucket}/team/runs-1/?endpoint_url={s3_server.endpoint_url}&region=eu-west-1"

    store = open_store(url)

    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == (s3_server.bucket, "team/runs-1")
    sha = store.put_blob(b"through the URL")
    assert store.get_blob(sha) == b"through the URL"
    assert "eu-west-1" in parse_qs(urlsplit(store.blob_url(sha)).query)["X-Amz-Credential"][0]


def test_open_store_without_prefix_or_region(s3_server: Any, aws_env: None) -> None:
    store = open_store(f"s3://{s3_server.bucket}?endpoint_url={s3_server.endpoint_url}")

    assert isinstance(store, S3Store)
    assert store.prefix == ""
    assert "us-east-1" in store.presign_upload("x")


@pytest.mark.parametrize(
    "url",
    [
        "s3://",
        "s3:///prefix",
        "s3://ab/prefix",
        "s3://Upper-Case/prefix",
        "s3://user:secret@bucket-name/prefix",
        "s3://bucket-name:9000/prefix",
        "s3://bucket-name/a/../b",
        "s3://bucket-name/a//b",
        "s3://bucket-name/p#frag",
        "s3://bucket-name/p?endpoint_url=ftp://host",
        "s3://bucket-name/p?endpoint_url=http://",
        "s3://bucket-name/p?endpoint_url=http://k:s@host",
        "s3://bucket-name/p?endpoint_url=http://h:1&endpoint_url=http://h:2",
        "s3://bucket-name/p?regoin=us-east-1",
        "s3://bucket-name/p?region=Not_A_Region",
    ],
)
def test_bad_s3_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreError):
        open_store(url)


def test_importing_model_store_does_not_load_boto3() -> None:
    code = (
        "import sys, model_store\n"
        "model_store.S3Store\n"
        "print(sorted(m for m in ('boto3', 'botocore', 'moto') if m in sys.modules))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(model_store.__file__).parents[1],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert result.stdout.strip() == "[]"


# -- errors at the boundary ------------------------------------------------------


def test_missing_bucket_is_named(s3_server: Any) -> None:
    store = S3Store(s3_server.client(), "no-such-bucket-here", "p")

    with pytest.raises(StoreError, match="does not exist"):
        store.put_blob(b"x")
    with pytest.raises(StoreError, match="does not exist"):
        store.get_blob(hashlib.sha256(b"x").hexdigest())


def test_wrong_credentials_are_access_denied(s3_server: Any) -> None:
    store = S3Store(s3_server.client(access_key="not-a-key"), s3_server.bucket, "p")

    with pytest.raises(StoreError, match="access denied") as caught:
        store.put_blob(b"x")

    assert "fedmq-test-secret" not in str(caught.value)


def test_missing_credentials_are_named(
    s3_server: Any, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe
    store = open_store(f"s3://{s3_server.bucket}/p?endpoint_url={s3_server.endpoint_url}")

    with pytest.raises(StoreError, match="no S3 credentials"):
        store.put_blob(b"x")
    with pytest.raises(StoreError, match="no S3 credentials"):
        store.presign_upload("x")


def test_unreachable_endpoint_is_store_unavailable(s3_server: Any) -> None:
    port = free_port()  # nothing listens on it
    client = s3_server.client(
        endpoint_url=f"http://127.0.0.1:{port}", retries={"max_attempts": 1}, connect_timeout=1
    )
    dead = S3Store(client, s3_server.bucket)

    with pytest.raises(StoreUnavailable, match="unreachable"):
        dead.has_blob(hashlib.sha256(b"x").hexdigest())


# -- presigned device access -----------------------------------------------------


def test_presigned_get_works_with_plain_urllib(s3_store: S3Store) -> None:
    sha = s3_store.put_blob(b"global model")

    url = s3_store.presign_download(sha)

    assert fetch(url) == b"global model"
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["900"]
    assert urlsplit(s3_store.blob_url(sha)).path.endswith(sha)


def test_presigned_get_expires(s3_server: Any, s3_store: S3Store) -> None:
    sha = s3_store.put_blob(b"short-lived")
    url = s3_store.presign_download(sha, ttl_s=30)

    assert http_status(url) == 200
    # Margins of seconds each way: the URL's signing time is whole seconds, and a
    # loaded machine takes a while between the signing and the request.
    with s3_server.clock_ahead(25):
        assert http_status(url) == 200
    with s3_server.clock_ahead(35):
        assert http_status(url) == 403


def test_tampered_presigned_urls_are_refused(s3_store: S3Store) -> None:
    sha = s3_store.put_blob(b"mine")
    other = s3_store.put_blob(b"someone else's")
    url = s3_store.presign_download(sha)
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    flipped = ("0" if signature[0] != "0" else "1") + signature[1:]

    assert http_status(url.replace(signature, flipped)) == 403
    assert http_status(url.replace(sha, other)) == 403
    assert http_status(url.replace("X-Amz-Expires=900", "X-Amz-Expires=9000")) == 403
    assert http_status(url, data=b"overwrite", content_type="application/octet-stream") == 403
    assert s3_store.get_blob(sha) == b"mine"


def test_missing_blob_cannot_be_presigned(s3_store: S3Store) -> None:
    with pytest.raises(ArtifactNotFound):
        s3_store.presign_download(hashlib.sha256(b"absent").hexdigest())


def test_device_upload_is_claimed_into_a_blob(s3_server: Any, s3_store: S3Store) -> None:
    # Prepare
    update = b"device update " * 5000
    sha = hashlib.sha256(update).hexdigest()
    url = s3_store.presign_upload("exp1-3-device7")

    # Execute: the device PUTs, the worker claims.
    fetch(url, data=update, content_type="application/octet-stream")
    claimed = s3_store.claim_upload("exp1-3-device7", sha)

    # Assert
    assert claimed == update
    assert s3_store.get_blob(sha) == update
    listing = s3_server.client().list_objects_v2(
        Bucket=s3_store.bucket, Prefix=raw_key(s3_store, "uploads") + "/"
    )
    assert listing.get("Contents", []) == []
    assert s3_store.claim_upload("exp1-3-device7", sha) == update  # a retried claim


def test_upload_without_the_signed_content_type_is_refused(s3_store: S3Store) -> None:
    # urllib's default form type would make moto store 0 bytes and answer 200.
    url = s3_store.presign_upload("no-type")

    assert http_status(url, data=b"bytes") == 403
    with pytest.raises(ArtifactNotFound):
        s3_store.claim_upload("no-type", hashlib.sha256(b"bytes").hexdigest())


def test_claim_with_a_wrong_checksum_is_refused(s3_store: S3Store) -> None:
    fetch(s3_store.presign_upload("liar"), data=b"actual", content_type="application/octet-stream")
    announced = hashlib.sha256(b"announced").hexdigest()

    with pytest.raises(IntegrityError, match="liar"):
        s3_store.claim_upload("liar", announced)

    assert not s3_store.has_blob(announced)
    assert not s3_store.has_blob(hashlib.sha256(b"actual").hexdigest())


def test_claim_never_overwrites_an_existing_blob(s3_server: Any, s3_store: S3Store) -> None:
    # Prepare: the blob exists; copying the upload over it is not needed.
    sha = s3_store.put_blob(b"shared weights")
    recording = RecordingClient(s3_server.client())
    store = S3Store(recording, s3_store.bucket, s3_store.prefix)
    fetch(
        store.presign_upload("dup"), data=b"shared weights", content_type="application/octet-stream"
    )

    # Execute
    assert store.claim_upload("dup", sha) == b"shared weights"

    # Assert
    assert "copy_object" not in recording.calls
    assert "delete_object" in recording.calls


def test_oversized_upload_is_not_read(s3_server: Any) -> None:
    store = s3_server.store(max_upload_bytes=10)
    fetch(store.presign_upload("big"), data=b"x" * 11, content_type="application/octet-stream")

    with pytest.raises(StoreError, match="more than the 10 allowed"):
        store.claim_upload("big", hashlib.sha256(b"x" * 11).hexdigest())


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "x" * 201, "ü", "a\\b"])
def test_bad_upload_names_are_refused(s3_store: S3Store, name: str) -> None:
    with pytest.raises(StoreError, match="invalid upload name"):
        s3_store.presign_upload(name)
    with pytest.raises(StoreError, match="invalid upload name"):
        s3_store.claim_upload(name, hashlib.sha256(b"x").hexdigest())


def test_claim_of_nothing_is_not_found(s3_store: S3Store) -> None:
    with pytest.raises(ArtifactNotFound):
        s3_store.claim_upload("never-uploaded", hashlib.sha256(b"x").hexdigest())
