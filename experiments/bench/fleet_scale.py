"""Round overhead at fleet scale, beside Flower's simulation, in one sitting.

Run ``python -m experiments.bench.fleet_scale`` (``--big`` adds N = 10,000 over
Mosquitto; ``--skip-flower`` leaves Flower out; ``--out DIR`` writes the
tables elsewhere). Writes ``experiments/results/bench_fleet.{md,json}``.

For each size, back to back so both sides see the same machine, each
measurement preceded by the machine's load average and busy fraction:

1. FedMQ distributed (``experiments.bench.fleet_round``): ``fedmq server`` and
   ``fedmq worker`` as child processes, the fleet in this process on one MQTT
   hub; devices hand the global weights back (trivial local work). Over the
   shared Mosquitto (127.0.0.1:1883, a namespace of this run's own), and over
   a private RabbitMQ node this bench starts (``tests.e2e.owned_brokers``:
   the shipped ``deploy/rabbitmq/rabbitmq.conf`` with the MQTT plugin on
   ports of its own), devices on its MQTT plugin (3.1.1), server and worker
   on its AMQP listener: the production shape.
2. ``simulate``: the in-process memory bus through ``fedmq.compose.run_experiment``
   (what ``fedmq simulate`` runs), with the same no-op trainer and no
   held-out evaluation: ``simulate()`` itself takes no trainer.
3. Flower's Simulation Engine (Ray) for the same N and P:
   ``../shared/peers/flower/bench.sh run`` with ``SIM_CONFIGS`` of one size
   and no deployment config, its result JSON read back. Its venv must exist
   (``bench.sh install``, run once beforehand; this bench never installs).

A round is the median of rounds 2..R (R = 5). At N = 100, P = 4M (16 MB
updates) FedMQ's processes run with timers (``fleet_round.Timers``) around
upload, hashing, store, decode and fold, and the bench measures the floor on
this machine: sha256 and memcpy throughput and moving 1.6 GB over loopback.
"""

from __future__ import annotations

import argparse
import hashlib
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from aggregator_service import ExperimentConfig
from aggregator_service.persistence.records import RoundRecord
from experiments.bench.fleet_memory import counting_trainers
from experiments.bench.fleet_round import (
    DEFAULT_BROKER,
    REPO,
    diff_timers,
    distributed_round,
    experiment_config,
    model_parameters,
    timed_here,
)
from fedmq.compose import run_experiment
from fedmq.settings import load_settings

RESULTS = Path(__file__).resolve().parents[1] / "results"
FLOWER = REPO.parent / "shared" / "peers" / "flower"
FLOWER_DIR = Path(os.environ.get("FLOWER_DIR", Path(tempfile.gettempdir()) / "flower-bench"))
COMMAND = "python -m experiments.bench.fleet_scale"
P_SMALL, P_LARGE = 100_000, 4_000_000
SIZES = ((100, P_SMALL), (1000, P_SMALL), (100, P_LARGE))
BIG = (10_000, P_SMALL)
MOSQUITTO = "mosquitto"
RABBITMQ = "rabbitmq"
SIMULATE = "simulate"
FLOWER_SIM = "flower-sim"
QUIET_BUSY = 0.35
"""Flower's bench waits (up to 300 s) for the machine to be under this busy fraction; so
does this one before each of FedMQ's measurements, up to ``--quiet-wait``."""


# ----------------------------------------------------------------------------- machine
def machine_cpu() -> tuple[float, float]:
    """Return (busy, total) CPU seconds of the machine since boot, all CPUs."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:9]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    return (sum(values) - idle) / ticks, sum(values) / ticks


def busy_fraction(seconds: float) -> float:
    """Return the machine's busy fraction over the next ``seconds``."""
    b0, t0 = machine_cpu()
    time.sleep(seconds)
    b1, t1 = machine_cpu()
    return (b1 - b0) / max(1e-9, t1 - t0)


def settle(max_wait_s: float) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) for a busy fraction under ``QUIET_BUSY``; return the state."""
    began = time.monotonic()
    busy = busy_fraction(3.0)
    while busy > QUIET_BUSY and time.monotonic() - began < max_wait_s:
        busy = busy_fraction(3.0)
    return {
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "busy_frac_3s": round(busy, 3),
        "quiet_wait_s": round(time.monotonic() - began, 1),
    }


def floor(updates: int = 100, size: int = 16_000_000) -> dict[str, Any]:
    """Measure what moving and hashing ``updates`` x ``size`` bytes costs on this machine.

    sha256 on one thread and on two (hashlib lets go of the GIL), a memcpy
    (numpy copy of one update), and the whole volume sent once over a
    loopback TCP connection (sender and receiver threads, their CPU counted).
    """
    buffer = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    data = buffer.tobytes()
    total = updates * size

    def hash_rate(threads: int, rounds: int = 6) -> float:
        def work() -> None:
            for _ in range(rounds):
                hashlib.sha256(data).digest()

        began = time.perf_counter()
        running = [threading.Thread(target=work) for _ in range(threads)]
        for thread in running:
            thread.start()
        for thread in running:
            thread.join()
        return threads * rounds * size / (time.perf_counter() - began)

    sha1 = hash_rate(1)
    sha2 = hash_rate(2)
    target = np.empty_like(buffer)
    began = time.perf_counter()
    for _ in range(20):
        np.copyto(target, buffer)
    memcpy = 20 * size / (time.perf_counter() - began)
    wall, cpu = _loopback(data, updates)
    return {
        "volume_bytes": total,
        "sha256_1_thread_MBps": sha1 / 1e6,
        "sha256_2_threads_MBps": sha2 / 1e6,
        "memcpy_MBps": memcpy / 1e6,
        "loopback_MBps": total / wall / 1e6,
        "loopback_wall_s": wall,
        "loopback_cpu_s": cpu,
        "hash_once_1_core_s": total / sha1,
        "memcpy_once_s": total / memcpy,
        # One pass of each, one after the other.
        "floor_serial_s": wall + total / sha1,
        # The same CPU spread perfectly over the two cores.
        "floor_two_cores_s": (cpu + total / sha1) / 2,
    }


def _loopback(data: bytes, times: int) -> tuple[float, float]:
    """Send ``data`` ``times`` times over loopback TCP; return (wall s, process CPU s)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        sender = socket.create_connection(("127.0.0.1", port))
        receiver, _ = server.accept()
    total = len(data) * times
    view = memoryview(bytearray(1 << 20))

    def send() -> None:
        with sender:
            for _ in range(times):
                sender.sendall(data)

    cpu0, began = time.process_time(), time.perf_counter()
    thread = threading.Thread(target=send)
    thread.start()
    got = 0
    with receiver:
        while got < total:
            n = receiver.recv_into(view)
            if not n:
                break
            got += n
    thread.join()
    return time.perf_counter() - began, time.process_time() - cpu0


# ----------------------------------------------------------------------------- RabbitMQ
@contextmanager
def private_rabbitmq(folder: Path) -> Iterator[dict[str, str]]:
    """Yield the AMQP and MQTT URLs of a RabbitMQ node of this run's own, killed after.

    The node runs the shipped ``deploy/rabbitmq/rabbitmq.conf`` (MQTT plugin
    publishing to the ``fedmq`` exchange, ``mqtt.prefetch`` 1000) on free
    loopback ports, an admin of its own, its own Erlang cookie and epmd.
    """
    from tests.e2e.owned_brokers import OwnedRabbitMQ, shipped_rabbitmq_config

    password = secrets.token_urlsafe(16)
    node = OwnedRabbitMQ(folder, shipped_rabbitmq_config(password), ("rabbitmq_mqtt",))
    try:
        began = time.monotonic()
        node.start()
        yield {
            "amqp": f"amqp://admin:{password}@127.0.0.1:{node.port}/%2F",
            "mqtt": f"mqtt://admin:{password}@127.0.0.1:{node.mqtt_port}?protocol=3.1.1",
            "boot_s": f"{time.monotonic() - began:.1f}",
            "node": node.node,
        }
    finally:
        node.close()


# ----------------------------------------------------------------------------- the sides
def simulate_round(devices: int, params: int, rounds: int, timers: bool) -> dict[str, Any]:
    """Run ``rounds`` rounds on the memory bus in this process; return the figures."""
    raw = experiment_config(devices, devices, params, rounds)
    config = ExperimentConfig.from_dict(raw)
    warm: list[dict[str, list[float]]] = []
    with timed_here(timers) as here:

        def progress(record: RoundRecord) -> None:
            if here is not None and record.number == 1:
                warm.append(here.snapshot())

        began = time.monotonic()
        result = run_experiment(
            config,
            broker_url="memory://",
            make_trainer=counting_trainers,
            evaluate=False,
            progress=progress,
            timeout_s=1800,
            settings=load_settings({}),
        )
        wall = time.monotonic() - began
        after = here.snapshot() if here is not None else None
    durations = [r.duration_s or 0.0 for r in result.rounds]
    figures: dict[str, Any] = {
        "devices": devices,
        "params": model_parameters(raw),
        "round_s_all": durations,
        "round_s_median": statistics.median(durations[1:]),
        "all_accepted": all(
            r.state == "committed" and len(r.accepted) == devices for r in result.rounds
        ),
        "run_wall_s": wall,
    }
    if after is not None:
        figures["breakdown"] = {"in-process": diff_timers(after, warm[0] if warm else {})}
    return figures


def flower_sim(devices: int, params: int, rounds: int) -> dict[str, Any]:
    """Run Flower's Simulation Engine at one size through its ``bench.sh``; return its JSON."""
    venv = FLOWER_DIR / "venv"
    if not (venv / "bin" / "python").exists():
        return {"status": f"skipped: no Flower venv at {venv} (bench.sh install, once)"}
    with tempfile.TemporaryDirectory(prefix="flower-results-") as results:
        env = {
            **os.environ,
            "FLOWER_DIR": str(FLOWER_DIR),
            "VENV": str(venv),
            "RESULTS": results,
            "ROUNDS": str(rounds),
            "SIM_CONFIGS": f"{devices}:{params}",
            # bench.sh reads an empty value as unset (its defaults): a blank runs no deployment.
            "DEPLOY_CONFIGS": " ",
        }
        began = time.monotonic()
        done = subprocess.run(
            ["bash", str(FLOWER / "bench.sh"), "run"],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
        path = Path(results) / f"sim_n{devices}_p{params}.json"
        if not path.exists():
            tail = (done.stdout + done.stderr)[-2000:]
            return {"status": f"failed: no result (rc={done.returncode}): {tail}"}
        figures: dict[str, Any] = json.loads(path.read_text())
        figures["bench_sh_wall_s"] = time.monotonic() - began
        return figures


# ----------------------------------------------------------------------------- the sitting
class Sitting:
    """The rows measured so far, saved after each one (a crash keeps what ran)."""

    def __init__(self, out: Path, argv: list[str]) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "command": " ".join([COMMAND, *argv]),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "rows": [],
            "floor": None,
            "rabbitmq": None,
            "skipped": [],
        }

    def measure(
        self, side: str, devices: int, params: int, run: Callable[[], dict[str, Any]], wait: float
    ) -> None:
        """Run one measurement with the machine's state before and after; save."""
        before = settle(wait) if side != FLOWER_SIM else {"loadavg": list(os.getloadavg())}
        began = time.monotonic()
        try:
            figures = run()
        except Exception as exc:  # one failed row must not lose the sitting
            figures = {"status": f"failed: {type(exc).__name__}: {str(exc)[:1500]}"}
        row = {
            "side": side,
            "devices": devices,
            "params_requested": params,
            "machine_before": before,
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "measure_wall_s": round(time.monotonic() - began, 1),
            **figures,
        }
        self.data["rows"].append(row)
        median = figures.get("round_s_median", figures.get("round_median_s"))
        print(
            f"[{datetime.now().strftime('%H:%M:%S')}] {side} N={devices} P={params}: "
            f"median round {median} s, load {before['loadavg']} "
            f"{figures.get('status', '')}",
            flush=True,
        )
        self.save()

    def save(self) -> None:
        """Write the JSON and the markdown."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "bench_fleet.json").write_text(json.dumps(self.data, indent=2, default=str))
        (self.out / "bench_fleet.md").write_text(render(self.data))


def main() -> None:
    """Measure every row in one sitting and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--big", action="store_true", help="add N = 10,000 over Mosquitto")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (median of 2..R)")
    parser.add_argument("--skip-flower", action="store_true")
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=SIZES,
        help="N:P pairs to measure, comma-separated (default: 100:100000,1000:100000,100:4000000)",
    )
    parser.add_argument(
        "--sides",
        default=f"{MOSQUITTO},{RABBITMQ},{SIMULATE},{FLOWER_SIM}",
        help="comma-separated subset of the sides to run",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=30.0, help="max seconds to wait for a quiet machine"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the .md from the .json in --out"
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads((args.out / "bench_fleet.json").read_text())
        (args.out / "bench_fleet.md").write_text(render(saved))
        return
    sides = set(args.sides.split(","))
    if args.skip_flower:
        sides.discard(FLOWER_SIM)
    sitting = Sitting(args.out, sys.argv[1:])
    sitting.data["floor"] = {"machine_before": settle(args.quiet_wait), **floor()}
    print(json.dumps(sitting.data["floor"]), flush=True)
    sitting.save()
    with (
        tempfile.TemporaryDirectory(prefix="bench-rabbitmq-") as folder,
        _rabbit(sitting, Path(folder), RABBITMQ in sides) as rabbit,
    ):
        sizes = [*args.sizes, BIG] if args.big else list(args.sizes)
        for devices, params in sizes:
            big = (devices, params) == BIG
            timers = params == P_LARGE
            rounds = args.rounds if not big else min(args.rounds, 3)
            wait = args.quiet_wait
            if MOSQUITTO in sides:
                run = partial(
                    distributed_round, devices, params, rounds, DEFAULT_BROKER, timers=timers
                )
                sitting.measure(MOSQUITTO, devices, params, run, wait)
            # RabbitMQ at P = 4M would time the same HTTP uploads again (the weights do
            # not go through the broker): P = 100k only.
            if RABBITMQ in sides and params == P_SMALL and not big:
                if rabbit is None:
                    sitting.data["skipped"].append(f"rabbitmq N={devices} P={params}: no node")
                else:
                    run = partial(
                        distributed_round,
                        devices,
                        params,
                        rounds,
                        rabbit["amqp"],
                        device_broker=rabbit["mqtt"],
                    )
                    sitting.measure(RABBITMQ, devices, params, run, wait)
            if SIMULATE in sides and not big:
                run = partial(simulate_round, devices, params, rounds, timers)
                sitting.measure(SIMULATE, devices, params, run, wait)
            if FLOWER_SIM in sides and not big:
                run = partial(flower_sim, devices, params, rounds)
                sitting.measure(FLOWER_SIM, devices, params, run, wait)
    sitting.data["ended"] = datetime.now(UTC).isoformat(timespec="seconds")
    sitting.save()
    print(render(sitting.data))


def _sizes(text: str) -> tuple[tuple[int, int], ...]:
    """Parse ``N:P,N:P`` (devices and parameters per size)."""
    try:
        pairs = tuple(tuple(int(x) for x in item.split(":")) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want N:P[,N:P...], got {text!r}") from None
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"want N:P[,N:P...] of positive numbers, got {text!r}")
    return tuple((p[0], p[1]) for p in pairs)


@contextmanager
def _rabbit(sitting: Sitting, folder: Path, wanted: bool) -> Iterator[dict[str, str] | None]:
    """Yield a private RabbitMQ node's URLs, or None (not wanted, or it would not start)."""
    if not wanted:
        yield None
        return
    try:
        context = private_rabbitmq(folder)
        urls = context.__enter__()
    except Exception as exc:
        sitting.data["rabbitmq"] = {"status": f"failed to start: {exc}"[:2000]}
        yield None
        return
    sitting.data["rabbitmq"] = {
        "node": urls["node"],
        "boot_s": urls["boot_s"],
        "devices": "MQTT 3.1.1 on the node's MQTT plugin",
        "service_and_worker": "AMQP 0-9-1 on the same node",
        "config": "deploy/rabbitmq/rabbitmq.conf (ports of its own)",
    }
    try:
        yield urls
    finally:
        context.__exit__(None, None, None)


# ----------------------------------------------------------------------------- report
def _row(data: dict[str, Any], side: str, devices: int, params: int) -> dict[str, Any] | None:
    for row in data["rows"]:
        if (row["side"], row["devices"], row["params_requested"]) == (side, devices, params):
            return dict(row)
    return None


def _median(row: dict[str, Any] | None) -> float | None:
    if row is None:
        return None
    value = row.get("round_s_median", row.get("round_median_s"))
    return None if value is None else float(value)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(flower: float | None, fedmq: float | None) -> str:
    return "-" if flower is None or not fedmq else f"{flower / fedmq:.1f}x"


def _load(row: dict[str, Any] | None) -> str:
    """Return "load before -> after / busy": 1-minute load averages around the measurement."""
    if row is None:
        return "-"
    before = row["machine_before"]["loadavg"][0]
    after = row.get("loadavg_after", [None])[0]
    busy = row["machine_before"].get("busy_frac_3s", row.get("background_busy_frac_at_start"))
    text = f"{before:.1f}" + ("" if after is None else f" -> {after:.1f}")
    return text + ("" if busy is None else f" / {float(busy):.0%}")


def _status(row: dict[str, Any] | None, cohort: int) -> str:
    if row is None:
        return "not run"
    if "status" in row and not str(row["status"]).startswith("ok"):
        return str(row["status"])[:120]
    if row.get("all_accepted") is False:
        return "not every device accepted"
    if "all_accepted" in row:
        return f"{cohort:,}/{cohort:,} accepted every round"
    return str(row.get("status", "ok"))


def render(data: dict[str, Any]) -> str:
    """Return the sitting as markdown."""
    lines = [
        "# Fleet-scale round overhead beside Flower's simulation",
        "",
        f"    {data['command']}",
        "",
        f"One sitting, {data['started']} to {data.get('ended', '(running)')}, on this "
        f"{data['cpus']}-core machine. A figure is the median round of rounds 2..R (R = 5) "
        "in seconds; trivial local work (a FedMQ device hands the global weights back; "
        "Flower's client does one numpy SGD step on a batch of 32, its app's own). "
        "Ratio = Flower / FedMQ (above 1: FedMQ is faster). Load = the machine's 1-minute "
        "load average before -> after the measurement / its busy fraction over 3 s just "
        "before the measurement started (the background: other sessions' jobs share this "
        "machine). FedMQ waits up to the `--quiet-wait` for a busy fraction under "
        f"{QUIET_BUSY:.0%}, Flower's bench up to 300 s (its 'before' load is read before that "
        "wait, its busy fraction when the wait ended).",
        "",
    ]
    waits = [
        f"{r['side']} N={r['devices']:,} P={r['params_requested']:,}: {r['quiet_wait_s']:.0f} s"
        for r in data["rows"]
        if r["side"] == FLOWER_SIM and r.get("quiet_wait_s") is not None
    ]
    if waits:
        lines += ["Flower's waits for a quiet machine (300 s = gave up): " + "; ".join(waits), ""]
    rabbit = data.get("rabbitmq")
    if rabbit:
        if "node" in rabbit:
            lines += [
                f"RabbitMQ: a private node started by the bench ({rabbit['config']}; booted in "
                f"{rabbit['boot_s']} s), devices on its MQTT plugin (MQTT 3.1.1), `fedmq server` "
                "and `fedmq worker` on its AMQP listener. Mosquitto: the shared one at "
                "127.0.0.1:1883, MQTT 5, a namespace of the run's own; service and worker on it "
                "too.",
                "",
            ]
        else:
            lines += [f"RabbitMQ: {rabbit['status']}", ""]
    lines += _overhead_table(data)
    lines += _large_table(data)
    lines += _goals(data)
    lines += _breakdown(data)
    if data.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(data["skipped"])]
    if data.get("notes"):  # written into the JSON by hand: what happened beside the sitting
        lines += ["", "## Notes", "", *(f"- {note}" for note in data["notes"])]
    return "\n".join(lines) + "\n"


def _overhead_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "## Round overhead, P = 100k parameters",
        "",
        "| N | FedMQ side | FedMQ round (s) | load | Flower sim round (s) | load "
        "| ratio | FedMQ rounds |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    sizes = sorted({r["devices"] for r in data["rows"] if r["params_requested"] == P_SMALL})
    for devices in sizes:
        flower = _row(data, FLOWER_SIM, devices, P_SMALL)
        for side, name in (
            (MOSQUITTO, "distributed, Mosquitto"),
            (RABBITMQ, "distributed, RabbitMQ (MQTT devices, AMQP service)"),
            (SIMULATE, "simulate (memory bus, in-process)"),
        ):
            row = _row(data, side, devices, P_SMALL)
            if row is None:
                continue
            lines.append(
                f"| {devices:,} | {name} | {_fmt(_median(row))} | {_load(row)} "
                f"| {_fmt(_median(flower))} | {_load(flower)} "
                f"| {_ratio(_median(flower), _median(row))} | {_status(row, devices)} |"
            )
    return [*lines, ""]


def _large_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "## N = 100, P = 4M (16 MB updates)",
        "",
        "| FedMQ side | FedMQ round (s) | load | Flower sim round (s) | load | ratio "
        "| FedMQ rounds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    flower = _row(data, FLOWER_SIM, 100, P_LARGE)
    for side, name in (
        (MOSQUITTO, "distributed, Mosquitto (timers on)"),
        (RABBITMQ, "distributed, RabbitMQ (MQTT devices, AMQP service)"),
        (SIMULATE, "simulate (timers on)"),
    ):
        row = _row(data, side, 100, P_LARGE)
        if row is None:
            continue
        lines.append(
            f"| {name} | {_fmt(_median(row))} | {_load(row)} | {_fmt(_median(flower))} "
            f"| {_load(flower)} | {_ratio(_median(flower), _median(row))} "
            f"| {_status(row, 100)} |"
        )
    return [*lines, ""]


def _goal(met: bool | None) -> str:
    return "not measured" if met is None else ("**met**" if met else "**not met**")


def _goals(data: dict[str, Any]) -> list[str]:
    def faster(side: str, devices: int, params: int, factor: float = 1.0) -> bool | None:
        ours = _median(_row(data, side, devices, params))
        theirs = _median(_row(data, FLOWER_SIM, devices, params))
        return None if ours is None or theirs is None else ours * factor < theirs

    def both(*values: bool | None) -> bool | None:
        return None if any(v is None for v in values) else all(values)

    distributed_4m = faster(MOSQUITTO, 100, P_LARGE)
    simulate_4m = faster(SIMULATE, 100, P_LARGE)
    mosquitto_1000 = _median(_row(data, MOSQUITTO, 1000, P_SMALL))
    rabbit_1000 = _median(_row(data, RABBITMQ, 1000, P_SMALL))
    quiet = _row(data, MOSQUITTO, 1000, P_SMALL)
    quiet_note, under_3 = "", None if mosquitto_1000 is None else mosquitto_1000 < 3.0
    verdict = _goal(under_3)
    if quiet is not None:
        quiet_note = f" (load {_load(quiet)})"
        cpu = quiet.get("cpu_s_rounds_2_on")
        if cpu:
            per = sum(cpu.values()) / max(1, len(quiet.get("rounds", [])) - 1)
            quiet_note += f"; fleet + server + worker used {per:.1f} CPU s per round"
        busy = quiet["machine_before"].get("busy_frac_3s", 0.0)
        if not under_3 and busy > QUIET_BUSY:
            verdict += f" in this sitting, which was no quiet day ({busy:.0%} busy before)"
    return [
        "## The issue's goals (issue 14), on this machine, this sitting",
        "",
        "| goal | figures | verdict |",
        "| --- | --- | --- |",
        f"| N = 1,000 distributed round faster than Flower's simulation of it "
        f"| Mosquitto {_fmt(mosquitto_1000)} s, RabbitMQ {_fmt(rabbit_1000)} s vs Flower "
        f"{_fmt(_median(_row(data, FLOWER_SIM, 1000, P_SMALL)))} s "
        f"| Mosquitto {_goal(faster(MOSQUITTO, 1000, P_SMALL))}, "
        f"RabbitMQ {_goal(faster(RABBITMQ, 1000, P_SMALL))} |",
        f"| ... and under 3 s on a quiet day | Mosquitto {_fmt(mosquitto_1000)} s{quiet_note} "
        f"| {verdict} |",
        f"| `simulate` at least 3x faster than Flower's simulation, N = 100 "
        f"| {_fmt(_median(_row(data, SIMULATE, 100, P_SMALL)))} s vs "
        f"{_fmt(_median(_row(data, FLOWER_SIM, 100, P_SMALL)))} s "
        f"| {_goal(faster(SIMULATE, 100, P_SMALL, 3.0))} |",
        f"| `simulate` at least 3x faster than Flower's simulation, N = 1,000 "
        f"| {_fmt(_median(_row(data, SIMULATE, 1000, P_SMALL)))} s vs "
        f"{_fmt(_median(_row(data, FLOWER_SIM, 1000, P_SMALL)))} s "
        f"| {_goal(faster(SIMULATE, 1000, P_SMALL, 3.0))} |",
        f"| N = 100, P = 4M: distributed round and `simulate` both ahead of Flower's "
        f"simulation | distributed {_fmt(_median(_row(data, MOSQUITTO, 100, P_LARGE)))} s "
        f"(Mosquitto), simulate {_fmt(_median(_row(data, SIMULATE, 100, P_LARGE)))} s vs "
        f"Flower {_fmt(_median(_row(data, FLOWER_SIM, 100, P_LARGE)))} s "
        f"| {_goal(both(distributed_4m, simulate_4m))}: distributed "
        f"{_goal(distributed_4m)}, simulate {_goal(simulate_4m)} |",
        "",
    ]


def _breakdown(data: dict[str, Any]) -> list[str]:
    lines = ["## Where the time goes at N = 100, P = 4M", ""]
    fl = data.get("floor")
    if fl:
        gb = fl["volume_bytes"] / 1e9
        lines += [
            f"The floor, measured in this sitting: moving {gb:.1f} GB once over loopback TCP "
            f"took {fl['loopback_wall_s']:.2f} s ({fl['loopback_MBps']:.0f} MB/s, "
            f"{fl['loopback_cpu_s']:.2f} CPU s); sha256 runs at "
            f"{fl['sha256_1_thread_MBps']:.0f} MB/s on one thread, "
            f"{fl['sha256_2_threads_MBps']:.0f} MB/s on two, so hashing {gb:.1f} GB once "
            f"takes {fl['hash_once_1_core_s']:.2f} s on one core; memcpy "
            f"{fl['memcpy_MBps']:.0f} MB/s ({fl['memcpy_once_s']:.2f} s per {gb:.1f} GB). "
            f"One move plus one hash: {fl['floor_serial_s']:.2f} s one after the other, "
            f"{fl['floor_two_cores_s']:.2f} s spread perfectly over the two cores "
            f"(load {fl['machine_before']['loadavg'][0]:.2f} when measured).",
            "",
        ]
    for side, title in ((MOSQUITTO, "distributed (Mosquitto)"), (SIMULATE, "simulate")):
        row = _row(data, side, 100, P_LARGE)
        if row is None or "breakdown" not in row:
            continue
        rounds = max(1, len(row.get("rounds", row.get("round_s_all", []))) - 1)
        lines += [
            f"### {title}: {_fmt(_median(row))} s per round; per round, rounds 2..R",
            "",
            "Seconds summed over the threads that ran the function (concurrent calls add "
            "up past the round), divided by the rounds; nested sites count in both.",
            "",
            "| process | site | s per round | calls per round | ms per call |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for process, sites in row["breakdown"].items():
            for site, value in sorted(sites.items(), key=lambda kv: -kv[1]["seconds"]):
                per_call = 1000 * value["seconds"] / max(1, value["calls"])
                lines.append(
                    f"| {process} | {site} | {value['seconds'] / rounds:.2f} "
                    f"| {value['calls'] / rounds:.0f} | {per_call:.1f} |"
                )
        hashes = sum(
            sites.get("sha256 (>= 1 MiB)", {}).get("calls", 0)
            for sites in row["breakdown"].values()
        )
        updates = max(1, rounds * int(row.get("cohort", row["devices"])))
        lines += [
            "",
            f"Every 16 MB update is hashed {hashes / updates:.1f} times (sha256 calls of >= 1 MiB "
            "per update, all processes).",
        ]
        cpu = row.get("cpu_s_rounds_2_on")
        if cpu:
            per = ", ".join(f"{k} {v / rounds:.2f}" for k, v in cpu.items())
            lines += ["", f"CPU seconds per round (rounds 2..R): {per}."]
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
