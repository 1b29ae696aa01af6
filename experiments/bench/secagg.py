"""Secure aggregation (SecAgg+) against the plain round: upload, device CPU, unmasking, round time.

``python -m experiments.bench.secagg`` runs the full grid (N = 10, 100, 1,000 by
P = 100k, 1M; several minutes on two cores), ``--quick`` N = 10, 100 at P = 100k
(under a minute). Progress goes to stderr; stdout gets the figures as one JSON
object, then a markdown table (``--out FILE`` also writes the JSON).

1. Protocol: the device code itself (``device_sdk.secagg.SecureParticipant``)
   for every device and the coordinator's ``SecureRound``, wired by hand with
   no broker, so a device's CPU (``time.process_time`` around its calls) and
   the frames it signs are its own. Upload: keys, shares, the masked inline
   ``model_update`` and the reveal, against the plain ``model_update`` of
   float32 weights. Unmasking: ``SecureRound.unmasking`` (Shamir, key
   rebuilds) plus ``Unmasking.remove_from``, with no dropout and with 10% of
   the devices vanishing after their shares (their pairwise masks rebuilt).
   Above ``MASK_BUDGET`` masked values (N = 1,000, P = 1M) only ``SAMPLE``
   devices mask (the devices are symmetric) and the masks come off a stand-in
   vector; keys, shares and reveals run for all. Elsewhere the unmasked sum is
   checked against the plain one within the fixed-point bound.
2. End to end: ``run_experiment`` on the memory bus (what ``simulate`` runs),
   real training on digits with ``fleet_round.experiment_config``'s MLP, all N
   devices a round, plain then secure: the median of rounds 2..R, and how far
   the two runs' models differ. Only up to ``E2E_BUDGET`` (N x P): at N = 1,000
   and P = 1M the devices' masking alone is over a minute a round in one process.

Bonawitz et al. (2017) report 1.73x expansion over sending the data in the
clear for 2^10 users and 2^20-entry vectors, every pair masking. FedMQ masks
32-bit integers, so a masked update is as large as float32 weights: all its
expansion is protocol messages, which grow with the neighbours k, not with P.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from aggregator_service import ExperimentConfig
from aggregator_service.config import SecureAggregationConfig
from aggregator_service.secagg.state import SecureRound
from broker import ModelRef, ModelUpdate, TrainTask, decode, encode, encode_weights, new_message_id
from broker.identity import SERVICE_NAME, Identity
from broker.messages import SecAggSettings, TaskGrant
from broker.secagg import dequantize, flatten, scale_for
from broker.topics import Topics
from broker.verify import issue_grant
from broker.weights import decode_weights
from device_sdk.emulator.fleet import device_name
from device_sdk.secagg import SecureParticipant, Vanish
from experiments.bench.fleet_round import experiment_config, model_parameters
from fedmq.compose import run_experiment
from fedmq.settings import load_settings

T = TypeVar("T")
FULL = tuple((n, p) for n in (10, 100, 1000) for p in (100_000, 1_000_000))
QUICK = ((10, 100_000), (100, 100_000))
MASK_BUDGET = 5e9
"""Values masked by all devices together (N x (k + 1) x P) above which only a sample masks."""
SAMPLE = 5
E2E_BUDGET = 100_000_000
"""The largest N x P run end to end (N = 1,000 at P = 100k)."""
DROPOUT = 0.1
BONAWITZ = 1.73
EXPERIMENT = "bench-secagg-0a1b2c3d"  # shaped like the service's "<slug>-<8 hex>"
SECURE = SecureAggregationConfig()  # what an empty "secure_aggregation": {} section gives
DECLARED = 100
"""The examples each device of the protocol part declares (and weights its update by, at most)."""
STAGES = ("keys", "shares", "mask", "reveal")
SERVICE = Identity.generate(SERVICE_NAME)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def timed(call: Callable[..., T], *args: Any) -> tuple[T, float]:
    """Return ``call(*args)`` and the CPU seconds it took (this process, one thread busy)."""
    began = time.process_time()
    out = call(*args)
    return out, time.process_time() - began


def make_task(identity: Identity, settings: SecAggSettings, params: int) -> TrainTask:
    """Return a secure round's task for ``identity``, with the service's grant (its size counts)."""
    task_id = new_message_id()
    grant = TaskGrant(
        experiment_id=EXPERIMENT,
        round=1,
        device_id=identity.name,
        task_id=task_id,
        public_key=identity.public_key_text,
        max_examples=settings.max_examples,
    )
    return TrainTask(
        message_id=task_id,
        experiment_id=EXPERIMENT,
        round=1,
        base_version=0,
        model=ModelRef("https://store.invalid/weights.safetensors", "0" * 64, 4 * params),
        grant=issue_grant(grant, SERVICE),
        secure_aggregation=settings,
    )


@dataclass
class Device:
    """One device's participant and task, and what each of its stages cost and sent."""

    identity: Identity
    task: TrainTask
    vanish: Vanish | None
    outbox: list[bytes] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    masked: np.ndarray | None = None
    participant: SecureParticipant = field(init=False)

    def __post_init__(self) -> None:
        self.participant = SecureParticipant(  # publishing keeps the frames here
            self.identity,
            lambda _topic, frame: self.outbox.append(frame),
            Topics(),
            self._send_update,
            vanish=self.vanish,
        )

    def send_plain(self, weights: Mapping[str, np.ndarray], examples: int, metrics: Any) -> None:
        """Sign an inline model_update as ``DeviceClient`` does: all a plain round asks."""
        task = self.task
        update = ModelUpdate(
            experiment_id=task.experiment_id,
            round=task.round,
            device_id=self.identity.name,
            base_version=task.base_version,
            task_id=task.message_id,
            num_examples=examples,
            inline_weights=encode_weights(weights),
            metrics=metrics,
            grant=task.grant,
        )
        self.outbox.append(encode(update, self.identity))

    def _send_update(self, task: TrainTask, weights: Any, examples: int, metrics: Any) -> None:
        self.send_plain(weights, examples, metrics)  # the same frame, of uint32 tensors
        self.masked = weights["params"]  # the workers' side folds it, untimed

    def run(self, stage: str, call: Callable[..., object], *args: Any) -> list[bytes]:
        """Call into the device for ``stage``; add up its CPU and bytes; return its frames."""
        _, seconds = timed(call, *args)
        frames, self.outbox = self.outbox, []
        self.cpu[stage] = self.cpu.get(stage, 0.0) + seconds
        self.sent[stage] = self.sent.get(stage, 0) + sum(len(f) for f in frames)
        return frames


def protocol(n: int, params: int, dropout: float, seed: int) -> dict[str, Any]:
    """Run one secure round's stages for ``n`` devices and a ``params``-value update."""
    began = time.monotonic()
    rng = np.random.default_rng(seed)
    # As the service derives it: from the examples the cohort declared (each at most DECLARED).
    scale = scale_for(SECURE.clip, DECLARED * n)
    settings = SecAggSettings(clip=SECURE.clip, scale=scale, max_examples=DECLARED)
    gone = set(rng.choice(n, size=round(dropout * n), replace=False).tolist())
    devices: dict[str, Device] = {}
    for i in range(n):
        identity = Identity.generate(device_name(i))
        task = make_task(identity, settings, params)
        devices[identity.name] = Device(identity, task, Vanish.UPLOAD if i in gone else None)
    stayed = [name for name, d in devices.items() if d.vanish is None]
    rnd = SecureRound(EXPERIMENT, 1, frozenset(devices), 7, SECURE, min_reports=1, scale=scale)
    state_s: list[float] = []  # the coordinator's state machine, stage by stage

    def coordinate(call: Callable[..., T], *args: Any) -> T:
        out, seconds = timed(call, *args)
        state_s.append(seconds)
        return out

    for d in devices.values():
        for frame in d.run("keys", d.participant.task, d.task):
            coordinate(rnd.add_keys, decode(frame))
    asks = coordinate(rnd.fix_u1)
    degree = len(rnd.graph[stayed[0]])
    full = n * (degree + 1) * params <= MASK_BUDGET
    maskers = stayed if full else stayed[:SAMPLE]
    for name, ask in asks.items():
        for frame in devices[name].run("shares", devices[name].participant.neighbours, ask):
            coordinate(rnd.add_shares, decode(frame))
    deliveries = coordinate(rnd.fix_u2)
    base = {"params": np.zeros(params, dtype=np.float32)}
    total = np.zeros(params, dtype=np.uint32)  # the workers' sum, modulo 2^32
    expected = np.zeros(params)
    for name in maskers:
        d = devices[name]
        d.run("mask", d.participant.delivery, deliveries[name])
        examples = int(rng.integers(1, DECLARED + 1))
        trained = {"params": rng.normal(0.0, 0.01, params).astype(np.float32)}
        d.run("mask", d.participant.trained, d.task, base, trained, examples, {})
        d.run("plain", d.send_plain, trained, examples, {})
        assert d.masked is not None
        np.add(total, d.masked, out=total)
        expected += examples * trained["params"].astype(np.float64)
        d.masked = None
    for name in set(deliveries) - set(maskers):  # note their neighbours, mask nothing
        devices[name].run("mask", devices[name].participant.delivery, deliveries[name])
    requests = coordinate(rnd.fix_u3, tuple(stayed))
    for name, request in requests.items():
        for frame in devices[name].run("reveal", devices[name].participant.unmask, request):
            coordinate(rnd.add_reveal, decode(frame))
    unmasking, shamir_s = timed(rnd.unmasking)
    assert unmasking is not None, "every share was revealed, yet the seeds do not rebuild"
    if not full:  # the masks' cost does not depend on what they come off
        total = rng.integers(0, 2**32, params, dtype=np.uint32)
    _, masks_s = timed(unmasking.remove_from, total)
    error = float(np.max(np.abs(dequantize(total, scale) - expected))) if full else None
    sample = [devices[name] for name in maskers]
    one = maskers[0]  # what the service sends a device: the stages' three messages
    download = [asks[one], deliveries[one], requests[one]]

    def median_ms(values: list[float]) -> float:
        return round(1000 * statistics.median(values), 2)

    upload_plain = statistics.mean(d.sent["plain"] for d in sample)
    upload_secure = statistics.mean(sum(d.sent[s] for s in STAGES) for d in sample)
    return {
        "neighbours": degree,
        "threshold": rnd.threshold,
        "masked_by": len(maskers),
        "sampled": not full,
        "upload_plain_bytes": round(upload_plain),
        "upload_secure_bytes": round(upload_secure),
        "expansion": upload_secure / upload_plain,
        "upload_by_stage": {s: round(statistics.mean(d.sent[s] for d in sample)) for s in STAGES},
        "download_protocol_bytes": sum(len(encode(m, SERVICE)) for m in download),
        "device_cpu_plain_ms": median_ms([d.cpu["plain"] for d in sample]),
        "device_cpu_secure_ms": median_ms([sum(d.cpu[s] for s in STAGES) for d in sample]),
        "device_cpu_by_stage_ms": {s: median_ms([d.cpu[s] for d in sample]) for s in STAGES},
        "state_machine_ms": round(1000 * sum(state_s), 1),
        "unmask_shamir_ms": round(1000 * shamir_s, 1),
        "unmask_masks_ms": round(1000 * masks_s, 1),
        "unmask_ms": round(1000 * (shamir_s + masks_s), 1),
        "seeds": len(unmasking.seeds),
        "pair_seeds": len(unmasking.pairs),
        "sum_error": error,
        "sum_bound": len(maskers) * 0.5 / scale if full else None,
        "wall_s": round(time.monotonic() - began, 1),
    }


def end_to_end(n: int, params: int, secure: bool, rounds: int) -> dict[str, Any]:
    """Run ``rounds`` rounds of all ``n`` devices in this process; return the round times."""
    raw = experiment_config(n, n, params, rounds)
    raw["name"] = f"bench-secagg-{n}"
    if secure:
        raw["secure_aggregation"] = {}
    began = time.monotonic()
    result = run_experiment(
        ExperimentConfig.from_dict(raw), evaluate=False, timeout_s=1800, settings=load_settings({})
    )
    durations = [r.duration_s or 0.0 for r in result.rounds]
    first, final = (
        flatten(decode_weights(w)) for w in (result.initial_weights, result.final_weights)
    )
    return {
        "params": model_parameters(raw),
        "round_s": [round(d, 3) for d in durations],
        "round_s_median": statistics.median(durations[1:] or durations),
        "all_committed": all(
            r.state == "committed" and len(r.accepted) == n for r in result.rounds
        ),
        "wall_s": round(time.monotonic() - began, 1),
        "change": final.astype(np.float64) - first,  # compared with the other run's, then dropped
    }


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _e(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def render(rows: list[dict[str, Any]]) -> str:
    """Return the markdown table and its notes."""
    lines = [
        "| N | P | k | upload plain B | upload secure B | expansion | device CPU plain ms "
        "| device CPU secure ms | unmask ms 0% | unmask ms 10% | round plain s | round secure s "
        "| model rel. error |",
        "|" + "---:|" * 13,
    ]
    for row in rows:
        s, d = row["secure"], row["dropout"]
        plain, secure = row.get("plain_e2e"), row.get("secure_e2e")
        lines.append(
            f"| {row['devices']:,}{'*' if s['sampled'] else ''} | {row['params']:,} "
            f"| {s['neighbours']} | {_n(s['upload_plain_bytes'])} | {_n(s['upload_secure_bytes'])} "
            f"| {s['expansion']:.4f}x | {_n(s['device_cpu_plain_ms'], 1)} "
            f"| {_n(s['device_cpu_secure_ms'], 1)} | {_n(s['unmask_ms'], 1)} "
            f"| {_n(d['unmask_ms'], 1)} | {_n(plain and plain['round_s_median'], 3)} "
            f"| {_n(secure and secure['round_s_median'], 3)} | {_e(row.get('rel_error'))} |"
        )
    summed = [r[k] for r in rows for k in ("secure", "dropout") if r[k]["sum_error"] is not None]
    ok = all(r["sum_error"] <= r["sum_bound"] for r in summed)
    ns = sorted({r["devices"] for r in rows})
    lines += [
        "",
        f"Bonawitz et al. (2017): {BONAWITZ}x for 2^10 users and 2^20-entry vectors, every pair "
        "masking. Here a masked update is uint32, as large as the float32 one: the expansion is "
        "the keys, shares and reveal frames, which grow with k (SecAgg+), not with P.",
        "Upload: every signed frame a device sends (inline model_update). Device CPU: median "
        "over devices, all four stages (keys, shares, mask + encode, reveal) against encoding "
        "and signing the plain update. Unmask: Shamir and key rebuilds plus taking the masks "
        f"off the sum; 10%: {DROPOUT:.0%} of devices vanish after their shares.",
        f"Unmasked sums within the fixed-point bound: {ok} ({len(summed)} checked). Round times "
        "(- not run): memory bus, real training, median of rounds 2..R. Model rel. error: "
        "|secure - plain| / |plain| of the R rounds' change to the weights (L2). Fixed-point "
        f"scale (protocol part, {DECLARED} examples declared per device): "
        + ", ".join(f"{scale_for(SECURE.clip, DECLARED * n):g} at N = {n:,}" for n in ns)
        + ".",
    ]
    if any(r["secure"]["sampled"] for r in rows):
        lines.append(
            f"* only {SAMPLE} devices masked an update (the devices are symmetric), and the masks "
            "came off a stand-in vector; keys, shares and reveals ran for all N."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 10, 100 and P = 100k only")
    parser.add_argument("--rounds", type=int, default=4, help="end-to-end rounds (median of 2..R)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    for i, (n, params) in enumerate(QUICK if args.quick else FULL):
        row: dict[str, Any] = {"devices": n, "params": params}
        for key, dropout in (("secure", 0.0), ("dropout", DROPOUT)):
            row[key] = protocol(n, params, dropout, seed=2 * i + (dropout > 0))
            log(f"protocol N={n} P={params} dropout={dropout:.0%}: {json.dumps(row[key])}")
        row["loadavg"] = os.getloadavg()
        if n * params <= E2E_BUDGET:
            for key, secure in (("plain_e2e", False), ("secure_e2e", True)):
                row[key] = end_to_end(n, params, secure, args.rounds)
                log(f"end to end N={n} P={params} {key}: {row[key]['round_s']} s")
            a, b = row["plain_e2e"].pop("change"), row["secure_e2e"].pop("change")
            row["rel_error"] = float(np.linalg.norm(b - a) / np.linalg.norm(a))
        rows.append(row)
    wall = round(time.monotonic() - began, 1)
    command = " ".join(["python -m experiments.bench.secagg", *sys.argv[1:]])
    data = {"command": command, "wall_s": wall, "rows": rows}
    if args.out is not None:
        args.out.write_text(json.dumps(data, indent=2))
    print(json.dumps(data), flush=True)
    print(render(rows))
    print(f"\n`{command}`: {wall:.0f} s.")


if __name__ == "__main__":
    main()
