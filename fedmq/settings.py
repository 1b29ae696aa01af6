"""The deployment's settings: read once, at the entry point, from the flags and the environment.

``load_settings`` is the one place FedMQ reads the environment (a test holds
it to that); every other module gets a frozen :class:`Settings` passed in.
``VARIABLES`` is the one table of the variables, their flags and meaning, and
``docs/operations.md`` prints it. A flag beats its variable, a variable beats
the default, and an empty variable counts as unset.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aggregator_service.errors import ConfigError
from broker.topics import DEFAULT_NAMESPACE, Topics, is_valid_segment

DEFAULT_HOME = Path("fedmq-data")
"""The folder of the local defaults, relative to the working directory."""

DEFAULT_MAX_INLINE_BYTES = 1 << 20
"""Updates above 1 MiB go to the store and travel by reference (claim check)."""

SHARED_DATA = Path("..", "shared", "data", "mnist")
"""Where a checkout finds the shared MNIST files, relative to the working directory
(the project root): ``../shared/data/mnist``, searched after ``FEDMQ_DATA_DIR``."""


@dataclass(frozen=True)
class Variable:
    """One environment variable: the setting it fills and the flag that overrides it."""

    name: str
    setting: str
    meaning: str
    flag: str | None = None
    """The command-line flag (its ``argparse`` dest) that wins over the variable, if any."""


VARIABLES: tuple[Variable, ...] = (
    Variable("FEDMQ_HOME", "home", "folder of the local defaults (default ./fedmq-data)"),
    Variable(
        "FEDMQ_BROKER_URL",
        "broker",
        "broker URL: memory://, mqtt://HOST:PORT, amqp://USER:PASS@HOST:PORT/VHOST "
        "(default mqtt://127.0.0.1:1883; `demo`: an embedded broker)",
        "broker",
    ),
    Variable(
        "FEDMQ_STORE_URL",
        "store",
        "model store URL: file:///PATH, s3://BUCKET/PREFIX?endpoint_url=... "
        "(default $FEDMQ_HOME/store; `simulate`, `demo`: a temporary folder)",
        "store",
    ),
    Variable(
        "FEDMQ_DB_URL",
        "db",
        "database URL (SQLAlchemy): sqlite:///PATH, postgresql://... "
        "(default sqlite:///$FEDMQ_HOME/fedmq.db)",
        "db",
    ),
    Variable(
        "FEDMQ_SERVER_URL",
        "server",
        "the FedMQ service's URL (default http://127.0.0.1:8080)",
        "server",
    ),
    Variable(
        "FEDMQ_NAMESPACE",
        "namespace",
        "deployment namespace: topic prefix, worker group (default fedmq); "
        "deployments sharing a broker never see each other",
        "namespace",
    ),
    Variable(
        "FEDMQ_WORKER_GROUP",
        "worker_group",
        "update queue shared by a deployment's workers (default NAMESPACE-aggregators)",
        "group",
    ),
    Variable(
        "FEDMQ_KEYS",
        "keys",
        "key folder: service.key/.pub, workers/NAME.key/.pub, devices/ (default $FEDMQ_HOME/keys)",
        "keys",
    ),
    Variable(
        "FEDMQ_DATA_DIR",
        "data_dir",
        "folder holding data set files (MNIST: the folder or its mnist/), "
        "searched before ../shared/data/mnist",
    ),
    Variable(
        "FEDMQ_ADMIN_TOKEN",
        "admin_token",
        "token for state-changing calls (`fedmq server` without one writes one to "
        "$FEDMQ_HOME/admin-token)",
    ),
    Variable("FEDMQ_VIEWER_TOKEN", "viewer_token", "token for guarded reads (or the admin token)"),
    Variable(
        "FEDMQ_ENROLLMENT_TOKEN",
        "enrollment_token",
        "token for registering devices (or the admin token)",
    ),
    Variable(
        "FEDMQ_SIGNING_KEY",
        "signing_key",
        "secret (16+ bytes) signing artifact URLs of a local-folder store; "
        "keep it across restarts (default: random per start)",
    ),
    Variable(
        "FEDMQ_MAX_INLINE_BYTES",
        "max_inline_bytes",
        "largest update sent inside its message; larger ones go through the store (default 1 MiB)",
    ),
    Variable(
        "FEDMQ_BROKER_ACCESS_URL",
        "broker_access_url",
        "per-device broker users: mosquitto-dynsec://... or rabbitmq-http://... (default none)",
    ),
    Variable(
        "FEDMQ_CONFIGS_DIR",
        "configs_dir",
        "example configs the dashboard offers (default the shipped experiments/configs)",
    ),
    Variable(
        "FEDMQ_MAX_MODEL_PARAMETERS",
        "max_model_parameters",
        "largest model POST /experiments accepts, in parameters (default 2^28)",
    ),
)
"""Every environment variable FedMQ reads, once."""


class SettingsError(ConfigError):
    """A flag or environment variable with a value FedMQ cannot use; ``problems`` lists each."""


@dataclass(frozen=True)
class Settings:
    """Where a process finds its broker, store, database, service, keys and data, and its secrets.

    Fields hold what the flags or the environment said (None: nothing);
    the properties add the embedded defaults, so a composition can still tell
    "given" from "defaulted" (``simulate`` keeps its store in a temporary
    folder unless one is given).
    """

    home: Path = DEFAULT_HOME
    broker: str | None = None
    store: str | None = None
    db: str | None = None
    server: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    worker_group: str | None = None
    keys: Path | None = None
    data_dir: Path | None = None
    admin_token: str | None = field(default=None, repr=False)
    viewer_token: str | None = field(default=None, repr=False)
    enrollment_token: str | None = field(default=None, repr=False)
    signing_key: bytes | None = field(default=None, repr=False)
    max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES
    broker_access_url: str | None = field(default=None, repr=False)  # holds a password
    configs_dir: Path | None = None
    max_model_parameters: int | None = None

    def __post_init__(self) -> None:
        """Refuse values no component could use, each problem in one line."""
        problems = []
        if not is_valid_segment(self.namespace):
            problems.append(f"namespace {self.namespace!r}: 1-128 letters, digits, '_' or '-'")
        if self.worker_group is not None and not is_valid_segment(self.worker_group):
            problems.append(f"worker group {self.worker_group!r}: letters, digits, '_' or '-'")
        if self.max_inline_bytes < 0:
            problems.append(f"max inline bytes {self.max_inline_bytes}: must be 0 or more")
        if self.signing_key is not None and len(self.signing_key) < 16:
            problems.append("signing key: at least 16 bytes")
        if self.max_model_parameters is not None and self.max_model_parameters < 1:
            problems.append(f"max model parameters {self.max_model_parameters}: at least 1")
        if problems:
            raise SettingsError(problems[0], problems)

    @property
    def broker_url(self) -> str:
        """Return the broker: the one given, else a local MQTT broker."""
        return self.broker or "mqtt://127.0.0.1:1883"

    @property
    def store_url(self) -> str:
        """Return the model store: the one given, else ``$FEDMQ_HOME/store``."""
        return self.store or (self.home / "store").resolve().as_uri()

    @property
    def db_url(self) -> str:
        """Return the database: the one given, else SQLite in ``$FEDMQ_HOME``."""
        return self.db or f"sqlite:///{(self.home / 'fedmq.db').resolve()}"

    @property
    def server_url(self) -> str:
        """Return the service's URL: the one given, else the local default."""
        return self.server or "http://127.0.0.1:8080"

    @property
    def topics(self) -> Topics:
        """Return the deployment's topics (its namespace)."""
        return Topics(self.namespace)

    @property
    def updates_group(self) -> str:
        """Return the workers' update queue: the one given, else the namespace's."""
        return self.worker_group or self.topics.updates_group

    @property
    def key_folder(self) -> Path:
        """Return the key folder: the one given, else ``$FEDMQ_HOME/keys``."""
        return self.keys or self.home / "keys"

    @property
    def data_dirs(self) -> tuple[Path, ...]:
        """Return the folders searched for data set files, in order."""
        return (*([self.data_dir] if self.data_dir else []), SHARED_DATA)

    @property
    def viewer_credential(self) -> str | None:
        """Return the narrowest token that opens guarded reads (viewer, else admin)."""
        return self.viewer_token or self.admin_token

    @property
    def enrollment_credential(self) -> str | None:
        """Return the narrowest token that registers devices (enrollment, else admin)."""
        return self.enrollment_token or self.admin_token


def _whole_number(text: str) -> int:
    return int(text)


_PARSE: dict[str, Callable[[str], Any]] = {
    "home": Path,
    "keys": Path,
    "data_dir": Path,
    "configs_dir": Path,
    "signing_key": str.encode,
    "max_inline_bytes": _whole_number,
    "max_model_parameters": _whole_number,
}
"""How a variable's text becomes its setting's type (text stays text)."""


def load_settings(
    flags: argparse.Namespace | Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the settings: each flag given, else its variable, else the default.

    Parameters
    ----------
    flags
        The parsed command line (flags absent from a command count as not given).
    environ
        The environment (default: this process's; tests pass their own).

    Returns
    -------
    Settings
        The settings, checked.

    Raises
    ------
    SettingsError
        If a value cannot be used; every problem is listed.
    """
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for variable in VARIABLES:
        flag = given.get(variable.flag) if variable.flag else None
        if flag is not None and flag != "":
            values[variable.setting] = flag
            continue
        text = env.get(variable.name, "")
        if not text:
            continue
        try:
            values[variable.setting] = _PARSE.get(variable.setting, str)(text)
        except ValueError:
            problems.append(f"{variable.name}={text!r}: not a whole number")
    if problems:
        raise SettingsError(problems[0], problems)
    values["home"] = Path(values.get("home", DEFAULT_HOME)).resolve()
    return Settings(**values)


def variables_table() -> str:
    """Return ``VARIABLES`` as a Markdown table (``docs/operations.md`` holds a copy)."""
    rows = ["| variable | flag | meaning |", "| --- | --- | --- |"]
    for variable in VARIABLES:
        flag = f"`--{variable.flag}`" if variable.flag else ""
        rows.append(f"| `{variable.name}` | {flag} | {variable.meaning} |")
    return "\n".join(rows)


def add_location_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add ``--broker``/``--store``/``--db``/``--server`` flags, naming their variables."""
    for name in names:
        variable = _by_flag(name)
        parser.add_argument(
            f"--{name}", metavar="URL", help=f"{variable.meaning} (${variable.name})"
        )


def add_trust_flags(parser: argparse.ArgumentParser, *, keys: bool = True) -> None:
    """Add ``--namespace`` and, unless told not to, ``--keys`` (topic prefix, key folder)."""
    namespace = _by_flag("namespace")
    parser.add_argument("--namespace", help=f"{namespace.meaning} (${namespace.name})")
    if keys:
        folder = _by_flag("keys")
        parser.add_argument("--keys", type=Path, help=f"{folder.meaning} (${folder.name})")


def _by_flag(flag: str) -> Variable:
    return next(v for v in VARIABLES if v.flag == flag)


def redact(url: str) -> str:
    """Return ``url`` without its query and with any password masked, for printing."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    # Spelled out rather than urlunsplit, which prints memory:// as "memory:".
    return f"{parts.scheme}://{netloc}{parts.path}"
