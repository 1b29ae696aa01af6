"""Addresses devices get for artifacts: store URLs in-process, signed or presigned URLs otherwise.

A device never holds store credentials. With the local-folder store the
service itself serves blobs, through URLs that carry an expiry and an HMAC
over method, subject and expiry; anything else (a tampered hash, a stretched
expiry, a GET URL used to PUT) fails verification. A signed upload URL takes
one upload (``UploadLedger``). With an object store (S3) devices talk to the
store directly through its own presigned URLs, and the bytes never pass
through the service.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol
from urllib.parse import urlencode

from aggregator_service.errors import Conflict, Forbidden
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
        if not expires or not signature:
            raise Forbidden("this URL is not signed")
        # Shapes first: int() refuses some str.isdigit() digits ('²'), and
        # compare_digest raises on non-ASCII text.
        if not _EXPIRES.fullmatch(expires) or not _SIGNATURE.fullmatch(signature):
            raise Forbidden("this URL's signature or expiry is malformed")
        if int(expires) < self._clock():
            raise Forbidden("this URL has expired; ask for a new task")
        expected = self._sign(method, path, int(expires))
        if not hmac.compare_digest(expected, signature):
            raise Forbidden("this URL's signature does not match")

    def receipt(self, name: str) -> bytes:
        """Return the marker stored once an upload named ``name`` is in (no device can forge it)."""
        mac = hmac.new(self._secret, b"upload receipt\n" + _utf8(name), hashlib.sha256)
        return b"fedmq upload receipt v1\n" + mac.hexdigest().encode()

    def _url(self, method: str, path: str) -> str:
        expires = int(self._clock() + self._ttl)
        query = urlencode({"expires": expires, "signature": self._sign(method, path, expires)})
        return f"{self._base}{path}?{query}"

    def _sign(self, method: str, path: str, expires: int) -> str:
        message = _utf8(f"{method}\n{path}\n{expires}")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()


class UploadLedger:
    """One upload per signed upload URL, remembered in the store itself.

    Each accepted upload leaves a receipt blob, ``SignedLinks.receipt(name)``,
    whose hash is known from the name alone, so a service restarted on the same
    store and secret still refuses a second upload. The receipt is written after
    the bytes: a crash in between leaves the URL usable rather than spent.

    Parameters
    ----------
    store
        The store uploads are filed in.
    links
        The signer of the upload URLs (its secret keys the receipts).
    """

    def __init__(self, store: ModelStore, links: SignedLinks) -> None:
        self._store = store
        self._links = links
        self._lock = threading.Lock()
        self._busy: set[str] = set()

    @contextmanager
    def once(self, name: str) -> Iterator[None]:
        """Run the body as the only upload for ``name``; ``Conflict`` if one came or is coming."""
        receipt = self._links.receipt(name)
        with self._lock:
            if name in self._busy or self._store.has_blob(hashlib.sha256(receipt).hexdigest()):
                raise Conflict("this upload URL was already used; one URL takes one upload")
            self._busy.add(name)
        try:
            yield
            self._store.put_blob(receipt)
        finally:
            with self._lock:
                self._busy.discard(name)


_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")


def _utf8(text: str) -> bytes:
    """Encode any str, lone surrogates included, so signing never raises."""
    return text.encode("utf-8", "surrogatepass")
