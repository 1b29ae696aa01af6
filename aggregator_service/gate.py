"""The door of the update queue: only a device's own signed answer to its own task gets in.

Each task carries a grant signed by the service (experiment, round, device,
task id, the device's public key, how many examples it may claim). The
device returns the grant with its update; the gate checks the grant against
the pinned service key, then the frame against the key the grant names. So
a worker needs neither a database nor a list of devices, forged frames cost
one signature check and are never held, and a replayed or re-addressed
update fails on its task id, round or topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from broker import Delivery, ErrorReply, ModelUpdate
from broker.errors import IdentityError
from broker.identity import PublicKeys, decode_public_key
from broker.messages import ERROR_CODE_PATTERN, MessageKind, TaskGrant
from broker.topics import Topics
from broker.verify import Refusal, check_signature, open_grant, parse, refuse, to_message

_KINDS = (MessageKind.MODEL_UPDATE.value, MessageKind.ERROR_REPLY.value)
_ERROR_CODE = re.compile(ERROR_CODE_PATTERN)


@dataclass(frozen=True)
class Admitted:
    """A frame the gate let in: what the device said, and the grant it said it under."""

    message: ModelUpdate | ErrorReply
    grant: TaskGrant


class UpdateGate:
    """Verifies frames from the update queue against the service's task grants.

    Parameters
    ----------
    service_key
        The service's pinned raw public key: the only signer of grants.
    topics
        The deployment's topics (an update must arrive on its device's topic).
    """

    def __init__(self, service_key: bytes, topics: Topics) -> None:
        self._service_key = service_key
        self._topics = topics
        self._keys = PublicKeys()

    def admit(self, delivery: Delivery) -> Admitted:
        """Return the verified update or refusal of ``delivery``, or raise ``Refused``."""
        frame = parse(delivery.body)
        if frame.header.get("kind") not in _KINDS:
            raise refuse(Refusal.NOT_PERMITTED, "only updates and task refusals go here")
        message = to_message(frame)
        assert isinstance(message, ModelUpdate | ErrorReply)
        grant = open_grant(message.grant, self._service_key, self._keys)
        if frame.sender != grant.device_id:
            raise refuse(Refusal.SPOOFED, f"{frame.sender[:130]!r} sent {grant.device_id}'s task")
        try:
            device_key = decode_public_key(grant.public_key)
        except IdentityError as exc:
            raise refuse(Refusal.BAD_GRANT, str(exc)) from exc
        check_signature(frame, device_key, self._keys)
        _check_matches(message, grant)
        if delivery.topic != self._topics.updates(grant.experiment_id, grant.device_id):
            raise refuse(Refusal.SPOOFED, "an update on another device's or experiment's topic")
        return Admitted(message, grant)


def _check_matches(message: ModelUpdate | ErrorReply, grant: TaskGrant) -> None:
    """Raise ``Refused`` unless ``message`` answers exactly the task ``grant`` names."""
    if isinstance(message, ErrorReply):
        if message.in_reply_to != grant.task_id:
            raise refuse(Refusal.SPOOFED, "a refusal of another task than its grant's")
        if _ERROR_CODE.fullmatch(message.code) is None:  # fullmatch: no trailing newline
            raise refuse(Refusal.MALFORMED, "a refusal code is 1-64 of a-z, 0-9 and _")
        return
    named = (message.experiment_id, message.round, message.device_id, message.task_id)
    granted = (grant.experiment_id, grant.round, grant.device_id, grant.task_id)
    if named != granted:
        raise refuse(Refusal.SPOOFED, "an update for another task than its grant's")
    if message.num_examples > grant.max_examples:
        raise refuse(
            Refusal.NOT_PERMITTED,
            f"claims {message.num_examples} examples, the grant allows {grant.max_examples}",
        )
