"""A real round at fleet scale: service and worker as processes, the fleet on the MQTT hub.

Starts ``fedmq server`` and ``fedmq worker`` (children, logs in the work
folder) on the broker, creates an experiment whose devices do trivial local
work on a model of ``--params`` parameters, enrolls ``--devices`` devices over
REST, runs them in this process on one ``broker.mqtt_hub`` hub, and runs
``--rounds`` rounds of ``--cohort`` devices (default: all of them). Prints
one JSON object: setup times, each round's figures and duration, and this
process's threads, memory and open files.

Run ``python -m experiments.bench.fleet_round --devices 1000`` against the
local Mosquitto (``--broker`` for another; ``--device-broker`` puts the devices
on another URL than the service and worker, e.g. a RabbitMQ's MQTT plugin
while they speak AMQP to the same node). MNIST (for more devices than the
1,437 digits have examples) is found through ``FEDMQ_DATA_DIR`` or
``../shared/data``. ``--timers`` adds where the time goes (``Timers``): the
children run under ``python -m experiments.bench.fleet_round --timed FILE``,
which wraps a few functions (upload, hashing, store, decode, fold) with
wall-clock timers before it runs ``fedmq``; this process wraps the devices'
side the same way. ``experiments.bench.fleet_scale`` runs this at several
sizes beside ``simulate`` and Flower's simulation.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.identity import Identity, decode_public_key
from broker.topics import Topics
from device_sdk.emulator.fleet import Fleet, fleet_transports
from experiments.bench.fleet_memory import DATA_DIRS, counting_trainers, open_files, rss

DEFAULT_BROKER = "mqtt://127.0.0.1:1883?session_expiry=120"
REPO = Path(__file__).resolve().parents[2]

BIG = 1 << 20
"""Hashes of fewer bytes than this (message ids, signatures' digests) are not timed."""

TIMED: tuple[tuple[str, str, str, str], ...] = (
    # (label, module, class or "" for a module function, attribute)
    ("sha256 (>= 1 MiB)", "hashlib", "", "sha256"),
    ("device: download global model", "device_sdk.fetch", "", "_get"),
    ("device: decode global model", "device_sdk.client", "", "decode_weights"),
    ("device: encode update", "device_sdk.client", "", "encode_weights"),
    ("device: upload (PUT, sha256 incl.)", "device_sdk.fetch", "", "_put"),
    ("server: upload request (receive, sha256, write)", "flask", "Flask", "full_dispatch_request"),
    ("store: write blob (after its sha256)", "model_store.local", "LocalStore", "_put_blob_hashed"),
    ("store: read blob (+ verify sha256)", "model_store.local", "LocalStore", "get_blob"),
    (
        "worker: whole update (gate, fetch, decode, fold)",
        "aggregator_service.worker",
        "AggregatorWorker",
        "_on_update",
    ),
    ("worker: gate (frame decode, signature)", "aggregator_service.gate", "UpdateGate", "admit"),
    (
        "worker: update bytes (store read + sha256)",
        "aggregator_service.worker",
        "AggregatorWorker",
        "_update_bytes",
    ),
    ("worker: decode update", "aggregator_service.worker", "", "decode_update_weights"),
    ("worker: check finite", "aggregator_service.worker", "", "check_finite"),
    ("worker: fold (FedAvg)", "aggregator_service.strategies.fedavg", "FedAvg", "fold"),
    ("worker: checkpoint share", "aggregator_service.worker", "AggregatorWorker", "_checkpoint"),
    ("worker: flush share at close", "aggregator_service.worker", "AggregatorWorker", "_flush"),
    (
        "worker: combine + store version",
        "aggregator_service.worker",
        "AggregatorWorker",
        "_combine",
    ),
    ("service: held-out evaluation", "aggregator_service.evaluation", "OnnxEvaluator", "evaluate"),
)
"""Where the time of a large-update round goes: the functions ``Timers`` wraps.

Each figure is the wall time spent inside the function summed over the threads
that ran it (so concurrent uploads add up past the round's duration) and the
calls. Nested sites count in both (the worker's whole update includes its
gate, fetch, decode and fold; a store read includes its sha256)."""

_SERVER_UPLOAD = "server: upload request (receive, sha256, write)"


class Timers:
    """Wall-clock timers wrapped around the ``TIMED`` functions of this process.

    ``install`` replaces each function found (modules not imported yet are
    imported; a missing one is skipped) by a wrapper adding its time and one
    call to the site's total; ``uninstall`` puts the originals back.
    ``snapshot`` returns ``{label: [seconds, calls]}``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, list[float]] = {}
        self._undo: list[Callable[[], None]] = []

    def snapshot(self) -> dict[str, list[float]]:
        """Return a copy of every site's ``[seconds, calls]`` so far."""
        with self._lock:
            return {k: list(v) for k, v in self._totals.items()}

    def add(self, label: str, seconds: float) -> None:
        """Count one call of ``seconds`` at ``label``."""
        with self._lock:
            total = self._totals.setdefault(label, [0.0, 0])
            total[0] += seconds
            total[1] += 1

    def install(self) -> Timers:
        """Wrap every ``TIMED`` function that exists here; return self."""
        for label, module_name, owner_name, attr in TIMED:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            owner = getattr(module, owner_name) if owner_name else module
            original = getattr(owner, attr, None)
            if original is None:
                continue
            setattr(owner, attr, self._wrap(label, original))
            self._undo.append(functools.partial(setattr, owner, attr, original))
        return self

    def uninstall(self) -> None:
        """Put the original functions back."""
        while self._undo:
            self._undo.pop()()

    def _wrap(self, label: str, original: Any) -> Any:
        clock = time.perf_counter
        if original is hashlib.sha256:

            def sha256(*args: Any, **kwargs: Any) -> Any:
                if not args or len(args[0]) < BIG:
                    return original(*args, **kwargs)
                began = clock()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.add(label, clock() - began)

            return sha256
        if label == _SERVER_UPLOAD:  # every request passes: time the uploads only

            def dispatch(app: Any) -> Any:
                from flask import request

                if "/uploads/" not in request.path:
                    return original(app)
                began = clock()
                try:
                    return original(app)
                finally:
                    self.add(label, clock() - began)

            return dispatch

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = clock()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(label, clock() - began)

        return timed

    def dump_every(self, path: Path, period_s: float = 0.2) -> None:
        """Write the snapshot to ``path`` (atomically) every ``period_s``, in a daemon thread."""

        def loop() -> None:
            while True:
                self.dump(path)
                time.sleep(period_s)

        threading.Thread(target=loop, name="bench-timers", daemon=True).start()

    def dump(self, path: Path) -> None:
        """Write the snapshot to ``path`` atomically."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, path)


def diff_timers(after: dict[str, list[float]], before: dict[str, list[float]]) -> dict[str, Any]:
    """Return ``after - before`` per site, sites with no calls left out."""
    out: dict[str, Any] = {}
    for label, (seconds, calls) in after.items():
        s0, c0 = before.get(label, [0.0, 0])
        if calls - c0:
            out[label] = {"seconds": round(seconds - s0, 4), "calls": int(calls - c0)}
    return out


def timed_child(out: Path, argv: list[str]) -> None:
    """Run ``fedmq <argv>`` in this process with the ``TIMED`` functions timed into ``out``."""
    timers = Timers().install()
    timers.dump_every(out)  # a stopped child keeps what it wrote last (at most 0.2 s old)
    from fedmq.cli import main as fedmq_main

    try:
        status = fedmq_main(argv)
    finally:
        timers.dump(out)
    raise SystemExit(status)


class Service:
    """The ``fedmq server`` and ``fedmq worker`` children and a REST client of the server.

    With ``timed``, each child runs under ``timed_child`` and writes its
    timers to ``<name>.timers.json`` in the work folder (``timers``).
    """

    def __init__(self, workdir: Path, broker: str, namespace: str, *, timed: bool = False) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.token = secrets.token_urlsafe(16)
        self.timed = timed
        self.env = {
            **os.environ,
            "FEDMQ_HOME": str(workdir / "home"),
            "FEDMQ_KEYS": str(workdir / "home" / "keys"),
            "FEDMQ_BROKER_URL": broker,
            "FEDMQ_STORE_URL": (workdir / "store").as_uri(),
            "FEDMQ_DB_URL": f"sqlite:///{workdir / 'fedmq.db'}",
            "FEDMQ_SERVER_URL": f"http://127.0.0.1:{self.port}",
            "FEDMQ_NAMESPACE": namespace,
            "FEDMQ_ADMIN_TOKEN": self.token,
            "FEDMQ_DATA_DIR": os.path.abspath(DATA_DIRS[0]),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        """Start the server, wait for it, then the worker (it pins the service's key)."""
        self._spawn("server", "server", "--port", str(self.port))
        self._wait(lambda: self._healthy(), 60, "the server")
        self._spawn("worker", "worker", "--name", f"bench-{uuid.uuid4().hex[:6]}")
        self._wait(lambda: "fedmq worker on" in self.log("worker"), 60, "the worker")

    def stop(self) -> None:
        """Terminate the children (SIGTERM, then SIGKILL)."""
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = 60) -> Any:
        """Call the REST API; return the decoded JSON answer."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/v1{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def log(self, name: str) -> str:
        """Return what a child printed so far."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def timers(self) -> dict[str, dict[str, list[float]]]:
        """Return each timed child's latest timers (empty when not timed)."""
        out: dict[str, dict[str, list[float]]] = {}
        for name in self.children:
            path = self.workdir / f"{name}.timers.json"
            if self.timed and path.exists():
                out[name] = json.loads(path.read_text())
        return out

    def cpu_s(self, name: str) -> float:
        """Return the CPU seconds a child used so far."""
        with open(f"/proc/{self.children[name].pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self, name: str) -> float:
        """Return a child's resident memory in MiB."""
        with open(f"/proc/{self.children[name].pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        runner = ["-m", "fedmq"]
        if self.timed:
            timers = self.workdir / f"{name}.timers.json"
            runner = ["-m", "experiments.bench.fleet_round", "--timed", str(timers)]
        self.children[name] = subprocess.Popen(
            [sys.executable, *runner, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )

    def _healthy(self) -> bool:
        try:
            return bool(self.call("GET", "/health") == {"status": "ok"})
        except OSError:
            return False

    def _wait(self, condition: Any, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{what} did not come up")


def experiment_config(devices: int, cohort: int, params: int, rounds: int) -> dict[str, Any]:
    """Return an experiment of ``devices`` devices and a model of about ``params`` parameters."""
    digits = devices <= 1437
    inputs = 64 if digits else 784
    return {
        "name": f"fleet-round-{devices}",
        "seed": 7,
        "model": {
            "zoo": "mlp",
            "input_shape": [64] if digits else [1, 28, 28],
            "num_classes": 10,
            "hidden": [max(1, (params - 10) // (inputs + 11))],
        },
        "data": {
            "dataset": "digits" if digits else "mnist",
            "devices": devices,
            "partition": "iid",
        },
        "rounds": {
            "count": rounds,
            "devices_per_round": cohort,
            "over_selection": 1.0,
            "min_reports": cohort,
            "deadline_s": 600.0,
        },
        "training": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.05},
    }


def model_parameters(config: dict[str, Any]) -> int:
    """Return the exact parameter count of ``experiment_config``'s one-hidden-layer MLP."""
    inputs = 1
    for size in config["model"]["input_shape"]:
        inputs *= int(size)
    hidden = int(config["model"]["hidden"][0])
    classes = int(config["model"]["num_classes"])
    return inputs * hidden + hidden + hidden * classes + classes


def enroll_all(service: Service, identities: list[Identity], threads: int = 8) -> bytes:
    """Register every device over REST, a few at a time; return the service key."""

    def enroll(identity: Identity) -> bytes:
        body = {
            "platform": "emulated",
            "public_key": identity.public_key_text,
            "device_id": identity.name,
        }
        return decode_public_key(str(service.call("POST", "/devices", body)["service_key"]))

    with ThreadPoolExecutor(threads) as pool:
        keys = set(pool.map(enroll, identities))
    if len(keys) != 1:
        raise RuntimeError("the service answered with different keys")
    return keys.pop()


@contextmanager
def timed_here(enabled: bool) -> Iterator[Timers | None]:
    """Yield this process's ``Timers`` installed (None when not ``enabled``); uninstall after."""
    if not enabled:
        yield None
        return
    timers = Timers().install()
    try:
        yield timers
    finally:
        timers.uninstall()


def distributed_round(
    devices: int,
    params: int,
    rounds: int,
    broker: str = DEFAULT_BROKER,
    *,
    device_broker: str | None = None,
    cohort: int | None = None,
    workers: int = 4,
    timers: bool = False,
) -> dict[str, Any]:
    """Start server and worker, run the fleet here, run ``rounds`` rounds; return the figures.

    Round 1 runs alone (it warms caches and the devices' model download); the
    other rounds are requested after it, so ``timers`` (when asked for) are
    read between the two and ``breakdown`` covers rounds 2..``rounds`` only.
    ``round_s_median`` is the median of the service's own durations of rounds
    2..``rounds``. ``device_broker`` puts the devices on another URL than the
    service and worker (default: the same).
    """
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    cohort = cohort or devices
    config = experiment_config(devices, cohort, params, rounds)
    figures: dict[str, Any] = {
        "devices": devices,
        "cohort": cohort,
        "params": model_parameters(config),
        "service_broker": _redacted(broker),
        "device_broker": _redacted(device_broker or broker),
    }
    with tempfile.TemporaryDirectory(prefix="fleet-round-") as folder, timed_here(timers) as here:
        service = Service(Path(folder), broker, namespace, timed=timers)
        pool = fleet_transports(device_broker or broker, workers=workers, devices=devices)
        training = ThreadPoolExecutor(workers, thread_name_prefix="fedmq-train")
        fleet: Fleet | None = None
        try:
            service.start()
            experiment_id = service.call("POST", "/experiments", config)["id"]
            fleet = _online_fleet(
                service, pool, training, config, experiment_id, namespace, figures
            )
            cpu = _cpu(service)
            began = time.monotonic()
            _rounds(service, experiment_id, 1, 1)
            cpu_warm = _cpu(service)
            timed_warm = _all_timers(service, here)
            if rounds > 1:
                _rounds(service, experiment_id, rounds - 1, rounds)
            figures["rounds_wall_s"] = time.monotonic() - began
            figures["rounds"] = _round_list(service, experiment_id)
            durations = [float(r["duration_s"]) for r in figures["rounds"][1:]]
            figures["round_s_median"] = statistics.median(durations) if durations else None
            figures["all_accepted"] = all(
                r["state"] == "committed" and r["accepted"] == cohort for r in figures["rounds"]
            )
            now = _cpu(service)
            figures["cpu_s_during_rounds"] = {k: v - cpu[k] for k, v in now.items()}
            figures["cpu_s_rounds_2_on"] = {k: v - cpu_warm[k] for k, v in now.items()}
            if timers:
                after = _all_timers(service, here)
                figures["breakdown"] = {
                    name: diff_timers(after[name], timed_warm.get(name, {})) for name in after
                }
            figures["fleet_process"] = {
                "threads": threading.active_count(),
                "rss_mib": rss() / 2**20,
                "open_files": open_files(),
            }
            figures["server_rss_mib"] = service.rss_mib("server")
            figures["worker_rss_mib"] = service.rss_mib("worker")
            figures["fleet_summary"] = fleet.summary()
        finally:
            if fleet is not None:
                fleet.stop()
            training.shutdown(wait=False, cancel_futures=True)
            pool.close()
            service.stop()
    return figures


def _all_timers(service: Service, here: Timers | None) -> dict[str, dict[str, list[float]]]:
    """Return the timers of the children and of this process (the fleet), once settled."""
    if here is None:
        return {}
    time.sleep(0.6)  # the children dump every 0.2 s; between rounds nothing runs
    return {**service.timers(), "fleet": here.snapshot()}


def _redacted(url: str) -> str:
    """Return ``url`` without its password."""
    scheme, sep, rest = url.partition("://")
    login, at, host = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}{login.partition(':')[0]}:***@{host}"


def _online_fleet(
    service: Service,
    pool: Any,
    training: ThreadPoolExecutor,
    config: dict[str, Any],
    experiment_id: str,
    namespace: str,
    figures: dict[str, Any],
) -> Fleet:
    """Enroll, build, connect and start the fleet; wait until the service has every check-in."""
    devices = int(config["data"]["devices"])
    prefix = f"r{uuid.uuid4().hex[:5]}"
    started = time.monotonic()
    identities = [Identity.generate(f"{prefix}-{i:04d}") for i in range(devices)]
    service_key = enroll_all(service, identities)
    enrolled = time.monotonic()
    by_name = {identity.name: identity for identity in identities}
    fleet = Fleet(
        pool,
        config["data"],
        seed=int(config["seed"]),
        experiment_id=experiment_id,
        run=lambda job: _submit(training, job),
        prefix=prefix,
        make_trainer=counting_trainers,
        enroll=lambda identity, platform: service_key,
        topics=Topics(namespace),
        identities=by_name.__getitem__,
        data_dir=DATA_DIRS,
    )
    built = time.monotonic()
    fleet.start(heartbeat_s=30.0)
    online = time.monotonic()
    service._wait(lambda: _checked_in(service) >= devices, 600, "every check-in")
    seen = time.monotonic()
    figures["setup_s"] = {
        "enroll": enrolled - started,
        "build_and_connect": built - enrolled,
        "start": online - built,
        "service_saw_all": seen - built,
    }
    return fleet


def _submit(training: ThreadPoolExecutor, job: Callable[[], None]) -> None:
    """Run a device's training job on the training threads."""
    training.submit(job)


def _cpu(service: Service) -> dict[str, float]:
    """Return the CPU seconds used so far by the fleet (this process), the server and the worker."""
    times = os.times()
    return {
        "fleet": times.user + times.system,
        "server": service.cpu_s("server"),
        "worker": service.cpu_s("worker"),
    }


def _checked_in(service: Service) -> int:
    try:
        listing = service.call("GET", "/devices")
    except OSError:
        return 0
    return sum(1 for d in listing["devices"] if d.get("last_seen"))


def _rounds(service: Service, experiment_id: str, count: int, total: int) -> None:
    """Request ``count`` more rounds; wait until ``total`` rounds have ended."""
    # The request that starts a round sends its tasks before it answers: over a
    # minute for a cohort of 10,000 while each task waited for its own PUBACK.
    began = time.monotonic()
    service.call("POST", f"/experiments/{experiment_id}/rounds", {"count": count}, timeout=900)
    print(f"requesting {count} round(s) took {time.monotonic() - began:.1f} s", file=sys.stderr)

    def done() -> bool:
        try:
            rounds = service.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
        except OSError:  # a server busy with a 10,000-device round answers late
            return False
        return sum(1 for r in rounds if r["state"] != "training") >= total

    service._wait(done, 1800, f"{total} rounds")


def _round_list(service: Service, experiment_id: str) -> list[dict[str, Any]]:
    """Return each round's figures (round lists left out, their lengths kept)."""
    rounds = service.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
    keep = ("round", "state", "selected", "reported", "accepted", "rejected", "duration_s")
    out = [{k: r.get(k) for k in keep if not isinstance(r.get(k), list)} for r in rounds]
    for r, raw in zip(out, rounds, strict=True):
        for k in ("selected", "reported", "accepted"):
            if isinstance(raw.get(k), list):
                r[k] = len(raw[k])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    """Parse the arguments, run, print one JSON object (or run a timed child: ``--timed``)."""
    if len(sys.argv) > 2 and sys.argv[1] == "--timed":
        timed_child(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=0, help="devices per round (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    parser.add_argument("--device-broker", help="the devices' broker (default: --broker)")
    parser.add_argument("--workers", type=int, default=4, help="hub lane and training threads")
    parser.add_argument("--timers", action="store_true", help="add where the time goes")
    args = parser.parse_args()
    figures = distributed_round(
        args.devices,
        args.params,
        args.rounds,
        args.broker,
        device_broker=args.device_broker,
        cohort=args.cohort or None,
        workers=args.workers,
        timers=args.timers,
    )
    print(json.dumps(figures, default=str), flush=True)


if __name__ == "__main__":
    main()
