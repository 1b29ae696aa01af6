"""``MemoryStore``: an in-process model store for tests and simulations."""

from __future__ import annotations

import hashlib
import threading

from model_store.errors import ArtifactNotFound
from model_store.manifest import check_sha256
from model_store.store import StoreBase, verified

__all__ = ["MemoryStore"]


class MemoryStore(StoreBase):
    """A model store held in dictionaries; safe to share between threads."""

    def __init__(self) -> None:
        """Start empty."""
        self._lock = threading.Lock()
        self._blobs: dict[str, bytes] = {}
        self._manifests: dict[tuple[str, int], bytes] = {}

    @classmethod
    def from_url(cls, url: str) -> MemoryStore:
        """Open ``memory://``: every call gives a new, empty store.

        Parameters
        ----------
        url
            The store URL; anything after the scheme is ignored.

        Returns
        -------
        MemoryStore
            A new store (no process-wide registry, so tests stay isolated).
        """
        return cls()

    def __repr__(self) -> str:
        """Show how much is stored."""
        return f"MemoryStore(blobs={len(self._blobs)}, manifests={len(self._manifests)})"

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 (idempotent) and return the hex digest.

        Parameters
        ----------
        data
            The bytes to store.

        Returns
        -------
        str
            The lowercase hex sha256 of ``data``.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        self._put_blob_hashed(data, sha256)
        return sha256

    def _put_blob_hashed(self, data: bytes, sha256: str) -> None:
        """Keep ``data`` as the blob ``sha256`` (the caller hashed it)."""
        with self._lock:
            # bytes(...) so a caller's bytearray cannot change a stored blob.
            self._blobs.setdefault(sha256, bytes(data))

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
            The blob; ``ArtifactNotFound`` if absent.
        """
        check_sha256(sha256)
        with self._lock:
            data = self._blobs.get(sha256)
        if data is None:
            raise ArtifactNotFound(f"no blob {sha256} in memory store")
        # Cheap next to the cost of using the blob, and keeps the contract
        # identical to the backends whose storage can rot.
        return verified(data, sha256, "blob in memory") if verify else data

    def has_blob(self, sha256: str) -> bool:
        """Tell whether the blob is stored.

        Parameters
        ----------
        sha256
            The blob's hex digest.

        Returns
        -------
        bool
            True if stored.
        """
        check_sha256(sha256)
        with self._lock:
            return sha256 in self._blobs

    def blob_url(self, sha256: str) -> str:
        """Return a ``memory://blobs/<sha256>`` address.

        Parameters
        ----------
        sha256
            The blob's hex digest.

        Returns
        -------
        str
            An address meaningful only to code holding this store object.
        """
        if not self.has_blob(sha256):
            raise ArtifactNotFound(f"no blob {sha256} in memory store")
        return f"memory://blobs/{sha256}"

    def _read_manifest(self, model_id: str, version: int) -> bytes | None:
        """Return the manifest document, or None if there is none."""
        with self._lock:
            return self._manifests.get((model_id, version))

    def _create_manifest(self, model_id: str, version: int, data: bytes) -> bytes | None:
        """Store the manifest unless the version exists; return the existing bytes if so."""
        with self._lock:
            existing = self._manifests.setdefault((model_id, version), data)
        return None if existing is data else existing

    def _list_versions(self, model_id: str) -> list[int]:
        """Return the stored versions of a model."""
        with self._lock:
            return [v for (m, v) in self._manifests if m == model_id]
