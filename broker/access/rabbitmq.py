"""RabbitMQ access control (``rabbitmq-http[s]://``): users and permissions over the management API.

What each user may touch, as RabbitMQ checks it (resources are exchanges and
queues of the vhost; topic permissions are routing keys on the ``fedmq``
exchange, which the MQTT plugin must use too: ``mqtt.exchange = fedmq``):

- A device, over AMQP (``broker.amqp``): configure, write and read its plain
  subscription queues ``fedmq.sub.<hex>``; write ``fedmq`` and ``fedmq.dlx``
  (where its queues dead-letter), read ``fedmq``. It checks the shared topology
  passively and never declares it, so it cannot delete it.
  Over MQTT (the plugin): configure, write and read its own queues
  ``mqtt-subscription-<device id>qos0|1``, write and read ``fedmq``.
  Topic permissions: write ``NS.checkin.D`` and ``NS.updates.<any>.D``, read
  ``NS.device.D`` (checked on every publish and every queue binding).
  ``device_amqp=0`` drops the AMQP resources for fleets that speak MQTT only.
- A server component: configure, write and read ``fedmq`` and every
  ``fedmq.*`` resource (group queues ``fedmq.group.<group>`` included) and any
  MQTT subscription queue; topic permissions on ``NS.*`` and the MQTT
  transport's dead letters ``fedmq.dead-letters.NS.*``.

Deleting a user does not end its connections (each channel caches what it was
allowed), so ``revoke`` closes them and waits until the broker lists none.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

from broker._amqp_options import DEAD_LETTER_EXCHANGE, EXCHANGE, PLAIN_PREFIX
from broker._mqtt_routing import DEAD_LETTER_PREFIX
from broker.access._common import (
    AdminUrl,
    DeviceCredentials,
    device_username,
    new_secret,
    server_username,
)
from broker.errors import AccessError
from broker.topics import Topics

__all__ = ["MQTT_QUEUE_PREFIX", "RabbitAccess", "device_permissions", "server_permissions"]

MQTT_QUEUE_PREFIX = "mqtt-subscription-"
"""The MQTT plugin's queue of client ``C`` is this prefix, ``C``, then ``qos0`` or ``qos1``."""
_OPTIONS = frozenset({"vhost", "timeout", "device_amqp"})
_CLOSE_REASON = "FedMQ revoked this broker user"

Permissions = dict[str, str]


def _any_of(*alternatives: str) -> str:
    return "^(" + "|".join(alternatives) + ")$"


def _key(pattern: str) -> str:
    """Return a regex for the routing keys of a ``/`` topic pattern (``+``: any one segment)."""
    return r"\.".join("[^.]+" if s == "+" else re.escape(s) for s in pattern.split("/"))


def device_permissions(
    topics: Topics, device_id: str, *, amqp: bool = True
) -> tuple[Permissions, Permissions]:
    """Return a device's vhost permissions and its topic permissions on the exchange."""
    mqtt_queue = re.escape(f"{MQTT_QUEUE_PREFIX}{device_id}") + "qos[01]"
    exchange = re.escape(EXCHANGE)
    if amqp:
        dlx = re.escape(DEAD_LETTER_EXCHANGE)
        plain = re.escape(PLAIN_PREFIX) + "[0-9a-f]+"
        # No configure on the shared exchanges and queue (that would let a device
        # delete them); it checks them passively. Write on the dead-letter exchange
        # is what RabbitMQ asks of whoever declares a queue that dead-letters there.
        configure = _any_of(plain, mqtt_queue)
        write = _any_of(exchange, dlx, plain, mqtt_queue)
        read = _any_of(exchange, plain, mqtt_queue)
    else:
        configure = _any_of(mqtt_queue)
        write = read = _any_of(exchange, mqtt_queue)
    updates = topics.all_updates.rpartition("/")[0] + "/" + device_id
    topic = {
        "exchange": EXCHANGE,
        "write": _any_of(_key(topics.checkin(device_id)), _key(updates)),
        "read": _any_of(_key(topics.device(device_id))),
    }
    return {"configure": configure, "write": write, "read": read}, topic


def server_permissions(namespace: str) -> tuple[Permissions, Permissions]:
    """Return a server component's vhost permissions and topic permissions."""
    resources = _any_of(re.escape(EXCHANGE) + r"(\..+)?", re.escape(MQTT_QUEUE_PREFIX) + ".+")
    # Every key below the namespace or below its MQTT dead letters.
    keys = "^(" + _key(namespace) + "|" + _key(f"{DEAD_LETTER_PREFIX}/{namespace}") + r")\..+$"
    topic = {"exchange": EXCHANGE, "write": keys, "read": keys}
    return {"configure": resources, "write": resources, "read": resources}, topic


class RabbitAccess:
    """Grant and revoke RabbitMQ users in one vhost.

    Parameters
    ----------
    admin
        The parsed ``rabbitmq-http[s]://admin:pw@host:port/?vhost=/`` URL.
    """

    def __init__(self, admin: AdminUrl) -> None:
        self.namespace = admin.namespace
        self._admin = admin
        self._topics = Topics(admin.namespace)
        scheme = "https" if admin.scheme.endswith("s") else "http"
        self._api = f"{scheme}://{admin.host}:{admin.port or 15672}/api"
        self._vhost = quote(admin.options.get("vhost", "/"), safe="")
        self._device_amqp = admin.options.get("device_amqp", "1") not in ("0", "false", "no")
        try:
            self._timeout = float(admin.options.get("timeout", 10.0))
        except ValueError:
            raise AccessError(f"{admin.safe_url}: timeout must be a number") from None
        login = f"{admin.username}:{admin.password}".encode()
        self._auth = "Basic " + base64.b64encode(login).decode()
        self._exchange_ready = False
        self._request("GET", "/whoami")  # a wrong password fails here, not at the first grant

    @classmethod
    def from_url(cls, url: str) -> RabbitAccess:
        """Check the admin's login at ``url``; raise ``AccessError`` if it is refused."""
        return cls(AdminUrl.parse(url, _OPTIONS))

    def grant(self, device_id: str) -> DeviceCredentials:
        """Create (or replace) the device's user and permissions; return its fresh login."""
        username = device_username(self.namespace, device_id)
        vhost, topic = device_permissions(self._topics, device_id, amqp=self._device_amqp)
        return self._replace(username, vhost, topic)

    def revoke(self, device_id: str) -> None:
        """Delete the device's user and close its connections."""
        self._delete(device_username(self.namespace, device_id))

    def grant_server(self, name: str) -> DeviceCredentials:
        """Create (or replace) a server-side user with rights to all of the namespace."""
        vhost, topic = server_permissions(self.namespace)
        return self._replace(server_username(self.namespace, name), vhost, topic)

    def revoke_server(self, name: str) -> None:
        """Delete a server-side user and close its connections."""
        self._delete(server_username(self.namespace, name))

    def close(self) -> None:
        """Nothing to release: every request is a connection of its own."""

    def _replace(self, username: str, vhost: Permissions, topic: Permissions) -> DeviceCredentials:
        self._ensure_exchange()
        password = new_secret()
        user = quote(username, safe="")
        # A user without permissions cannot even open the vhost, so this order is safe.
        self._request("PUT", f"/users/{user}", {"password": password, "tags": ""})
        self._request("PUT", f"/permissions/{self._vhost}/{user}", vhost)
        self._request("PUT", f"/topic-permissions/{self._vhost}/{user}", topic)
        self._drop_connections(username)  # made with an earlier password
        return DeviceCredentials(username, password)

    def _delete(self, username: str) -> None:
        self._request("DELETE", f"/users/{quote(username, safe='')}", missing_ok=True)
        self._drop_connections(username)

    def _ensure_exchange(self) -> None:
        """Declare the exchange MQTT devices publish to, as the AMQP transport declares it."""
        if self._exchange_ready:
            return
        spec = {"type": "topic", "durable": True, "auto_delete": False, "internal": False}
        self._request("PUT", f"/exchanges/{self._vhost}/{quote(EXCHANGE, safe='')}", spec)
        self._exchange_ready = True

    def _drop_connections(self, username: str) -> None:
        """Close every connection of ``username``; return once the broker lists none."""
        deadline = time.monotonic() + self._timeout
        path = f"/connections/username/{quote(username, safe='')}"
        while connections := self._request("GET", path):
            for connection in connections:
                name = quote(str(connection["name"]), safe="")
                self._request("DELETE", f"/connections/{name}", missing_ok=True)
            if time.monotonic() > deadline:
                raise AccessError(f"connections of {username} still open after {self._timeout:g} s")
            time.sleep(0.1)

    def _request(
        self, method: str, path: str, body: object = None, *, missing_ok: bool = False
    ) -> Any:
        """Call the management API; translate its failures into ``AccessError``."""
        request = urllib.request.Request(
            self._api + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={
                "Authorization": self._auth,
                "Content-Type": "application/json",
                "X-Reason": _CLOSE_REASON,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as exc:
            if missing_ok and exc.code == 404:
                return None
            raise AccessError(
                f"{method} {self._admin.safe_url}{path}: HTTP {exc.code} {_reason(exc)}"
            ) from None
        except OSError as exc:  # URLError, timeouts, refused connections
            raise AccessError(f"cannot reach {self._admin.safe_url}: {exc}") from exc
        return json.loads(data) if data else None


def _reason(exc: urllib.error.HTTPError) -> str:
    """Return the API's own reason for a failure (never the request, which may hold a password)."""
    try:
        return str(json.loads(exc.read()).get("reason", exc.reason))
    except (ValueError, AttributeError, OSError):
        return str(exc.reason)
