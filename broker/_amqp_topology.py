"""The topology every AMQP client shares: the ``fedmq`` exchange and the dead letters.

Each part is checked passively first, which needs no configure right: a
device's broker user has none on them (RabbitMQ has no separate delete right,
so configure on the exchange would let a device delete it). The first server
component to connect declares them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pika.exceptions as pe

from broker._amqp_options import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTERS,
    EXCHANGE,
    QueueType,
    type_argument,
)

log = logging.getLogger("broker.amqp")

_NOT_FOUND = 404
"""AMQP's reply code for a passive declare of something that does not exist."""
_ACCESS_REFUSED = 403
"""AMQP's reply code for an action the user has no permission for."""


def open_publisher(connection: Any, queue_type: QueueType) -> Any:
    """Declare what is missing of the topology; return a channel in confirm mode to publish on."""
    if not _exists(connection, _check_exchanges):
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="fanout", durable=True)
        channel.close()
    if not _exists(connection, _check_dead_letters):
        _declare_dead_letters(connection, queue_type)
    channel = connection.channel()
    channel.confirm_delivery()
    return channel


def _exists(connection: Any, check: Callable[[Any], None]) -> bool:
    """Run passive declares on a channel of their own; return False if one answers 404."""
    channel = connection.channel()
    try:
        check(channel)
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code == _NOT_FOUND:
            return False
        raise
    channel.close()
    return True


def _declare_dead_letters(connection: Any, queue_type: QueueType) -> None:
    """Declare and bind the dead-letter queue, or carry on without it if that is refused.

    RabbitMQ answers 404 for a classic queue whose node is down (in a cluster:
    "home node ... is down or inaccessible", to a passive declare too) and 403
    to a user without configure right. Neither may keep a client from
    connecting: without the queue, dead letters are dropped.
    """
    channel = connection.channel()
    try:
        channel.queue_declare(DEAD_LETTERS, durable=True, arguments=type_argument(queue_type))
        channel.queue_bind(DEAD_LETTERS, DEAD_LETTER_EXCHANGE)
    except pe.ChannelClosedByBroker as exc:
        if exc.reply_code not in (_NOT_FOUND, _ACCESS_REFUSED):
            raise
        log.warning("no %s, dead letters are dropped: %s", DEAD_LETTERS, exc.reply_text)
        return
    channel.close()


def _check_exchanges(channel: Any) -> None:
    channel.exchange_declare(EXCHANGE, passive=True)
    channel.exchange_declare(DEAD_LETTER_EXCHANGE, passive=True)


def _check_dead_letters(channel: Any) -> None:
    channel.queue_declare(DEAD_LETTERS, passive=True)
