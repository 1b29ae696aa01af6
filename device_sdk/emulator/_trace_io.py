"""Device trace files: the JSON format (read with validation, written byte-stable) and FedScale's.

Every error names the file, the device (entry number and id) and the field,
so a trace of thousands of devices can be fixed by reading the message.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from device_sdk.emulator._trace_model import Availability, DeviceTrace, Trace, TraceError, Window

FORMAT = "fedmq-device-trace"
"""The ``format`` field every trace file carries; ``load_profile`` sniffs it."""
VERSION = 1

_TOP_FIELDS = frozenset({"format", "version", "period_s", "source", "devices"})
_DEVICE_FIELDS = frozenset(
    {
        "id",
        "compute_ms_per_example",
        "down_mbps",
        "up_mbps",
        "online",
        "charging",
        "period_s",
        "model",
    }
)
FEDSCALE_TRAINING_FACTOR = 3.0
"""FedScale's ``computation`` is inference ms per sample; it takes training as 3x that."""


def is_trace_document(raw: object) -> bool:
    """Return whether parsed JSON claims to be a trace of this format (it may still be invalid)."""
    return isinstance(raw, dict) and "format" in raw and "devices" in raw


def read_json(path: str | Path, what: str = "device trace") -> Any:
    """Return a JSON file's content, or raise ``TraceError`` naming the file."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except OSError as exc:
        raise TraceError(f"cannot read {what} {p}: {exc.strerror}") from exc
    except ValueError as exc:
        raise TraceError(f"{what} {p} is not valid JSON: {exc}") from exc


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace file (see docs/traces.md)."""
    return parse_trace(read_json(path), origin=str(path))


def parse_trace(raw: object, *, origin: str = "<trace>") -> Trace:
    """Return the trace a parsed JSON document describes, or raise ``TraceError``."""
    if not isinstance(raw, dict):
        raise TraceError(f"{origin}: expected a JSON object with a 'devices' list")
    _no_unknown(raw, _TOP_FIELDS, origin)
    if raw.get("format") != FORMAT:
        raise TraceError(f"{origin}: 'format' must be {FORMAT!r}, not {raw.get('format')!r}")
    if raw.get("version") != VERSION:
        raise TraceError(f"{origin}: 'version' {raw.get('version')!r} is not supported ({VERSION})")
    period = _positive(raw.get("period_s", 86400.0), f"{origin}: 'period_s'")
    source = raw.get("source", "")
    if not isinstance(source, str):
        raise TraceError(f"{origin}: 'source' must be a string")
    entries = raw.get("devices")
    if not isinstance(entries, list) or not entries:
        raise TraceError(f"{origin}: 'devices' must be a non-empty list")
    devices = tuple(_device(entry, i, period, origin) for i, entry in enumerate(entries))
    return Trace(devices, period, source)


def _device(entry: object, index: int, period: float, origin: str) -> DeviceTrace:
    """Return entry ``index`` of a trace, validated."""
    where = f"{origin}: device {index}"
    if not isinstance(entry, dict):
        raise TraceError(f"{where}: expected an object")
    name = entry.get("id", f"device-{index}")
    if not isinstance(name, str) or not name:
        raise TraceError(f"{where}: 'id' must be a non-empty string")
    where = f"{where} ({name!r})"
    _no_unknown(entry, _DEVICE_FIELDS, where)
    own_period = _positive(entry.get("period_s", period), f"{where}: 'period_s'")
    model = entry.get("model")
    if model is not None and not isinstance(model, str):
        raise TraceError(f"{where}: 'model' must be a string")
    online = entry.get("online")
    windows = (
        ((0.0, own_period),)
        if online is None
        else _windows(online, own_period, f"{where}: 'online'")
    )
    return DeviceTrace(
        id=name,
        compute_ms_per_example=_positive(
            entry.get("compute_ms_per_example"), f"{where}: 'compute_ms_per_example'"
        ),
        down_mbps=_positive(entry.get("down_mbps"), f"{where}: 'down_mbps'"),
        up_mbps=_positive(entry.get("up_mbps"), f"{where}: 'up_mbps'"),
        availability=Availability(
            windows,
            own_period,
            _windows(entry.get("charging", []), own_period, f"{where}: 'charging'"),
        ),
        model=model,
    )


def _no_unknown(raw: Mapping[str, object], known: frozenset[str], where: str) -> None:
    """Refuse fields the format does not have (a typo would otherwise be ignored)."""
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TraceError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")


def _number(value: object, where: str) -> float:
    """Return ``value`` as a finite float, or raise ``TraceError``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _positive(value: object, where: str) -> float:
    """Return ``value`` as a finite float above 0, or raise ``TraceError``."""
    number = _number(value, where)
    if number <= 0:
        raise TraceError(f"{where}: expected a number > 0, got {value!r}")
    return number


def _windows(value: object, period: float, where: str) -> tuple[Window, ...]:
    """Return validated ``[[start, end], ...]`` windows, touching ones merged."""
    if not isinstance(value, list):
        raise TraceError(f"{where}: expected a list of [start_s, end_s] pairs")
    merged: list[Window] = []
    for i, pair in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(pair, list) or len(pair) != 2:
            raise TraceError(f"{at}: expected a [start_s, end_s] pair, got {pair!r}")
        start, end = _number(pair[0], at), _number(pair[1], at)
        if not 0 <= start < end <= period:
            raise TraceError(f"{at}: {pair!r}: need 0 <= start < end <= period_s ({period:g})")
        if merged and start < merged[-1][1]:
            raise TraceError(f"{at}: {pair!r} starts before the previous window ends (sort them)")
        if merged and start == merged[-1][1]:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return tuple(merged)


def dump_trace(trace: Trace) -> str:
    """Return a trace as JSON text: one device a line, the same bytes for the same trace."""
    head = {"format": FORMAT, "version": VERSION, "period_s": _compact(trace.period_s)}
    if trace.source:
        head["source"] = trace.source
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in head.items()]
    rows = [f"    {json.dumps(_device_json(d, trace.period_s))}" for d in trace.devices]
    return "{\n" + "\n".join(lines) + '\n  "devices": [\n' + ",\n".join(rows) + "\n  ]\n}\n"


def save_trace(trace: Trace, path: str | Path) -> None:
    """Write a trace file (see ``dump_trace``)."""
    Path(path).write_text(dump_trace(trace))


def _device_json(device: DeviceTrace, period: float) -> dict[str, object]:
    """Return one entry of a trace file."""
    availability = device.availability
    row: dict[str, object] = {
        "id": device.id,
        "compute_ms_per_example": _compact(device.compute_ms_per_example),
        "down_mbps": _compact(device.down_mbps),
        "up_mbps": _compact(device.up_mbps),
    }
    if availability.period_s != period:
        row["period_s"] = _compact(availability.period_s)
    if not availability.always_on:
        row["online"] = [[_compact(s), _compact(e)] for s, e in availability.windows]
    if availability.charging:
        row["charging"] = [[_compact(s), _compact(e)] for s, e in availability.charging]
    if device.model is not None:
        row["model"] = device.model
    return row


def _compact(value: float) -> float | int:
    """Return whole numbers as ints, so files read ``3600`` rather than ``3600.0``."""
    return int(value) if float(value).is_integer() else value


def load_fedscale(
    capacity: str | Path, behavior: str | Path | None = None, *, devices: int | None = None
) -> Trace:
    """Import FedScale's device traces, converted from pickle to JSON (see docs/traces.md)."""
    return from_fedscale(
        read_json(capacity, "FedScale capacity file"),
        None if behavior is None else read_json(behavior, "FedScale behavior file"),
        devices=devices,
        origins=(str(capacity), str(behavior)),
    )


def from_fedscale(
    capacity: object,
    behavior: object | None = None,
    *,
    devices: int | None = None,
    origins: tuple[str, str] = ("client_device_capacity", "client_behave_trace"),
) -> Trace:
    """Return our trace of FedScale's ``client_device_capacity`` and ``client_behave_trace``.

    Parameters
    ----------
    capacity
        ``{client_id: {"computation": inference ms per sample, "communication": kbit/s}}``.
    behavior
        ``{client_id: {"active": [...], "inactive": [...], "finish_time": s, ...}}``;
        None: every device always online.
    devices
        How many entries to write (default: as many as the longer input has);
        entry ``j`` pairs capacity entry ``j mod len`` with behavior entry
        ``j mod len``, in file order, as FedScale maps clients to traces.
    origins
        The two inputs' names, for error messages.

    Returns
    -------
    Trace
        Compute is FedScale's training cost (3 x its inference latency),
        bandwidth its one figure for both directions, in Mbit/s.
    """
    speeds = _fedscale_map(capacity, origins[0])
    spells = [] if behavior is None else _fedscale_map(behavior, origins[1])
    count = devices if devices is not None else max(len(speeds), len(spells))
    if count < 1:
        raise TraceError(f"{origins[0]}: asked for {count} devices")
    rows: list[DeviceTrace] = []
    for j in range(count):
        key, speed = speeds[j % len(speeds)]
        where = f"{origins[0]}: client {key!r}"
        compute = _positive(_field(speed, "computation", where), f"{where}: 'computation'")
        kbps = _positive(_field(speed, "communication", where), f"{where}: 'communication'")
        name, availability, model = f"fedscale-{key}", None, None
        if spells:
            spell_key, spell = spells[j % len(spells)]
            where = f"{origins[1]}: client {spell_key!r}"
            availability, model = _fedscale_availability(spell, where)
            name = f"fedscale-{key}-{spell_key}"
        mbps = kbps / 1000.0
        rows.append(
            DeviceTrace(
                name,
                FEDSCALE_TRAINING_FACTOR * compute,
                mbps,
                mbps,
                availability or Availability.always(86400.0),
                model,
            )
        )
    period = rows[0].availability.period_s
    source = f"FedScale: {Path(origins[0]).name}" + (
        f" + {Path(origins[1]).name}" if spells else ""
    )
    return Trace(tuple(rows), period, source)


def _fedscale_map(raw: object, origin: str) -> list[tuple[str, Mapping[str, object]]]:
    """Return a FedScale JSON file's ``(client id, entry)`` pairs, in file order."""
    if not isinstance(raw, dict) or not raw:
        raise TraceError(f"{origin}: expected a non-empty object from client id to an entry")
    for key, value in raw.items():
        if not isinstance(value, dict):
            raise TraceError(f"{origin}: client {key!r}: expected an object")
    return list(raw.items())


def _field(entry: Mapping[str, object], name: str, where: str) -> object:
    """Return ``entry[name]`` or raise ``TraceError`` naming what is missing."""
    if name not in entry:
        raise TraceError(f"{where}: missing field {name!r}")
    return entry[name]


def _fedscale_availability(
    spell: Mapping[str, object], where: str
) -> tuple[Availability, str | None]:
    """Return a FedScale behavior entry's windows (clipped to ``finish_time``) and model."""
    period = _positive(_field(spell, "finish_time", where), f"{where}: 'finish_time'")
    active, inactive = _field(spell, "active", where), _field(spell, "inactive", where)
    if not isinstance(active, list) or not isinstance(inactive, list):
        raise TraceError(f"{where}: 'active' and 'inactive' must be lists of times")
    if len(active) != len(inactive):
        raise TraceError(
            f"{where}: 'active' has {len(active)} times, 'inactive' {len(inactive)}; "
            "they pair up into windows"
        )
    windows: list[list[float]] = []
    for i, (on, off) in enumerate(zip(active, inactive, strict=True)):
        start = _number(on, f"{where}: 'active'[{i}]")
        end = _number(off, f"{where}: 'inactive'[{i}]")
        if start < 0 or end < start:
            raise TraceError(f"{where}: window {i} [{on!r}, {off!r}]: need 0 <= active <= inactive")
        end = min(end, period)
        if start < end:
            windows.append([start, end])
    model = spell.get("model")
    return (
        Availability(_windows(windows, period, f"{where}: windows"), period),
        model if isinstance(model, str) else None,
    )
