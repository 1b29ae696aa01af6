"""The kit's artifact server: signed blob URLs on its own HTTP server, with faults on demand.

It answers the way the service's blob endpoint does (``aggregator_service.links``
signs and verifies the URLs), and it can misbehave on purpose for one blob:
answer 503 or drop the connection for the first requests, serve bytes that do
not hash to the reference's sha256, or hand out a URL that has already
expired. Every request is logged, so a check can say what the device fetched.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from aggregator_service.errors import Forbidden
from aggregator_service.links import SignedLinks
from aggregator_service.rounds.tasks import artifact_format
from broker import ModelRef

BLOB_PATH = "/api/v1/blobs/"
EXPIRED_AGO_S = 60.0
"""How long ago an expired URL's validity ended."""


class Fault(Enum):
    """A transient failure the server answers a request with, instead of the blob."""

    UNAVAILABLE = 503
    """HTTP 503 Service Unavailable."""
    DROPPED = 0
    """The connection closed without an answer."""


@dataclass(frozen=True)
class Fetch:
    """One request the device made to the artifact server."""

    blob: str
    """The sha256 the URL names (the reference's, which a tampered blob's bytes fail)."""
    status: int
    """The HTTP status answered; 0 for a dropped connection."""
    at: float
    """When, on ``time.monotonic``'s clock."""


@dataclass
class _Blob:
    data: bytes
    faults: deque[Fault] = field(default_factory=deque)


class BlobServer:
    """Serves blobs under ``/api/v1/blobs/<sha256>`` by signed URL, logging every request.

    Parameters
    ----------
    host, port
        Where to listen (port 0: any free port).
    public_url
        The base URL devices reach the server at (default ``http://host:port``):
        a phone cannot reach the kit's loopback address.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, public_url: str | None = None):
        self._blobs: dict[str, _Blob] = {}
        self._fetches: list[Fetch] = []
        self._twins: dict[str, set[str]] = {}
        self._lock = threading.Lock()
        self._http = ThreadingHTTPServer((host, port), _handler_for(self))
        self._http.daemon_threads = True
        bound_host, bound_port = self._http.server_address[:2]
        self.url = (public_url or f"http://{bound_host!s}:{bound_port}").rstrip("/")
        secret = secrets.token_bytes(32)
        self._links = SignedLinks(secret, self.url)
        self._expired_links = SignedLinks(secret, self.url, ttl_s=-EXPIRED_AGO_S)
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="fedmq-conformance-blobs", daemon=True
        )
        self._thread.start()

    def offer(
        self,
        name: str,
        data: bytes,
        *,
        tampered: bool = False,
        faults: Sequence[Fault] = (),
        expired: bool = False,
        twin_of: ModelRef | None = None,
    ) -> ModelRef:
        """Serve ``data`` and return the reference a task carries for artifact ``name``.

        Parameters
        ----------
        name
            The artifact's file name (it sets the reference's format).
        data
            The bytes the URL serves.
        tampered
            Give the reference the sha256 of other, never served bytes, so ``data``
            fails it (and no cache holds a blob of that hash).
        faults
            Answer the first requests with these, in order, then with the blob.
        expired
            Sign the URL with an expiry in the past: the server answers 403.
        twin_of
            Another form of that reference's bytes (a phone's weights file of the
            task's model): requests for either count as requests for it.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        if tampered:
            sha256 = hashlib.sha256(secrets.token_bytes(32) + data).hexdigest()
        with self._lock:
            self._blobs[sha256] = _Blob(data, deque(faults))
            if twin_of is not None:
                self._twins.setdefault(twin_of.sha256, set()).add(sha256)
        links = self._expired_links if expired else self._links
        return ModelRef(links.download(sha256), sha256, len(data), artifact_format(name))

    def fetches(self, ref: ModelRef | None = None) -> list[Fetch]:
        """Return the requests so far (for one reference's blob and its twins, when given)."""
        with self._lock:
            if ref is None:
                return list(self._fetches)
            blobs = {ref.sha256, *self._twins.get(ref.sha256, ())}
            return [f for f in self._fetches if f.blob in blobs]

    def close(self) -> None:
        """Stop serving."""
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5.0)

    def _answer(self, method: str, target: str) -> tuple[int, bytes | Fault]:
        """Return the status and body (or fault) for one request, and log it."""
        parts = urlsplit(target)
        blob = parts.path[len(BLOB_PATH) :] if parts.path.startswith(BLOB_PATH) else ""
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        status: int
        body: bytes | Fault
        try:
            self._links.verify(method, parts.path, query.get("expires"), query.get("signature"))
        except Forbidden as exc:
            status, body = 403, _error("forbidden", str(exc))
        else:
            with self._lock:
                entry = self._blobs.get(blob)
                fault = entry.faults.popleft() if entry is not None and entry.faults else None
            if entry is None:
                status, body = 404, _error("not_found", "no such blob")
            elif fault is not None:
                status, body = fault.value, fault
            else:
                status, body = 200, entry.data
        with self._lock:
            self._fetches.append(Fetch(blob, status, time.monotonic()))
        return status, body


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def _handler_for(server: BlobServer) -> type[BaseHTTPRequestHandler]:
    """Return a request handler class bound to ``server``."""

    class Handler(BaseHTTPRequestHandler):
        """Answers GETs from the server's blobs; every other method is refused."""

        def do_GET(self) -> None:
            """Answer a download."""
            status, body = server._answer("GET", self.path)
            if body is Fault.DROPPED:
                self.close_connection = True  # the client sees the socket close unanswered
                return
            if isinstance(body, Fault):
                body = _error("unavailable", "try again later")
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Keep the request log out of the report (the kit keeps its own)."""

    return Handler
