"""The commands' one client of the service's REST API: JSON in and out, errors in one line.

Which token a call carries is the caller's choice, from its ``Settings``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from aggregator_service import ServiceError


def api_path(*segments: str) -> str:
    """Return ``/seg/seg...`` with each segment escaped: an id with '?' or '/' stays one segment."""
    return "".join("/" + urllib.parse.quote(str(s), safe="") for s in segments)


class RestClient:
    """Calls one FedMQ service.

    Parameters
    ----------
    server
        The service's base URL, e.g. ``http://127.0.0.1:8080``.
    token
        The bearer token sent with every call, if any.
    timeout_s
        Seconds a call may take.
    """

    def __init__(self, server: str, token: str | None = None, *, timeout_s: float = 10.0) -> None:
        self.server = _checked_url(server).rstrip("/")
        self._token = token
        self._timeout_s = timeout_s

    def json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """Call ``path`` (under the server's root) and return its JSON object ({} when empty)."""
        raw = self.raw(method, path, body)
        if not raw:
            return {}
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            answer = None
        # Every answer of the API is an object; anything else (a proxy's HTML page, a
        # list) is another service, reported here rather than as a KeyError later.
        if not isinstance(answer, dict):
            raise ServiceError(f"{self.server}{path} did not answer with FedMQ's JSON")
        return answer

    def raw(self, method: str, path: str, body: Any = None) -> bytes:
        """Call ``path`` and return the answer's bytes; raise ``ServiceError`` in one line."""
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None if body is None else json.dumps(body).encode()
        try:
            request = urllib.request.Request(
                self.server + path, data=data, headers=headers, method=method
            )
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                answer: bytes = response.read()
                return answer
        except urllib.error.HTTPError as exc:
            raise ServiceError(f"{method} {path}: HTTP {exc.code}: {_message(exc)}") from None
        except (OSError, ValueError) as exc:
            raise ServiceError(f"cannot reach the FedMQ service at {self.server}: {exc}") from None


def _checked_url(server: str) -> str:
    """Return ``server`` if it is an http(s) URL with a host; else raise ``ServiceError``."""
    try:
        parts = urllib.parse.urlsplit(server)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServiceError(
            "--server ($FEDMQ_SERVER_URL) must be an http(s) URL such as "
            f"http://127.0.0.1:8080, got {server!r}"
        )
    return server


def _message(error: urllib.error.HTTPError) -> str:
    """Return the API's error message (every problem of a refused config), else the reason."""
    try:
        body = json.loads(error.read())["error"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return str(error.reason)
    if not isinstance(body, dict):
        return str(body)
    problems = body.get("problems")
    return "; ".join(problems) if isinstance(problems, list) else str(body.get("message", ""))
