"""Where each process finds the broker, store, database and service: flag, environment, default."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from aggregator_service.errors import ConfigError
from broker.topics import is_valid_segment

ENVIRONMENT = {
    "broker": "FEDMQ_BROKER_URL",
    "store": "FEDMQ_STORE_URL",
    "db": "FEDMQ_DB_URL",
    "server": "FEDMQ_SERVER_URL",
}

_HELP = {
    "broker": "broker URL: memory://, mqtt://HOST:PORT, amqp://USER:PASS@HOST:PORT/VHOST",
    "store": "model store URL: file:///PATH",
    "db": "database URL (SQLAlchemy): sqlite:///PATH, postgresql://...",
    "server": "the FedMQ service's URL, e.g. http://127.0.0.1:8080",
}


def home() -> Path:
    """Return the folder local defaults live in (``FEDMQ_HOME``, else ./fedmq-data)."""
    return Path(os.environ.get("FEDMQ_HOME", "fedmq-data")).resolve()


def defaults() -> dict[str, str]:
    """Return the embedded defaults, used when neither a flag nor the environment says."""
    root = home()
    return {
        "broker": "mqtt://127.0.0.1:1883",
        "store": (root / "store").as_uri(),
        "db": f"sqlite:///{root / 'fedmq.db'}",
        "server": "http://127.0.0.1:8080",
    }


def add_location_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add ``--broker``/``--store``/``--db``/``--server`` flags, naming their variables."""
    for name in names:
        parser.add_argument(
            f"--{name}", metavar="URL", help=f"{_HELP[name]} (default: ${ENVIRONMENT[name]})"
        )


def add_trust_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--namespace`` and ``--keys`` (the deployment's topic prefix and key folder)."""
    parser.add_argument(
        "--namespace",
        help="deployment namespace: topic prefix, worker group (default: $FEDMQ_NAMESPACE, "
        "else fedmq); deployments sharing a broker never see each other",
    )
    parser.add_argument(
        "--keys",
        type=Path,
        help="key folder: service.key/.pub, workers/NAME.key/.pub, devices/ "
        "(default: $FEDMQ_KEYS, else $FEDMQ_HOME/keys)",
    )


def namespace(args: argparse.Namespace) -> str:
    """Return the deployment's namespace: the flag, else ``$FEDMQ_NAMESPACE``, else ``fedmq``."""
    chosen = getattr(args, "namespace", None) or os.environ.get("FEDMQ_NAMESPACE") or "fedmq"
    if not is_valid_segment(chosen):
        raise ConfigError(f"namespace {chosen!r}: 1-128 letters, digits, '_' or '-'")
    return str(chosen)


def resolve(args: argparse.Namespace, name: str) -> str:
    """Return a location: the flag if given, else the environment, else the default."""
    flag = getattr(args, name, None)
    if flag:
        return str(flag)
    return os.environ.get(ENVIRONMENT[name]) or defaults()[name]


def redact(url: str) -> str:
    """Return ``url`` without its query and with any password masked, for printing."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
