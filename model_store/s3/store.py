"""``S3Store``: a model store in an S3 bucket (AWS S3, MinIO, moto).

Layout under ``s3://BUCKET/PREFIX/``::

    blobs/<sha256>                     one object per blob, named by its sha256
    models/<model_id>/00000003.json    one manifest per version
    uploads/<name>                     device uploads waiting for ``claim_upload``

Devices never hold store credentials: they GET blobs and PUT their updates
through presigned URLs (``PresignedAccess``), and the worker claims an upload
by checking its sha256 before filing it as a blob.

boto3 is imported only when ``from_url`` builds a client, so importing this
module (or ``model_store``) does not load it. botocore's errors are translated
into the ``StoreError`` tree at this class's methods (``_errors``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

from model_store.errors import ArtifactNotFound, StoreError
from model_store.manifest import check_sha256
from model_store.s3._config import BUCKET, check_prefix, expires_in, make_client, parse_url
from model_store.s3._errors import BUSY, EXISTS, MISSING, botocore_errors, error_code, translate
from model_store.store import StoreBase, check_upload_name, verified

__all__ = ["DEFAULT_TTL_S", "UPLOAD_CONTENT_TYPE", "S3Store"]

_MIB = 1024 * 1024
#: Default lifetime of presigned URLs, in seconds.
DEFAULT_TTL_S = 15 * 60.0
#: What a device must send as Content-Type with a presigned PUT: it is signed
#: into the URL, so a client sending a form type (which some servers store as
#: an empty object) is refused instead of silently losing the bytes.
UPLOAD_CONTENT_TYPE = "application/octet-stream"
_MIN_PART = 5 * _MIB  # S3 refuses smaller parts (except the last one)
_MAX_PARTS = 10_000
_MAX_SINGLE_PUT = 5 * 1024 * _MIB
_LIST_PAGE_SIZE = 1000
_CONFLICT_ATTEMPTS = 5
_VERSION_KEY = re.compile(r"(\d{8,})\.json")


class S3Store(StoreBase):
    """A model store in an S3 bucket, with presigned device access.

    Parameters
    ----------
    client
        A boto3 S3 client (injected; ``from_url`` builds one). For MinIO or
        moto it needs ``signature_version="s3v4"`` and path-style addressing.
    bucket
        The bucket; it must exist.
    prefix
        Key prefix under which the store lives (``""`` for the bucket root).
    download_ttl_s, upload_ttl_s
        Default lifetimes of presigned GET and PUT URLs (1 s to 7 days).
    multipart_threshold
        Blobs larger than this many bytes go up as a multipart upload.
    part_size
        Size of each part of a multipart upload (at least 5 MiB).
    max_upload_bytes
        Largest device upload ``claim_upload`` reads into memory.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        download_ttl_s: float = DEFAULT_TTL_S,
        upload_ttl_s: float = DEFAULT_TTL_S,
        multipart_threshold: int = 8 * _MIB,
        part_size: int = 8 * _MIB,
        max_upload_bytes: int = 1024 * _MIB,
    ) -> None:
        """Check the settings; no request is made."""
        if not isinstance(bucket, str) or not BUCKET.fullmatch(bucket):
            raise StoreError(f"invalid S3 bucket name {bucket!r}: 3-63 of [a-z0-9.-]")
        if not 0 < multipart_threshold <= _MAX_SINGLE_PUT:
            raise StoreError(
                f"multipart_threshold must be in (0, 5 GiB], got {multipart_threshold}"
            )
        if part_size < _MIN_PART:
            raise StoreError(f"part_size must be at least 5 MiB (S3's minimum), got {part_size}")
        if max_upload_bytes <= 0:
            raise StoreError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
        self._client = client
        self.bucket = bucket
        self.prefix = check_prefix(prefix)
        self._download_ttl = expires_in(download_ttl_s)
        self._upload_ttl = expires_in(upload_ttl_s)
        self._threshold = multipart_threshold
        self._part_size = part_size
        self._max_upload = max_upload_bytes

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        """Open ``s3://BUCKET/PREFIX?endpoint_url=URL&region=NAME``.

        Parameters
        ----------
        url
            The store URL. ``endpoint_url`` (MinIO, moto) and ``region`` are
            optional: without them boto3 talks to AWS, in the region of its
            configuration (``AWS_DEFAULT_REGION``, profile) or us-east-1.
            Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``
            and ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role).

        Returns
        -------
        S3Store
            A store on a new client (path-style addressing, SigV4).
        """
        bucket, prefix, options = parse_url(url)
        client = make_client(options.get("endpoint_url"), options.get("region"))
        return cls(client, bucket, prefix)

    def __repr__(self) -> str:
        """Show where the store lives (never the credentials)."""
        endpoint = getattr(getattr(self._client, "meta", None), "endpoint_url", None)
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={endpoint!r})"

    # -- blobs ---------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 (idempotent) and return the hex digest.

        Parameters
        ----------
        data
            The bytes to store; above ``multipart_threshold`` they go up in
            parts.

        Returns
        -------
        str
            The lowercase hex sha256 of ``data``.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        self._put_blob_hashed(data, sha256)
        return sha256

    def _put_blob_hashed(self, data: bytes, sha256: str) -> None:
        """Upload ``data`` as the blob ``sha256`` (the caller hashed it), unless it is there."""
        key = self._blob_key(sha256)
        # Same key means same content, so an object of the right size is kept
        # (its bytes are checked on every read); a truncated one is rewritten.
        if self._size(key) == len(data):
            return
        with self._errors(f"write blob {sha256}"):
            if len(data) > self._threshold:
                self._put_multipart(key, bytes(data))
            else:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))

    def get_blob(self, sha256: str, *, verify: bool = True) -> bytes:
        """Return the blob after checking its checksum.

        Parameters
        ----------
        sha256
            The blob's hex digest.
        verify
            False: skip the checksum (see ``StoreBase.get_blob``).

        Returns
        -------
        bytes
            The blob; ``ArtifactNotFound`` if absent, ``IntegrityError`` if
            the object no longer hashes to ``sha256``.
        """
        data = self._get(self._blob_key(sha256), f"read blob {sha256}")
        if data is None:
            raise ArtifactNotFound(f"no blob {sha256} in s3://{self.bucket}/{self.prefix}")
        return verified(data, sha256, f"blob in bucket {self.bucket!r}") if verify else data

    def has_blob(self, sha256: str) -> bool:
        """Tell whether the blob is stored.

        Parameters
        ----------
        sha256
            The blob's hex digest.

        Returns
        -------
        bool
            True if an object exists under its key (its content is checked
            on read). A missing bucket also answers False: S3 gives a HEAD
            of either the same bodiless 404.
        """
        return self._size(self._blob_key(sha256)) is not None

    def blob_url(self, sha256: str) -> str:
        """Return a presigned GET URL of the blob, valid for ``download_ttl_s``.

        Parameters
        ----------
        sha256
            The blob's hex digest.

        Returns
        -------
        str
            An ``http(s)`` URL anyone holding it may GET until it expires;
            ``ArtifactNotFound`` if the blob is absent.
        """
        return self.presign_download(sha256)

    # -- presigned device access -------------------------------------------------

    def presign_download(self, sha256: str, ttl_s: float | None = None) -> str:
        """Return a presigned GET URL of a blob.

        Parameters
        ----------
        sha256
            The blob's hex digest; ``ArtifactNotFound`` if it is absent.
        ttl_s
            Lifetime in seconds (rounded up; 1 s to 7 days), default
            ``download_ttl_s``.

        Returns
        -------
        str
            The URL.
        """
        if not self.has_blob(sha256):
            raise ArtifactNotFound(f"no blob {sha256} in s3://{self.bucket}/{self.prefix}")
        expires = self._download_ttl if ttl_s is None else expires_in(ttl_s)
        params = {"Bucket": self.bucket, "Key": self._blob_key(sha256)}
        return self._presign("get_object", params, expires)

    def presign_upload(self, name: str, ttl_s: float | None = None) -> str:
        """Return a presigned PUT URL for one upload filed under ``uploads/<name>``.

        The device must send ``Content-Type: application/octet-stream`` (it
        is part of the signature). Nothing bounds the size a device sends;
        ``claim_upload`` refuses more than ``max_upload_bytes``, and a bucket
        lifecycle rule on ``uploads/`` should expire what is never claimed.

        Parameters
        ----------
        name
            1-200 of ``[A-Za-z0-9._-]``, not ``.`` or ``..``.
        ttl_s
            Lifetime in seconds (rounded up; 1 s to 7 days), default
            ``upload_ttl_s``.

        Returns
        -------
        str
            The URL.
        """
        key = self._upload_key(name)
        expires = self._upload_ttl if ttl_s is None else expires_in(ttl_s)
        params = {"Bucket": self.bucket, "Key": key, "ContentType": UPLOAD_CONTENT_TYPE}
        return self._presign("put_object", params, expires)

    def claim_upload(self, name: str, sha256: str) -> bytes:
        """Verify the upload ``name`` against ``sha256``, file it as a blob, return its bytes.

        Parameters
        ----------
        name
            The name the upload URL was presigned for.
        sha256
            The digest the device announced for its upload.

        Returns
        -------
        bytes
            The verified bytes. ``IntegrityError`` if they hash to something
            else (the upload is left for inspection), ``ArtifactNotFound`` if
            there is no upload and no such blob. Claiming again after success
            returns the blob.
        """
        check_sha256(sha256)
        key = self._upload_key(name)
        fetched = self._get_upload(key, name)
        if fetched is None:
            if self.has_blob(sha256):
                return self.get_blob(sha256)
            raise ArtifactNotFound(f"no upload {name!r} and no blob {sha256}")
        data, etag = fetched
        verified(data, sha256, f"upload {name!r}")
        # An existing blob is never overwritten from an upload: a device that
        # swapped its object between our read and the copy could otherwise
        # replace a blob other models use.
        if not self.has_blob(sha256):
            with self._errors(f"file upload {name!r} as blob {sha256}"):
                # If-Match pins the copy to the bytes just verified (AWS and
                # MinIO honour it; moto ignores it).
                self._client.copy_object(
                    Bucket=self.bucket,
                    Key=self._blob_key(sha256),
                    CopySource={"Bucket": self.bucket, "Key": key},
                    CopySourceIfMatch=etag,
                )
        with self._errors(f"delete upload {name!r}"):
            self._client.delete_object(Bucket=self.bucket, Key=key)
        return data

    # -- manifests -------------------------------------------------------------

    def _read_manifest(self, model_id: str, version: int) -> bytes | None:
        """Return the manifest document, or None if there is none."""
        key = self._manifest_key(model_id, version)
        return self._get(key, f"read manifest {model_id!r} v{version}")

    def _create_manifest(self, model_id: str, version: int, data: bytes) -> bytes | None:
        """Create the manifest unless it exists (conditional PUT); return the existing bytes if so.

        ``If-None-Match: *`` makes the create atomic on AWS S3 (since 2024),
        recent MinIO and moto. A server that ignores the header overwrites
        instead, so two concurrent publishers of one version would both
        "win" there, the last write staying.
        """
        key = self._manifest_key(model_id, version)
        what = f"write manifest {model_id!r} v{version}"
        client_error = botocore_errors().ClientError
        for _ in range(_CONFLICT_ATTEMPTS):
            with self._errors(what):
                try:
                    self._client.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=data,
                        ContentType="application/json",
                        IfNoneMatch="*",
                    )
                    return None
                except client_error as exc:
                    # 412: it exists. 409: a concurrent conditional write is
                    # in flight (AWS); read, and retry if it has not landed.
                    if error_code(exc) not in EXISTS | BUSY:
                        raise
            existing = self._read_manifest(model_id, version)
            if existing is not None:
                return existing
        raise StoreError(f"{what}: conflicting concurrent writes, giving up")

    def _list_versions(self, model_id: str) -> list[int]:
        """Return the versions that have a manifest object (all pages)."""
        folder = self._key("models", model_id) + "/"
        versions: list[int] = []
        with self._errors(f"list versions of {model_id!r}"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket,
                Prefix=folder,
                PaginationConfig={"PageSize": _LIST_PAGE_SIZE},
            )
            for page in pages:
                for item in page.get("Contents", []):
                    match = _VERSION_KEY.fullmatch(item["Key"][len(folder) :])
                    if match:
                        versions.append(int(match.group(1)))
        return versions

    # -- S3 primitives -------------------------------------------------------

    def _key(self, *parts: str) -> str:
        """Join key parts under the prefix."""
        return "/".join((self.prefix, *parts) if self.prefix else parts)

    def _blob_key(self, sha256: str) -> str:
        """Return a blob's key (the digest is validated: it becomes a key)."""
        return self._key("blobs", check_sha256(sha256))

    def _manifest_key(self, model_id: str, version: int) -> str:
        """Return a manifest's key; ids are validated by the base class."""
        return self._key("models", model_id, f"{version:08d}.json")

    def _upload_key(self, name: str) -> str:
        """Return an upload's key after validating its name."""
        return self._key("uploads", check_upload_name(name))

    def _unless_missing(self, operation: Callable[..., Any], key: str) -> Any:
        """Call a boto3 object operation on ``key``; return None if there is no such object."""
        try:
            return operation(Bucket=self.bucket, Key=key)
        except botocore_errors().ClientError as exc:
            if error_code(exc) in MISSING:
                return None
            raise

    def _size(self, key: str) -> int | None:
        """Return an object's size, or None if there is none."""
        with self._errors(f"look up {key}"):
            head = self._unless_missing(self._client.head_object, key)
            return None if head is None else int(head["ContentLength"])

    def _get(self, key: str, what: str) -> bytes | None:
        """Return an object's bytes, or None if there is none."""
        with self._errors(what):
            response = self._unless_missing(self._client.get_object, key)
            if response is None:
                return None
            data: bytes = response["Body"].read()
            return data

    def _get_upload(self, key: str, name: str) -> tuple[bytes, str] | None:
        """Return an upload's bytes and ETag, or None if there is none; refuse oversized ones."""
        with self._errors(f"read upload {name!r}"):
            response = self._unless_missing(self._client.get_object, key)
            if response is None:
                return None
            body = response["Body"]
            if response["ContentLength"] > self._max_upload:
                body.close()
                raise StoreError(
                    f"upload {name!r} has {response['ContentLength']} bytes, "
                    f"more than the {self._max_upload} allowed"
                )
            data: bytes = body.read()
            etag: str = response["ETag"]
            return data, etag

    def _put_multipart(self, key: str, data: bytes) -> None:
        """Upload ``data`` in parts; abort the upload if any step fails."""
        part_size = max(self._part_size, math.ceil(len(data) / _MAX_PARTS))
        # CRC32 part checksums, as boto3's own transfer manager sends them.
        started = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32"
        )
        upload_id = started["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, len(data), part_size), start=1):
                answer = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data[start : start + part_size],
                    ChecksumAlgorithm="CRC32",
                )
                part = {"PartNumber": number, "ETag": answer["ETag"]}
                if "ChecksumCRC32" in answer:
                    part["ChecksumCRC32"] = answer["ChecksumCRC32"]
                parts.append(part)
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # Uncompleted parts are billed storage until aborted.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def _presign(self, method: str, params: dict[str, str], expires: int) -> str:
        """Return a presigned URL of ``method`` (signing is local: no request)."""
        with self._errors(f"presign {method} {params['Key']}"):
            url: str = self._client.generate_presigned_url(method, Params=params, ExpiresIn=expires)
            return url

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate botocore's errors raised inside the block into the StoreError tree."""
        botocore = botocore_errors()
        try:
            yield
        except (botocore.ClientError, botocore.BotoCoreError) as exc:
            raise translate(exc, action, self.bucket) from exc
