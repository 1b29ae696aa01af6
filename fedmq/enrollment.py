"""A device's side of the service's REST API: enrolling, and reading its experiment."""

from __future__ import annotations

from typing import Any

from aggregator_service import ServiceError
from broker.access import DeviceCredentials
from broker.identity import Identity, decode_public_key
from fedmq.rest import RestClient, api_path
from fedmq.settings import Settings


def fetch_experiment(settings: Settings, experiment_id: str | None) -> dict[str, Any]:
    """Fetch an experiment (default: the newest) from the service's REST API."""
    path = api_path("api", "v1", "experiments", *([experiment_id] if experiment_id else []))
    body = RestClient(settings.server_url, settings.viewer_credential).json("GET", path)
    if experiment_id:
        return body
    if not body["experiments"]:
        raise ServiceError(
            f"{settings.server_url} has no experiments yet; create one or pass --experiment"
        )
    newest: dict[str, Any] = body["experiments"][-1]
    return newest


class Enrollment:
    """Registers devices with the service over REST, pinning the service key it answers with."""

    def __init__(self, settings: Settings) -> None:
        token = settings.enrollment_credential
        if not token:
            raise ServiceError(
                "enrolling devices needs FEDMQ_ENROLLMENT_TOKEN (or FEDMQ_ADMIN_TOKEN)"
            )
        self._api = RestClient(settings.server_url, token)
        self.service_key: bytes | None = None
        self.logins: dict[str, DeviceCredentials] = {}
        """Each device's own broker user, where the service provisions them."""

    def __call__(self, identity: Identity, platform: str) -> bytes:
        """Register ``identity``; keep its broker login; return the service key reported."""
        body = {"platform": platform, "public_key": identity.public_key_text}
        answer = self._api.json("POST", "/api/v1/devices", {**body, "device_id": identity.name})
        key = decode_public_key(str(answer["service_key"]))
        login = answer.get("broker")
        if isinstance(login, dict):
            self.logins[identity.name] = DeviceCredentials(
                str(login["username"]), str(login["password"])
            )
        if self.service_key is not None and key != self.service_key:
            raise ServiceError("the service answered with two different keys; refusing both")
        self.service_key = key
        return key
