"""Broker users and permissions: the second wall behind signed frames.

Each device logs in as its own broker user and may publish only its own
check-ins (``NS/checkin/D``) and updates (``NS/updates/<experiment>/D``) and
read only its own task topic (``NS/device/D``); server-side components (the
service, aggregator workers) get everything under ``NS/#``. The service calls
``grant`` when it registers a device and ``revoke`` when it revokes one.

Access URLs, chosen by scheme (``open_access``):

- ``mosquitto-dynsec://admin:PASSWORD@host:1883`` drives Mosquitto 2.0's
  dynamic-security plugin over MQTT 5 (its ``$CONTROL/dynamic-security/v1``
  topic), as the admin ``mosquitto_ctrl dynsec init`` created.
- ``rabbitmq-http://admin:PASSWORD@host:15672/?vhost=/`` (``rabbitmq-https://``
  for TLS) drives RabbitMQ's management HTTP API, as a user tagged
  ``administrator``. ``device_amqp=0`` gives devices MQTT rights only.

Both take ``namespace`` (default ``fedmq``) and ``timeout`` (seconds per
admin request, default 10). A device's broker user is ``NS.D``; a server
component's ``NS.server.NAME``. Over MQTT a device must connect with its device
id as the client id (Mosquitto binds the login to it; RabbitMQ names the
device's MQTT queue after it).
"""

from __future__ import annotations

from typing import Protocol, cast

from broker._urls import load_alias
from broker.access._common import DeviceCredentials
from broker.errors import AccessError

__all__ = ["ACCESS_ALIASES", "BrokerAccess", "DeviceCredentials", "open_access"]

# Lazy, like broker.connect's table: paho is imported only for Mosquitto.
ACCESS_ALIASES: dict[str, str] = {
    "mosquitto-dynsec": "broker.access.mosquitto:DynsecAccess",
    "rabbitmq-http": "broker.access.rabbitmq:RabbitAccess",
    "rabbitmq-https": "broker.access.rabbitmq:RabbitAccess",
}


class BrokerAccess(Protocol):
    """Create and remove the broker users of one deployment (one namespace)."""

    namespace: str

    def grant(self, device_id: str) -> DeviceCredentials:
        """Create (or replace) ``device_id``'s user with a fresh secret and its device rights.

        Replacing drops connections made with the previous secret.
        """
        ...

    def revoke(self, device_id: str) -> None:
        """Delete ``device_id``'s user and drop its live connections; a no-op if it has none."""
        ...

    def grant_server(self, name: str) -> DeviceCredentials:
        """Create (or replace) the server-side user ``name`` with rights to all of ``NS/#``."""
        ...

    def revoke_server(self, name: str) -> None:
        """Delete the server-side user ``name`` and drop its live connections."""
        ...

    def close(self) -> None:
        """Release the admin connection."""
        ...


class _AccessClass(Protocol):
    """What an alias names: a class with a ``from_url`` constructor."""

    def from_url(self, url: str) -> BrokerAccess:
        """Connect to the admin API at ``url``."""
        ...


def open_access(url: str) -> BrokerAccess:
    """Return the access control of the broker the admin ``url`` names.

    Parameters
    ----------
    url
        ``mosquitto-dynsec://admin:pw@host:port`` or
        ``rabbitmq-http[s]://admin:pw@host:port/?vhost=/`` (see the module docstring).

    Returns
    -------
    BrokerAccess
        Ready to grant and revoke.

    Raises
    ------
    AccessError
        An unknown scheme, a malformed URL, or an admin API that refused or did not answer.
    """

    def unknown(scheme: str, known: str) -> AccessError:
        return AccessError(f"no broker access for the URL scheme {scheme!r}; known: {known}")

    return cast(_AccessClass, load_alias(ACCESS_ALIASES, url, unknown)).from_url(url)
