"""Targets the offload tests run in a child process (importable by name, not collected)."""

from __future__ import annotations

import os

from broker import Delivery, Transport


def echo(transport: Transport, *, topic: str, replies: str, group: str | None = None) -> None:
    """Answer each message on ``replies`` with ``pid:body``, then settle it as its body says.

    ``dead`` dead-letters it, ``requeue`` requeues it once, ``raise`` makes the
    handler fail, ``exit`` ends the process without settling; anything else is acked.
    """

    def handle(delivery: Delivery) -> None:
        body = delivery.body
        transport.publish(replies, f"{os.getpid()}:".encode() + body)
        if body == b"exit":
            os._exit(3)
        if body == b"raise":
            raise RuntimeError("the handler failed")
        if body == b"dead":
            delivery.nack(requeue=False)
        elif body == b"requeue" and not delivery.redelivered:
            delivery.nack(requeue=True)
        else:
            delivery.ack()

    transport.subscribe(topic, handle, group=group)


def broken(transport: Transport) -> None:
    """Fail to start."""
    raise RuntimeError("this target cannot start")
