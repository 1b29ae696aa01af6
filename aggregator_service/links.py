"""Addresses devices get for artifacts: store URLs in-process, signed or presigned URLs otherwise.

A device never holds store credentials. With the local-folder store the
service itself serves blobs, through URLs that carry an expiry and an HMAC
over method, subject and expiry; anything else (a tampered hash, a stretched
expiry, a GET URL used to PUT) fails verification. With an object store (S3)
devices talk to the store directly through its own presigned URLs, and the
bytes never pass through the service.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlencode

from aggregator_service.errors import Forbidden
from model_store import ModelStore
from model_store.store import PresignedAccess


def upload_name(experiment_id: str, task_id: str) -> str:
    """Return the name a device's upload for one task is filed under.

    The coordinator signs an upload URL for this name and the worker claims
    the upload by it, from the update's own fields; one name per task, since
    an asynchronous experiment may give a device several tasks in one step.
    """
    return f"{experiment_id}-{task_id}"


class ArtifactLinks(Protocol):
    """Makes the URLs a task hands a device."""

    def download(self, sha256: str) -> str:
        """Return a URL the device may GET the blob from."""
        ...

    def upload(self, nonce: str) -> str | None:
        """Return a URL the device may PUT one large update to (None: updates go inline)."""
        ...


class StoreLinks:
    """The store's own URLs (``file://`` for a local folder): for in-process runs."""

    def __init__(self, store: ModelStore) -> None:
        self._store = store

    def download(self, sha256: str) -> str:
        """Return the store's URL for the blob."""
        return self._store.blob_url(sha256)

    def upload(self, nonce: str) -> str | None:
        """Return None: in-process devices send updates inline."""
        return None


class PresignedLinks:
    """The object store's own presigned URLs: devices GET and PUT without the service.

    Parameters
    ----------
    store
        A store that can presign (``S3Store``).
    ttl_s
        How long a URL stays valid; a task's URLs must outlive its deadline.
    """

    def __init__(self, store: PresignedAccess, *, ttl_s: float = 900.0) -> None:
        self._store = store
        self._ttl = ttl_s

    def download(self, sha256: str) -> str:
        """Return a presigned GET URL for a blob."""
        return self._store.presign_download(sha256, self._ttl)

    def upload(self, nonce: str) -> str:
        """Return a presigned PUT URL for one device upload, claimed later by the worker."""
        return self._store.presign_upload(nonce, self._ttl)


class SignedLinks:
    """Time-limited, HMAC-signed URLs to the service's blob endpoints.

    Parameters
    ----------
    secret
        The signing key (kept by the service only).
    base_url
        The service's public URL, e.g. ``http://10.0.0.5:8080``.
    ttl_s
        How long a URL stays valid.
    """

    def __init__(
        self,
        secret: bytes,
        base_url: str,
        *,
        ttl_s: float = 900.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the signing secret must be at least 16 bytes")
        self._secret = secret
        self._base = base_url.rstrip("/")
        self._ttl = ttl_s
        self._clock = clock

    def download(self, sha256: str) -> str:
        """Return a signed GET URL for a blob."""
        return self._url("GET", f"/api/v1/blobs/{sha256}")

    def upload(self, nonce: str) -> str:
        """Return a signed PUT URL that accepts one upload."""
        return self._url("PUT", f"/api/v1/uploads/{nonce}")

    def verify(self, method: str, path: str, expires: str | None, signature: str | None) -> None:
        """Raise ``Forbidden`` unless the URL was signed by us for this method and is unexpired."""
        if not expires or not signature or not expires.isdigit():
            raise Forbidden("this URL is not signed")
        if int(expires) < self._clock():
            raise Forbidden("this URL has expired; ask for a new task")
        expected = self._sign(method, path, int(expires))
        if not hmac.compare_digest(expected, signature):
            raise Forbidden("this URL's signature does not match")

    def _url(self, method: str, path: str) -> str:
        expires = int(self._clock() + self._ttl)
        query = urlencode({"expires": expires, "signature": self._sign(method, path, expires)})
        return f"{self._base}{path}?{query}"

    def _sign(self, method: str, path: str, expires: int) -> str:
        message = f"{method}\n{path}\n{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()
