"""Private Mosquitto and RabbitMQ brokers that a fault test starts, stops and restarts itself.

Restarting the machine's shared brokers would cut off every other test using
them, so a broker-restart test runs its own broker: a child process on free
loopback ports, with its config, data and log under the test's folder.

How each one stops, and why:

- ``stop(graceful=True)`` is an operator's restart. Mosquitto gets SIGTERM and
  writes its persistence database (sessions, subscriptions, queued QoS 1
  messages) on the way out; RabbitMQ gets SIGTERM too, the shutdown that
  ``rabbitmqctl stop`` runs: it closes connections (unacked deliveries go back
  to their queues) and keeps durable queues and persistent messages in its
  data folder.
- ``stop(graceful=False)`` is a crash: SIGKILL to the broker's process group.
  RabbitMQ keeps what it confirmed (persistent messages on durable queues are
  on disk before the confirm). Mosquitto loses whatever changed since its last
  autosave, PUBACKed messages included, which is Mosquitto's design rather than
  something a client can make up for.

``start()`` after a stop reuses the ports, node name and data folder, so
clients reconnect to the same address and find what the broker kept.

``OwnedRabbitCluster`` joins three such nodes into one cluster (a shared cookie
and epmd, ``ErlangHost``), for the tests of losing a node: ``leader`` finds the
node leading a quorum queue, and ``stop(graceful=False)`` on that node kills it.

``owned_mosquitto``, ``owned_rabbitmq`` and ``owned_rabbitmq_cluster`` skip a
test when the broker's binaries are missing (and fail it under CI, like
``tests.brokers.require``).
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tests.brokers import amqp_url, mqtt_url, skip_or_fail
from tests.ports import free_port

_SBIN = "/usr/sbin:/usr/local/sbin:/opt/homebrew/sbin"
# Debian's /usr/sbin/rabbitmq* wrappers re-run the scripts as the rabbitmq user,
# who cannot write to a test's folder; the real scripts live here.
_RABBITMQ_LIBEXEC = Path("/usr/lib/rabbitmq/bin")
# Broker ports come from below Linux's ephemeral range (tests.ports): any outgoing
# connection may get a port in that range as its local port, and a restarting
# RabbitMQ (whose listener does not set SO_REUSEADDR) then cannot bind it: seen
# here once in a few restarts.

_MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
# Running as ourselves keeps the broker able to write the test's folder.
user {user}
# Sessions and queued QoS 1 messages survive a restart (saved on SIGTERM).
persistence true
persistence_location {data}/
# Mosquitto silently drops QoS 1 messages queued beyond this for one client.
max_queued_messages 100000
max_queued_bytes 0
set_tcp_nodelay true
log_dest stdout
log_type error
log_type warning
log_type notice
log_timestamp true
"""


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _wait(condition: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> bool:
    """Poll ``condition`` every 50 ms while ``alive``; return whether it held in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if condition():
            return True
        time.sleep(0.05)
    return False


def _wait_port_free(port: int) -> None:
    """Wait until nothing listens on ``port`` (a broker stopped a moment ago)."""
    if not _wait(lambda: not _listening(port), 30, lambda: True):
        raise RuntimeError(f"port {port} is still taken")


def _group_alive(pgid: int) -> bool:
    """Return whether a process of group ``pgid`` still runs.

    A killed multi-threaded process shows as a zombie while some of its threads
    still exit (an Erlang VM's I/O threads finishing a write); its sockets and
    files are released only with the last thread, so threads count too.
    """
    for proc in Path("/proc").glob("[0-9]*"):
        state = _stat(proc / "stat")
        if state is None or int(state[2]) != pgid:
            continue
        threads = [_stat(task / "stat") for task in proc.glob("task/[0-9]*")]
        if any(t is not None and t[0] not in ("Z", "X") for t in [state, *threads]):
            return True
    return False


def _stat(path: Path) -> list[str] | None:
    """Return the fields of a /proc stat file after the command (state, ppid, pgrp, ...)."""
    try:
        # The command, in parentheses, may hold spaces; split after it.
        return path.read_text().rpartition(")")[2].split()
    except OSError:
        return None  # it ended while we looked


def _find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


class _Child:
    """One broker process in a session of its own, so a kill reaches what it started."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.log_path = folder / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.folder,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM to the broker process only: it shuts its helpers down itself."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def signal_group(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> None:
        """Wait for the process to end; SIGKILL its group past ``timeout``."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.proc.wait(timeout=10)
        # What is left of the group goes too, and a restart waits until it is gone:
        # the Erlang VM under RabbitMQ's start script can outlive the script for a
        # while, holding the port and the data folder.
        pgid = self.proc.pid
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if not _wait(lambda: not _group_alive(pgid), 30, lambda: True):
            raise RuntimeError(f"processes of group {pgid} outlived SIGKILL")
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class OwnedMosquitto:
    """A Mosquitto child process with persistence, on its own port.

    Parameters
    ----------
    folder
        Where its config, persistence database and log go.
    config
        The config to run instead of the default one, a template whose ``{port}``,
        ``{user}``, ``{data}`` and ``{folder}`` are filled in.
    """

    def __init__(self, folder: Path, config: str = _MOSQUITTO_CONF) -> None:
        binary = _find("mosquitto")
        if binary is None:
            raise FileNotFoundError("no mosquitto binary on PATH or in sbin")
        self.folder = folder
        self.port = free_port()
        self._binary = binary
        self._child = _Child(folder, "mosquitto")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        self._conf = folder / "mosquitto.conf"
        self._conf.write_text(
            config.format(
                port=self.port, user=getpass.getuser(), data=folder / "data", folder=folder
            )
        )

    @property
    def url(self) -> str:
        """Return the ``mqtt://`` URL FedMQ's commands connect with."""
        return mqtt_url(self.port)

    @property
    def pid(self) -> int:
        """Return the running broker's process id."""
        if self._child.proc is None:
            raise RuntimeError("mosquitto is not started")
        return self._child.proc.pid

    def start(self, timeout: float = 10.0) -> None:
        """Start the broker and wait until it accepts connections."""
        _wait_port_free(self.port)
        self._child.spawn([self._binary, "-c", str(self._conf)])
        if not _wait(lambda: _listening(self.port), timeout, self._child.alive):
            self.close()
            raise RuntimeError(f"mosquitto did not start on {self.port}:\n{self.log()}")

    def stop(self, *, graceful: bool = True) -> None:
        """SIGTERM (it saves its database first) or, with ``graceful=False``, SIGKILL."""
        if graceful:
            self._child.terminate()
        else:
            self._child.signal_group(signal.SIGKILL)
        self._child.wait(timeout=15)

    def close(self) -> None:
        """Kill the broker if it still runs; idempotent."""
        self._child.signal_group(signal.SIGKILL)
        self._child.wait(timeout=10)

    def log(self) -> str:
        """Return what the broker logged so far."""
        return self._child.log()


@dataclass(frozen=True)
class ErlangHost:
    """What Erlang nodes on one machine share to see each other: a cookie and an epmd.

    The epmd is private (a port of its own, loopback only), so test nodes never
    register with the machine's shared RabbitMQ's epmd or leave one running; the
    cookie is in ``home``, the ``HOME`` of the nodes and of the CLI tools. A
    lone node has one of its own; a cluster's nodes share one.
    """

    home: Path
    epmd_port: int

    @classmethod
    def create(cls, home: Path) -> ErlangHost:
        """Write a fresh cookie under ``home`` and pick a port for the epmd."""
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        return cls(home, free_port())

    def env(self) -> dict[str, str]:
        """Return the environment a node and the CLI run with (no RABBITMQ_* of the machine's)."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        return {
            **environment,
            "HOME": str(self.home),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def kill_epmd(self) -> None:
        """Stop the epmd once its nodes are gone."""
        epmd = [str(_find("epmd")), "-port", str(self.epmd_port), "-kill"]
        # epmd refuses -kill while it still lists a node, which it does for a moment
        # after the node dies.
        for _ in range(50):
            done = subprocess.run(epmd, env=self.env(), capture_output=True, timeout=10)
            if b"living nodes" not in done.stdout + done.stderr:
                return
            time.sleep(0.1)


class OwnedRabbitMQ:
    """A RabbitMQ node of its own (name, ports, Erlang cookie, epmd, data folder).

    Parameters
    ----------
    folder
        Where its config, data (mnesia), logs and Erlang cookie go.
    config
        The ``rabbitmq.conf`` to run (defaults only otherwise); the listener
        ports of the node and of its plugins are appended to it.
    plugins
        Plugins to enable: ``rabbitmq_management`` listens on ``management_port``
        and ``rabbitmq_mqtt`` on ``mqtt_port``, both free ports of their own.
    erlang
        The cookie and epmd to share with other nodes (a cluster's); the node
        has its own otherwise.
    advanced
        The ``advanced.config`` to run (Erlang terms, for settings that
        ``rabbitmq.conf`` has no key for); none otherwise.
    """

    def __init__(
        self,
        folder: Path,
        config: str = "",
        plugins: tuple[str, ...] = (),
        *,
        erlang: ErlangHost | None = None,
        advanced: str = "",
    ) -> None:
        server, ctl = _rabbitmq_scripts()
        if server is None or ctl is None or _find("epmd") is None:
            raise FileNotFoundError("no rabbitmq-server, rabbitmqctl or epmd found")
        self.folder = folder
        self.port = free_port()
        self.node = f"fedmq-test-{secrets.token_hex(4)}@localhost"
        self._server, self._ctl = server, ctl
        self._child = _Child(folder, "rabbitmq")
        self._dist_port = str(free_port())
        self.management_port = free_port()
        self.mqtt_port = free_port()
        self._config, self._plugins, self._advanced = config, plugins, advanced
        # A node of its own owns its epmd; a cluster's nodes share the cluster's.
        self._owns_erlang = erlang is None
        self.erlang = erlang or ErlangHost.create(folder / "home")
        self._base_env = self._prepare(folder)

    @property
    def url(self) -> str:
        """Return the ``amqp://`` URL FedMQ's commands connect with."""
        return amqp_url(self.port)

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and wait until ``rabbitmqctl await_startup`` says it booted."""
        env = {
            **self._base_env,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": self._dist_port,
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.folder / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.folder / "rabbitmq.pid"),
            # The machine's rabbitmq-env.conf names the shared node; ignore it.
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        _wait_port_free(self.port)
        self._child.spawn([self._server], env)
        # The AMQP port opens near the end of the boot; one CLI call then confirms it
        # (each call starts an Erlang VM, ~0.7 s of CPU, so polling it is wasteful).
        booted = _wait(lambda: _listening(self.port), timeout, self._child.alive)
        if not booted or not self._ctl_ok("await_startup", "--timeout", "30"):
            self.close()
            raise RuntimeError(f"RabbitMQ did not start on {self.port}:\n{self.log()[-4000:]}")

    def stop(self, *, graceful: bool = True) -> None:
        """SIGTERM (RabbitMQ's graceful stop) or, with ``graceful=False``, SIGKILL to the node.

        SIGTERM runs the same shutdown as ``rabbitmqctl stop`` without the CLI's
        second of start-up, so the broker goes down the moment a test asks. The
        ``rabbitmq-server`` script passes the signal on to the Erlang VM.
        """
        if graceful:
            self._child.terminate()
        else:
            self._child.signal_group(signal.SIGKILL)
        self._child.wait(timeout=30)

    def close(self) -> None:
        """Kill the node and, unless it is a cluster's, its private epmd; idempotent."""
        self._child.signal_group(signal.SIGKILL)
        self._child.wait(timeout=10)
        if self._owns_erlang:
            self.erlang.kill_epmd()

    @property
    def running(self) -> bool:
        """Return whether the node's process runs (started and not stopped or killed)."""
        return self._child.alive()

    def join(self, node: str) -> None:
        """Join the cluster of the running ``node``: stop the app, join, start it again.

        A failed attempt is retried once from a reset node (a fresh test node
        holds nothing to lose), then reported with the node's log.
        """
        steps = (("stop_app",), ("join_cluster", node), ("start_app",))
        failed = next((step for step in steps if not self._ctl_ok(*step)), None)
        if failed is None:
            return
        self.ctl("stop_app")
        again = (("reset",), ("join_cluster", node), ("start_app",))
        failed = next((step for step in again if not self._ctl_ok(*step)), None)
        if failed is not None:
            raise RuntimeError(f"{' '.join(failed)} failed on {self.node}:\n{self.log()[-4000:]}")

    def log(self) -> str:
        """Return what the node printed so far."""
        return self._child.log()

    def _prepare(self, folder: Path) -> dict[str, str]:
        """Write the node's files; return the environment both the node and the CLI need."""
        folder.mkdir(parents=True, exist_ok=True)
        # The shared node's plugins already hold ports 15672 and 1883: take our own.
        # (A plugin's keys are unknown to the node unless the plugin is enabled.)
        listeners = {
            "rabbitmq_management": f"management.tcp.port = {self.management_port}\n"
            "management.tcp.ip = 127.0.0.1",
            "rabbitmq_mqtt": f"mqtt.listeners.tcp.default = 127.0.0.1:{self.mqtt_port}",
        }
        conf = self._config or "# FedMQ test node: defaults only\n"
        extra = "".join(f"\n{listeners[p]}" for p in self._plugins if p in listeners)
        (folder / "rabbitmq.conf").write_text(conf + extra + "\n")
        (folder / "enabled_plugins").write_text(f"[{','.join(self._plugins)}].\n")
        (folder / "rabbitmq-env.conf").write_text("")
        if self._advanced:
            (folder / "advanced.config").write_text(self._advanced)
        return self.erlang.env()

    def ctl(self, *args: str, tool: str = "rabbitmqctl") -> str | None:
        """Run a RabbitMQ CLI tool against this node; return its output, None if it failed.

        Each call starts an Erlang VM (about a second on this machine), so a test
        makes few. A failure goes to the node's log, which test failures print.
        """
        done = subprocess.run(
            [str(Path(self._ctl).with_name(tool)), "-n", self.node, *args],
            env=self._base_env,
            cwd=self.folder,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            with self._child.log_path.open("ab") as log:
                log.write(f"{tool} {' '.join(args)} failed:\n".encode())
                log.write(done.stdout + done.stderr)
            return None
        return done.stdout.decode(errors="replace")

    def _ctl_ok(self, *args: str) -> bool:
        return self.ctl(*args) is not None


def _rabbitmq_scripts() -> tuple[str | None, str | None]:
    """Return RabbitMQ's own server and CLI scripts (not Debian's run-as-rabbitmq wrappers)."""
    if (_RABBITMQ_LIBEXEC / "rabbitmq-server").exists():
        return str(_RABBITMQ_LIBEXEC / "rabbitmq-server"), str(_RABBITMQ_LIBEXEC / "rabbitmqctl")
    return _find("rabbitmq-server"), _find("rabbitmqctl")


_QUORUM_STATS_OFTEN = "[{rabbit, [{quorum_tick_interval, 500}]}].\n"
"""Quorum queues report their counts every 0.5 s (5 s by default), so ``queue()`` is current."""


class OwnedRabbitCluster:
    """RabbitMQ nodes of their own (three by default) joined into one cluster on loopback ports.

    The nodes share a cookie and a private epmd (``ErlangHost``); each has its own
    ports, node name and data folder. They boot together, then every node but
    the first joins the first as an operator would join one: ``rabbitmqctl
    stop_app``, ``join_cluster``, ``start_app``. Users, vhosts, exchanges and
    queue definitions are the cluster's; a quorum queue has a member on every
    node and one leader (``leader``).

    Parameters
    ----------
    folder
        Where the shared cookie and each node's folder (``node-<i>``) go.
    size
        How many nodes.
    """

    def __init__(self, folder: Path, size: int = 3) -> None:
        self.erlang = ErlangHost.create(folder / "home")
        self.nodes = [
            OwnedRabbitMQ(folder / f"node-{i}", erlang=self.erlang, advanced=_QUORUM_STATS_OFTEN)
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """Return the ``amqp://`` URL naming every node, first node first."""
        return self.url_from(self.nodes[0])

    def url_from(self, first: OwnedRabbitMQ) -> str:
        """Return the URL naming every node, starting at ``first`` and going round."""
        at = self.nodes.index(first)
        hosts = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[at:] + self.nodes[:at])
        return f"amqp://guest:guest@{hosts}/%2F"

    def start(self, timeout: float = 90.0) -> None:
        """Boot every node, then join the others to the first; raise if any step fails."""
        _all(lambda node: node.start(timeout), self.nodes)
        first = self.nodes[0].node
        # One at a time: two nodes joining the first at once race in its schema
        # merge (Mnesia, RabbitMQ 3.10), and one boots with {mnesia_app, start}
        # failing (seen in CI under load).
        for node in self.nodes[1:]:
            node.join(first)

    def queue(self, name: str) -> dict[str, Any]:
        """Return a queue's type, leader, ready and unacked counts, asked of a running node."""
        asking = next(node for node in self.nodes if node.running)
        columns = ("name", "type", "leader", "messages_ready", "messages_unacknowledged")
        listing = asking.ctl("-q", "list_queues", *columns, "--formatter", "json")
        if listing is None:
            raise RuntimeError(f"list_queues failed on {asking.node}:\n{asking.log()[-2000:]}")
        rows: list[dict[str, Any]] = json.loads(listing)
        found = [row for row in rows if row["name"] == name]
        if not found:
            raise RuntimeError(f"no queue {name} on the cluster")
        return found[0]

    def running_nodes(self, asking: OwnedRabbitMQ) -> set[str]:
        """Return the names of the nodes that ``asking`` sees running in its cluster."""
        status = asking.ctl("-q", "cluster_status", "--formatter", "json")
        if status is None:
            raise RuntimeError(f"cluster_status failed on {asking.node}:\n{asking.log()[-2000:]}")
        return set(json.loads(status)["running_nodes"])

    def leader(self, queue: str) -> OwnedRabbitMQ:
        """Return the node leading quorum queue ``queue``."""
        row = self.queue(queue)
        if row["type"] != "quorum":
            raise RuntimeError(f"{queue} is a {row['type']} queue, not a quorum queue")
        return next(node for node in self.nodes if node.node == row["leader"])

    def close(self) -> None:
        """Kill every node, then the shared epmd; idempotent."""
        for node in self.nodes:
            node.close()
        self.erlang.kill_epmd()


def _all(run: Callable[[OwnedRabbitMQ], None], nodes: list[OwnedRabbitMQ]) -> None:
    """Run ``run`` on every node at once (each mostly waits on its VM); re-raise a failure."""
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        for done in [pool.submit(run, node) for node in nodes]:
            done.result()


class _Ownable(Protocol):
    def start(self) -> None: ...
    def close(self) -> None: ...


_Broker = TypeVar("_Broker", bound=_Ownable)


def owned_mosquitto(folder: Path) -> AbstractContextManager[OwnedMosquitto]:
    """Return a context yielding a started private Mosquitto, killed at the end whatever happens."""
    return _started(OwnedMosquitto, folder)


def owned_rabbitmq(
    folder: Path, config: str = "", plugins: tuple[str, ...] = ()
) -> AbstractContextManager[OwnedRabbitMQ]:
    """Return a context yielding a started private RabbitMQ node, killed with its epmd after."""
    return _started(partial(OwnedRabbitMQ, config=config, plugins=plugins), folder)


def owned_rabbitmq_cluster(
    folder: Path, size: int = 3
) -> AbstractContextManager[OwnedRabbitCluster]:
    """Return a context yielding a started private RabbitMQ cluster, every node killed after."""
    return _started(partial(OwnedRabbitCluster, size=size), folder)


@contextmanager
def _started(kind: Callable[[Path], _Broker], folder: Path) -> Iterator[_Broker]:
    """Yield a started ``kind`` broker; skip (fail under CI) if it is not installed."""
    try:
        broker = kind(folder)
    except FileNotFoundError as exc:
        skip_or_fail(str(exc))
        raise
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


def shipped_rabbitmq_config(admin_password: str) -> str:
    """Return the shipped rabbitmq.conf without its ports (the node picks them), plus an admin."""
    shipped = Path(__file__).resolve().parents[2] / "deploy/rabbitmq/rabbitmq.conf"
    conf = re.sub(
        r"(?m)^(listeners\.tcp\.default|\S+\.tcp(\.default|\.port)) = .*$", "", shipped.read_text()
    )
    return (
        conf + f"\ndefault_user = admin\ndefault_pass = {admin_password}\n"
        "default_user_tags.administrator = true\n"
    )
