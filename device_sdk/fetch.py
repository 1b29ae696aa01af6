"""Fetching artifacts by reference: checksum-verified, cached by content hash."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote, urlsplit

from broker import ChecksumMismatch, FetchError, ModelRef


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
    """

    def __init__(
        self, cache_dir: Path | None = None, *, memory_items: int = 16, timeout_s: float = 60.0
    ) -> None:
        self._dir = cache_dir
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._limit = memory_items
        self._timeout = timeout_s
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
        try:
            if parts.scheme == "file":
                return Path(unquote(parts.path)).read_bytes()
            if parts.scheme in ("http", "https"):
                with urllib.request.urlopen(uri, timeout=self._timeout) as response:
                    return bytes(response.read())
        except (OSError, urllib.error.URLError) as exc:
            raise FetchError(f"cannot fetch {uri}: {exc}") from exc
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


def upload(url: str, data: bytes, *, timeout_s: float = 120.0) -> str:
    """PUT ``data`` to a signed upload URL; return the sha256 the service stored it under."""
    request = urllib.request.Request(
        url,
        data=data,
        method="PUT",
        # urllib's default form content type makes some servers store nothing.
        headers={"Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            reply = json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise FetchError(f"upload to {url.split('?', 1)[0]} failed: {exc}") from exc
    expected = hashlib.sha256(data).hexdigest()
    if reply.get("sha256") != expected:
        raise ChecksumMismatch(f"the service stored {reply.get('sha256')!r}, expected {expected}")
    return expected
