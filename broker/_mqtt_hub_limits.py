"""How many sockets one process may open: its open-files limit, raised and counted."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("broker.mqtt_hub")

RESERVED_FDS = 64
"""Open files kept free for everything else the process does (logs, HTTP, data)."""
_UNLIMITED = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the new soft limit."""
    try:
        import resource
    except ImportError:  # not a Unix: no limit to raise here
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _UNLIMITED
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
    return _UNLIMITED if soft == resource.RLIM_INFINITY else int(soft)


def socket_capacity(soft: int) -> int:
    """Return how many more sockets fit under ``soft`` open files, keeping a reserve."""
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume a small process
        in_use = 16
    return max(soft - in_use - RESERVED_FDS, 0)


def too_many_message(capacity: int) -> str:
    """Return the error for a client beyond ``capacity``, with what to do about it."""
    try:
        import resource

        soft, hard = (str(v) for v in resource.getrlimit(resource.RLIMIT_NOFILE))
    except ImportError:
        soft = hard = "?"
    return (
        f"this process may hold {capacity} MQTT connections (open files: soft limit {soft},"
        f" hard limit {hard}, {RESERVED_FDS} kept for the rest); raise the hard limit"
        " (ulimit -Hn, systemd LimitNOFILE, docker --ulimit nofile) or split the devices"
        " among processes (fedmq fleet --first)"
    )
