"""Mosquitto access control (``mosquitto-dynsec://``): the dynamic-security plugin, over MQTT.

Each user gets a role of its own, named like the user, because the plugin's
ACL topics in Mosquitto 2.0 take no ``%u``/``%c`` substitution. A device's
role allows publishing to ``NS/checkin/D`` and ``NS/updates/+/D``, subscribing
to and receiving ``NS/device/D``, and denies every other topic (also at the
plugin's default); its login is bound to client id ``D``, so nobody else can
take over its session. A server role allows all four kinds on ``NS/#``,
``$share/+/NS/#`` (worker groups) and the MQTT transport's dead-letter topics.

``deleteClient`` makes the broker disconnect the user's live connections
itself. Commands and answers travel on ``$CONTROL/dynamic-security/v1`` and
its ``/response`` topic, matched by ``correlationData``; payloads hold
passwords and are never logged.
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

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

__all__ = ["CONTROL_TOPIC", "RESPONSE_TOPIC", "DynsecAccess", "device_acls", "server_acls"]

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
_OPTIONS = frozenset({"timeout"})
# A delete of what is not there is what we wanted anyway.
_ABSENT = frozenset({"Client not found", "Role not found"})
_ALL_KINDS = ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")

Acl = dict[str, Any]


def _acl(kind: str, topic: str, *, allow: bool = True) -> Acl:
    # Within a role higher priorities are checked first: the allows, then the catch-all deny.
    return {"acltype": kind, "topic": topic, "priority": 1 if allow else 0, "allow": allow}


def _own(pattern: str, device_id: str) -> str:
    """Return ``pattern`` (ending in ``/+``) with its last segment pinned to ``device_id``."""
    head, _, last = pattern.rpartition("/")
    if last != "+":
        raise AccessError(f"cannot scope {pattern!r} to one device")
    return f"{head}/{device_id}"


def device_acls(topics: Topics, device_id: str) -> list[Acl]:
    """Return the ACLs of a device's role: its own topics, and nothing else."""
    inbox = topics.device(device_id)
    return [
        _acl("publishClientSend", topics.checkin(device_id)),
        _acl("publishClientSend", _own(topics.all_updates, device_id)),
        _acl("subscribeLiteral", inbox),
        _acl("unsubscribeLiteral", inbox),
        _acl("publishClientReceive", inbox),
        _acl("publishClientSend", "#", allow=False),
        _acl("publishClientReceive", "#", allow=False),
        _acl("subscribePattern", "#", allow=False),
    ]


def server_acls(namespace: str) -> list[Acl]:
    """Return the ACLs of a server role: everything under the namespace."""
    everything = f"{namespace}/#"
    filters = (everything, f"$share/+/{everything}", f"{DEAD_LETTER_PREFIX}/{everything}")
    return [_acl(kind, topic) for topic in filters for kind in _ALL_KINDS]


class DynsecAccess:
    """Grant and revoke users through Mosquitto's dynamic-security plugin.

    Parameters
    ----------
    admin
        The parsed ``mosquitto-dynsec://admin:pw@host:port`` URL.
    """

    def __init__(self, admin: AdminUrl) -> None:
        self.namespace = admin.namespace
        self._admin = admin
        self._topics = Topics(admin.namespace)
        try:
            self._timeout = float(admin.options.get("timeout", 10.0))
        except ValueError:
            raise AccessError(f"{admin.safe_url}: timeout must be a number") from None
        self._lock = threading.Lock()
        self._answers: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._refused: str | None = None
        self._client = self._connect()

    @classmethod
    def from_url(cls, url: str) -> DynsecAccess:
        """Log in as the admin at ``url``; raise ``AccessError`` if that fails."""
        return cls(AdminUrl.parse(url, _OPTIONS))

    def grant(self, device_id: str) -> DeviceCredentials:
        """Create (or replace) the device's user and role; return its fresh login."""
        username = device_username(self.namespace, device_id)
        return self._replace(username, device_acls(self._topics, device_id), client_id=device_id)

    def revoke(self, device_id: str) -> None:
        """Delete the device's user (the broker disconnects it) and its role."""
        self._run(_deletions(device_username(self.namespace, device_id)))

    def grant_server(self, name: str) -> DeviceCredentials:
        """Create (or replace) a server-side user with rights to all of the namespace."""
        return self._replace(server_username(self.namespace, name), server_acls(self.namespace))

    def revoke_server(self, name: str) -> None:
        """Delete a server-side user (the broker disconnects it) and its role."""
        self._run(_deletions(server_username(self.namespace, name)))

    def close(self) -> None:
        """Disconnect the admin client."""
        self._client.disconnect()
        self._client.loop_stop()

    def _replace(
        self, username: str, acls: list[Acl], client_id: str | None = None
    ) -> DeviceCredentials:
        password = new_secret()
        client: dict[str, Any] = {
            "command": "createClient",
            "username": username,
            "password": password,
            "roles": [{"rolename": username}],
        }
        if client_id is not None:
            client["clientid"] = client_id
        # Deleting first drops connections made with an earlier password.
        role = {"command": "createRole", "rolename": username, "acls": acls}
        self._run([*_deletions(username), role, client])
        return DeviceCredentials(username, password)

    def _run(self, commands: list[dict[str, Any]]) -> None:
        """Send ``commands`` in one request; raise ``AccessError`` for any that failed."""
        with self._lock:
            tag = secrets.token_hex(8)
            tagged = [{**c, "correlationData": f"{tag}:{i}"} for i, c in enumerate(commands)]
            info = self._client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise AccessError(f"{self._admin.safe_url}: cannot send ({info.rc.name})")
            answers = self._await(tag)
        for command, answer in zip(commands, answers, strict=True):
            error = answer.get("error")
            if error and not (command["command"].startswith("delete") and error in _ABSENT):
                what = command.get("username") or command.get("rolename")
                raise AccessError(f"{command['command']} {what}: {error}")

    def _await(self, tag: str) -> list[dict[str, Any]]:
        """Return the answers to the request tagged ``tag``, in command order."""
        deadline = time.monotonic() + self._timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                payload = self._answers.get(timeout=left)
            except queue.Empty:
                break
            try:
                answers = json.loads(payload)["responses"]
            except (ValueError, KeyError, TypeError):
                continue
            mine = [a for a in answers if str(a.get("correlationData", "")).startswith(f"{tag}:")]
            if mine:
                return sorted(mine, key=lambda a: int(a["correlationData"].partition(":")[2]))
        raise AccessError(
            f"{self._admin.safe_url}: no answer from the dynamic-security plugin within "
            f"{self._timeout:g} s (is it loaded?)"
        )

    def _connect(self) -> paho.Client:
        admin = self._admin
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fedmq-access-{secrets.token_hex(6)}",
            protocol=paho.MQTTv5,
        )
        client.username_pw_set(admin.username, admin.password)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        try:
            client.connect(admin.host, admin.port or 1883, keepalive=30)
        except OSError as exc:
            raise AccessError(f"cannot reach {admin.safe_url}: {exc}") from exc
        client.loop_start()
        if not self._ready.wait(self._timeout) or self._refused is not None:
            client.disconnect()
            client.loop_stop()
            why = self._refused or f"no answer within {self._timeout:g} s"
            raise AccessError(f"{admin.safe_url} refused the admin: {why}")
        return client

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: object,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._refused = str(reason)
            self._ready.set()
            return
        # Also after paho's own reconnects: the plugin answers only subscribers.
        client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(r.is_failure for r in reasons):
            self._refused = f"may not read {RESPONSE_TOPIC} ({reasons[0]})"
        self._ready.set()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        self._answers.put(bytes(message.payload))


def _deletions(username: str) -> list[dict[str, Any]]:
    return [
        {"command": "deleteClient", "username": username},
        {"command": "deleteRole", "rolename": username},
    ]
