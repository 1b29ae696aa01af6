"""Which RabbitMQ node the AMQP transport connects to: the URL's addresses, tried in turn.

A cluster's URL names several nodes. A connection goes to the first of them
that answers, and each later connect starts at the node after the one it last
reached: a client whose node died goes straight to a survivor instead of first
waiting for the dead one to refuse or time out, and every survivor is tried
before the dead one again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions as pe

from broker.connect import is_permanent_tls_failure

log = logging.getLogger("broker.amqp")

REFUSED = (pe.ProbableAuthenticationError, pe.AuthenticationError, pe.ProbableAccessDeniedError)
"""A node answered and said no (login or vhost): every node of the cluster would say the same."""


class Nodes:
    """The broker addresses of one URL and where the next connect starts."""

    def __init__(self, addresses: Sequence[pika.ConnectionParameters]) -> None:
        self._addresses = tuple(addresses)
        self._start = 0
        self._current = self._addresses[0]

    @property
    def current(self) -> str:
        """Return ``host:port`` of the node last connected to (the first one before that)."""
        return f"{self._current.host}:{self._current.port}"

    def dial(self) -> Any:
        """Return a ``BlockingConnection`` to the first node that answers; raise the last failure.

        A refused login and a certificate that does not verify are raised at
        once: the nodes of one cluster share their users, and their
        certificates come from one CA.
        """
        count = len(self._addresses)
        for step in range(count):
            index = (self._start + step) % count
            params = self._addresses[index]
            try:
                connection = pika.BlockingConnection(params)
            except REFUSED:
                raise
            except (pe.AMQPConnectionError, OSError) as exc:
                if step == count - 1 or is_permanent_tls_failure(exc):
                    raise
                log.info(
                    "node %s:%s unreachable (%r); trying the next", params.host, params.port, exc
                )
                continue
            self._start, self._current = (index + 1) % count, params
            if count > 1:
                log.info("connected to node %s (%d of %d)", self.current, index + 1, count)
            return connection
        raise AssertionError("unreachable: the last failure is raised in the loop")
