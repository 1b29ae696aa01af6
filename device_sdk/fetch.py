"""Fetching artifacts by reference: checksum-verified, cached by content hash."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlsplit

from broker import ChecksumMismatch, FetchError, ModelRef
from broker.retry import backoff

T = TypeVar("T")


class ArtifactFetcher:
    """Downloads what a task references, once: later requests hit the cache.

    The cache is keyed by sha256, so one fetcher can serve a whole emulated
    fleet; every byte is verified against the reference before it is used.

    Parameters
    ----------
    cache_dir
        Where verified artifacts are kept across runs (none: memory only).
    memory_items
        How many recent artifacts to keep in memory.
    timeout_s
        Network timeout for http(s) downloads.
    retry_for_s
        How long to keep retrying a download that fails for a transient reason
        (service unreachable, 5xx): a coordinator restarting mid-round is back
        within seconds.
    """

    def __init__(
        self,
        cache_dir: Path | None = None,
        *,
        memory_items: int = 16,
        timeout_s: float = 60.0,
        retry_for_s: float = 30.0,
    ) -> None:
        self._dir = cache_dir
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._limit = memory_items
        self._timeout = timeout_s
        self._retry_for = retry_for_s
        self._lock = threading.Lock()
        self.downloads = 0

    def fetch(self, ref: ModelRef) -> bytes:
        """Return the referenced bytes, verified; raise ``FetchError`` or ``ChecksumMismatch``."""
        with self._lock:
            if ref.sha256 in self._memory:
                self._memory.move_to_end(ref.sha256)
                return self._memory[ref.sha256]
        data = self._from_disk(ref.sha256)
        if data is None:
            data = self._download(ref.uri)
            self.downloads += 1
            actual = hashlib.sha256(data).hexdigest()
            if actual != ref.sha256:
                raise ChecksumMismatch(
                    f"{ref.uri}: sha256 {actual[:12]}... != expected {ref.sha256[:12]}...; refused"
                )
            self._to_disk(ref.sha256, data)
        with self._lock:
            self._memory[ref.sha256] = data
            while len(self._memory) > self._limit:
                self._memory.popitem(last=False)
        return data

    def _download(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        if parts.scheme == "file":
            try:
                return Path(unquote(parts.path)).read_bytes()
            except OSError as exc:
                raise FetchError(f"cannot fetch {uri}: {exc}") from exc
        if parts.scheme in ("http", "https"):
            # The query of a presigned URL is a credential: keep it out of errors and logs.
            where = uri.split("?", 1)[0]
            return with_retries(lambda: _get(uri, self._timeout), self._retry_for, where)
        raise FetchError(f"cannot fetch {uri}: unsupported scheme {parts.scheme!r}")

    def _from_disk(self, sha256: str) -> bytes | None:
        if self._dir is None:
            return None
        path = self._dir / sha256
        try:
            data = path.read_bytes()
        except OSError:
            return None
        # A cache file damaged on disk is dropped, not trusted.
        if hashlib.sha256(data).hexdigest() != sha256:
            path.unlink(missing_ok=True)
            return None
        return data

    def _to_disk(self, sha256: str, data: bytes) -> None:
        if self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = self._dir / f".{sha256}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_bytes(data)
        os.replace(tmp, self._dir / sha256)


def upload(url: str, data: bytes, *, timeout_s: float = 120.0, retry_for_s: float = 30.0) -> str:
    """PUT ``data`` to a signed or presigned upload URL; return its sha256 once the receiver has it.

    The FedMQ service answers with the sha256 it stored; an object store
    (S3's presigned PUT) answers with the MD5 ETag of a single-part object.
    Either is checked against the bytes sent, so a truncated upload is caught
    on the device rather than rejected later by the worker.
    """
    return with_retries(lambda: _put(url, data, timeout_s), retry_for_s, url.split("?", 1)[0])


def _put(url: str, data: bytes, timeout_s: float) -> str:
    """PUT once; return the sha256 of ``data`` after checking the receiver's answer."""
    request = urllib.request.Request(
        url,
        data=data,
        method="PUT",
        # urllib's default form content type makes some servers store nothing.
        headers={"Content-Type": "application/octet-stream"},
    )
    expected = hashlib.sha256(data).hexdigest()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
            etag = (response.headers.get("ETag") or "").strip('"')
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise
        # One upload per URL: a retry whose first try landed (its answer was lost)
        # is told so. The worker looks the bytes up by this sha256, the name the
        # service gave what it received: a damaged first try is not found under it.
        return expected
    if body:
        try:
            stored = json.loads(body).get("sha256")
        except (ValueError, AttributeError):
            stored = None
        if stored != expected:
            raise ChecksumMismatch(f"the receiver stored {stored!r}, expected {expected}")
    elif etag and "-" not in etag and etag != hashlib.md5(data, usedforsecurity=False).hexdigest():
        raise ChecksumMismatch(f"the object store's ETag {etag} does not match the bytes sent")
    return expected


def _get(uri: str, timeout_s: float) -> bytes:
    """GET once."""
    with urllib.request.urlopen(uri, timeout=timeout_s) as response:
        return bytes(response.read())


def with_retries(call: Callable[[], T], retry_for_s: float, what: str) -> T:
    """Run ``call``, retrying transient failures with back-off for up to ``retry_for_s``.

    Connection failures and 5xx answers are transient; 4xx answers (an expired
    or tampered URL, a missing blob) and checksum mismatches are final.
    """
    deadline = time.monotonic() + retry_for_s
    attempt = 0
    while True:
        try:
            return call()
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or time.monotonic() >= deadline:
                raise FetchError(f"{what}: HTTP {exc.code} {exc.reason}") from exc
        except ChecksumMismatch:
            raise
        except (OSError, urllib.error.URLError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise FetchError(f"{what}: {exc}") from exc
        time.sleep(min(backoff(attempt, base=0.2, cap=5.0), max(deadline - time.monotonic(), 0)))
        attempt += 1
