"""The ``ModelStore`` interface, the shared base for backends, and ``open_store``."""

from __future__ import annotations

import hashlib
import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol, cast, runtime_checkable
from urllib.parse import urlsplit

from model_store.errors import ArtifactNotFound, IntegrityError, ManifestError, StoreError
from model_store.manifest import Artifact, Manifest, check_model_id, utc_now

__all__ = [
    "STORE_ALIASES",
    "ModelStore",
    "PresignedAccess",
    "StoreBase",
    "check_upload_name",
    "open_store",
]

# Upload names become object keys and URL path parts: no separators, and not
# "." or ".." (which an HTTP client may normalise away).
_UPLOAD_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")


@runtime_checkable
class ModelStore(Protocol):
    """Content-addressed blobs plus versioned manifests that name them."""

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 (idempotent) and return the hex digest."""
        ...

    def get_blob(self, sha256: str, *, verify: bool = True) -> bytes:
        """Return the blob, checking its checksum unless told it was checked on the way in."""
        ...

    def has_blob(self, sha256: str) -> bool:
        """Tell whether the blob is stored."""
        ...

    def blob_url(self, sha256: str) -> str:
        """Return an address a device can fetch the blob from."""
        ...

    def put_manifest(self, manifest: Manifest) -> None:
        """Store a manifest; refuse to replace a different one of that version."""
        ...

    def get_manifest(self, model_id: str, version: int) -> Manifest:
        """Return the manifest of one model version."""
        ...

    def latest_version(self, model_id: str) -> int | None:
        """Return the highest stored version of a model, or None."""
        ...

    def publish(
        self,
        model_id: str,
        version: int,
        artifacts: Mapping[str, tuple[bytes, str]],
        *,
        parent: int | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Store the artifacts' bytes, then the manifest naming them."""
        ...


def verified(data: bytes, sha256: str, what: str) -> bytes:
    """Return ``data`` if it hashes to ``sha256``; else raise ``IntegrityError`` naming ``what``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise IntegrityError(f"{what} hashes to {actual}, expected {sha256}")
    return data


@runtime_checkable
class PresignedAccess(Protocol):
    """A store devices reach directly through presigned URLs (an object store).

    A device never holds store credentials: it gets a URL that allows one
    method on one object for a short time (``ttl_s``, the store's default when
    None). A device PUTs its bytes with ``Content-Type:
    application/octet-stream``; upload names pass ``check_upload_name``.
    """

    def presign_download(self, sha256: str, ttl_s: float | None = None) -> str:
        """Return a presigned GET URL of a blob (``ArtifactNotFound`` if absent)."""
        ...

    def presign_upload(self, name: str, ttl_s: float | None = None) -> str:
        """Return a presigned PUT URL for one upload filed under ``name``."""
        ...

    def claim_upload(self, name: str, sha256: str) -> bytes:
        """Verify the upload ``name`` against ``sha256``, file it as a blob, return its bytes.

        ``IntegrityError`` if the bytes hash to something else,
        ``ArtifactNotFound`` if there is neither the upload nor the blob; a
        repeated claim returns the blob.
        """
        ...


def check_upload_name(name: str) -> str:
    """Return ``name`` if it may name a device upload, else raise ``StoreError``.

    Parameters
    ----------
    name
        1-200 of ``[A-Za-z0-9._-]``, not ``.`` or ``..``.

    Returns
    -------
    str
        The same name.
    """
    if not isinstance(name, str) or not _UPLOAD_NAME.fullmatch(name) or name in (".", ".."):
        raise StoreError(f"invalid upload name {name!r}: use 1-200 of [A-Za-z0-9._-]")
    return name


class StoreBase(ABC):
    """Manifest logic and ``publish`` on top of a backend's storage primitives.

    A backend implements the four blob methods and three manifest primitives
    (``_read_manifest``, ``_create_manifest``, ``_list_versions``); the
    validation, conflict rules and publish order live here, once.
    """

    @abstractmethod
    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 (idempotent) and return the hex digest."""

    def _put_blob_hashed(self, data: bytes, sha256: str) -> None:
        """Store ``data``, whose sha256 the caller has just computed, under ``sha256``.

        ``publish`` hashes each artifact for its manifest; a backend overrides
        this to file the bytes without hashing them a second time (a worker's
        checkpoint is megabytes). This default hashes again, through ``put_blob``.
        """
        if self.put_blob(data) != sha256:
            raise StoreError(f"backend filed a blob under another digest than {sha256}")

    @abstractmethod
    def get_blob(self, sha256: str, *, verify: bool = True) -> bytes:
        """Return the blob; ``IntegrityError`` on a bad checksum, else ``ArtifactNotFound``.

        ``verify=False`` skips the checksum, for a blob this store's own
        ``put_blob`` named by hashing it (an upload the service received): its
        name is its digest by construction, and hashing it again costs as much
        as the first time (48 ms of a worker's 101 ms per 16 MB update).
        """

    @abstractmethod
    def has_blob(self, sha256: str) -> bool:
        """Tell whether the blob is stored."""

    @abstractmethod
    def blob_url(self, sha256: str) -> str:
        """Return an address a device can fetch the blob from."""

    @abstractmethod
    def _read_manifest(self, model_id: str, version: int) -> bytes | None:
        """Return the stored manifest document, or None if there is none."""

    @abstractmethod
    def _create_manifest(self, model_id: str, version: int, data: bytes) -> bytes | None:
        """Atomically store ``data`` unless the version exists; return the existing bytes if so."""

    @abstractmethod
    def _list_versions(self, model_id: str) -> Iterable[int]:
        """Yield the stored versions of a model, in any order."""

    def put_manifest(self, manifest: Manifest) -> None:
        """Store a manifest whose blobs are all present.

        Storing the same content again is a no-op (``created_at`` aside), so
        a retried publish succeeds; a different manifest for an existing
        version raises ``ManifestError``.

        Parameters
        ----------
        manifest
            The manifest to store.
        """
        self._put_manifest(manifest)

    def get_manifest(self, model_id: str, version: int) -> Manifest:
        """Return the manifest of one model version.

        Parameters
        ----------
        model_id
            The model.
        version
            The version number.

        Returns
        -------
        Manifest
            The stored manifest; ``ArtifactNotFound`` if there is none.
        """
        check_model_id(model_id)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise StoreError(f"invalid version {version!r}")
        data = self._read_manifest(model_id, version)
        if data is None:
            raise ArtifactNotFound(f"no manifest for {model_id!r} version {version}")
        manifest = Manifest.from_json(data)
        if (manifest.model_id, manifest.version) != (model_id, version):
            raise ManifestError(
                f"manifest filed as {model_id!r} v{version} describes "
                f"{manifest.model_id!r} v{manifest.version}"
            )
        return manifest

    def latest_version(self, model_id: str) -> int | None:
        """Return the highest stored version of a model.

        Parameters
        ----------
        model_id
            The model.

        Returns
        -------
        int or None
            The version, or None when the model has none.
        """
        check_model_id(model_id)
        return max(self._list_versions(model_id), default=None)

    def publish(
        self,
        model_id: str,
        version: int,
        artifacts: Mapping[str, tuple[bytes, str]],
        *,
        parent: int | None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Store the artifacts' bytes, then the manifest naming them.

        Blobs go first, so a crash in between leaves only unreferenced blobs,
        never a manifest pointing at missing data.

        Parameters
        ----------
        model_id
            The model.
        version
            The new version number.
        artifacts
            ``name -> (bytes, media type)``.
        parent
            The version this one derives from, or None for a first version.
        metadata
            JSON-able extra information (parameter shapes, spec, ...).

        Returns
        -------
        Manifest
            The stored manifest (the earlier one if this exact content was
            already published).
        """
        entries = {
            name: Artifact(
                name=name,
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                media_type=media_type,
            )
            for name, (data, media_type) in artifacts.items()
        }
        # Built before any write so that bad input leaves nothing behind.
        manifest = Manifest(
            model_id=model_id,
            version=version,
            parent=parent,
            artifacts=entries,
            created_at=utc_now(),
            metadata=dict(metadata or {}),
        )
        for name, (data, _) in artifacts.items():
            self._put_blob_hashed(data, entries[name].sha256)
        return self._put_manifest(manifest)

    def _put_manifest(self, manifest: Manifest) -> Manifest:
        """Store ``manifest`` (see ``put_manifest``) and return the stored one."""
        missing = sorted(a.name for a in manifest.artifacts.values() if not self.has_blob(a.sha256))
        if missing:
            raise ManifestError(
                f"{manifest.model_id!r} v{manifest.version}: blobs not in the store for {missing}"
            )
        existing = self._create_manifest(manifest.model_id, manifest.version, manifest.to_json())
        if existing is None:
            return manifest
        stored = Manifest.from_json(existing)
        if not stored.same_content(manifest):
            raise ManifestError(
                f"{manifest.model_id!r} version {manifest.version} already exists "
                "with different content; versions are immutable"
            )
        return stored


class _StoreFactory(Protocol):
    """What an alias resolves to: a class with a ``from_url`` constructor."""

    def from_url(self, url: str) -> ModelStore:
        """Build a store from its URL."""
        ...


# scheme -> "module:Class". Backends are imported only when their scheme is
# asked for, so an optional dependency (boto3 for "s3") costs nothing until
# used (the kombu TRANSPORT_ALIASES pattern). Each class has from_url(url).
STORE_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "file": "model_store.local:LocalStore",
        "memory": "model_store.memory:MemoryStore",
        "s3": "model_store.s3:S3Store",
    }
)


def open_store(url: str) -> ModelStore:
    """Open the store a URL names.

    Parameters
    ----------
    url
        ``file:///ABSOLUTE/PATH`` for a local folder, ``memory://`` for a
        fresh in-process store,
        ``s3://BUCKET/PREFIX?endpoint_url=URL&region=NAME`` for an S3 bucket
        (``endpoint_url`` for MinIO or moto, both options optional;
        credentials from boto3's chain, e.g. ``AWS_ACCESS_KEY_ID`` and
        ``AWS_SECRET_ACCESS_KEY``; boto3 is imported only then).

    Returns
    -------
    ModelStore
        The backend for the URL's scheme.
    """
    scheme = urlsplit(url).scheme.lower() if isinstance(url, str) else ""
    target = STORE_ALIASES.get(scheme)
    if target is None:
        accepted = ", ".join(f"{s}://" for s in sorted(STORE_ALIASES))
        raise StoreError(f"unsupported store URL {url!r}: accepted schemes are {accepted}")
    module_name, _, class_name = target.partition(":")
    factory = cast(_StoreFactory, getattr(importlib.import_module(module_name), class_name))
    return factory.from_url(url)
