r"""Device traces: each device's compute speed, bandwidth and availability windows.

The format, the synthetic generator and the FedScale importer are described
in docs/traces.md. A trace file holds many devices; device ``i`` of a fleet
plays entry ``i mod len``. ``fedmq simulate --profile TRACE.json`` plays a
trace in emulated time, ``fedmq fleet --profile TRACE.json`` in real time.

Command line::

    python -m device_sdk.emulator.traces generate --devices 1000 --seed 7 --hours 24 --out t.json
    python -m device_sdk.emulator.traces import-fedscale --capacity cap.json \\
        --behavior behave.json --devices 1000 --out fedscale.json
    python -m device_sdk.emulator.traces describe t.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from device_sdk.emulator._trace_io import (
    FORMAT,
    VERSION,
    dump_trace,
    from_fedscale,
    load_fedscale,
    load_trace,
    parse_trace,
    save_trace,
)
from device_sdk.emulator._trace_live import (
    OFFLINE_REASON,
    AvailabilityDriver,
    DeviceHandle,
    Scheduler,
    WallClock,
)
from device_sdk.emulator._trace_model import (
    Availability,
    DeviceTrace,
    TaskTiming,
    Trace,
    TraceError,
)
from device_sdk.emulator._trace_pacing import TaskAbandoned
from device_sdk.emulator._trace_synth import SynthSettings, synthesize

__all__ = [
    "FORMAT",
    "OFFLINE_REASON",
    "VERSION",
    "Availability",
    "AvailabilityDriver",
    "DeviceHandle",
    "DeviceTrace",
    "Scheduler",
    "SynthSettings",
    "TaskAbandoned",
    "TaskTiming",
    "Trace",
    "TraceError",
    "WallClock",
    "describe",
    "dump_trace",
    "from_fedscale",
    "load_fedscale",
    "load_trace",
    "main",
    "parse_trace",
    "save_trace",
    "synthesize",
]

_HOURS = (3, 9, 15, 21)
"""Hours of the day ``describe`` counts devices online at."""


def describe(trace: Trace) -> str:
    """Return a few lines on a trace: percentiles of speeds and bandwidths, who is online when."""
    compute = np.array([d.compute_ms_per_example for d in trace.devices])
    down = np.array([d.down_mbps for d in trace.devices])
    up = np.array([d.up_mbps for d in trace.devices])

    def row(name: str, values: np.ndarray) -> str:
        p10, p50, p90 = np.percentile(values, [10, 50, 90])
        return f"  {name:<22} p10 {p10:9.2f}  p50 {p50:9.2f}  p90 {p90:9.2f}"

    always = sum(d.availability.always_on for d in trace.devices)
    share = np.mean([d.availability.online_fraction() for d in trace.devices])
    online = ", ".join(
        f"{h:02d}:00 {trace.online_count(h * 3600.0) / len(trace):.0%}"
        for h in _HOURS
        if h * 3600.0 < trace.period_s
    )
    return "\n".join(
        [
            f"{len(trace)} devices, period {trace.period_s / 3600:g} h"
            + (f" ({trace.source})" if trace.source else ""),
            row("compute ms/example", compute),
            row("download Mbit/s", down),
            row("upload Mbit/s", up),
            f"  always on {always / len(trace):.0%}; online {share:.0%} of the time on average",
            f"  online at {online}" if online else "",
        ]
    ).rstrip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m device_sdk.emulator.traces",
        description="Make, import and inspect device traces (docs/traces.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m device_sdk.emulator.traces generate --devices 1000 "
        "--seed 7 --hours 24 --out trace.json\n  fedmq simulate CONFIG --profile trace.json",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate",
        help="a synthetic trace: log-normal speeds, diurnal availability",
        epilog="example: generate --devices 1000 --seed 7 --hours 24 --out trace.json",
    )
    generate.add_argument("--devices", type=int, required=True, help="how many entries")
    generate.add_argument("--seed", type=int, default=0, help="fixes every draw (default 0)")
    generate.add_argument("--hours", type=float, default=24.0, help="the period (default 24)")
    generate.add_argument(
        "--always-on", type=float, default=SynthSettings.always_on, help="share always online"
    )
    generate.add_argument("--out", required=True, help="where to write the trace (JSON)")
    fedscale = commands.add_parser(
        "import-fedscale",
        help="FedScale's device traces, converted to JSON (docs/traces.md says how)",
        epilog="example: import-fedscale --capacity client_device_capacity.json "
        "--behavior client_behave_trace.json --devices 1000 --out fedscale.json",
    )
    fedscale.add_argument("--capacity", required=True, help="client_device_capacity as JSON")
    fedscale.add_argument("--behavior", help="client_behave_trace as JSON (default: always on)")
    fedscale.add_argument("--devices", type=int, help="entries to write (default: all)")
    fedscale.add_argument("--out", required=True, help="where to write the trace (JSON)")
    show = commands.add_parser("describe", help="percentiles and availability of a trace")
    show.add_argument("trace", help="a trace file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            settings = SynthSettings(always_on=args.always_on)
            trace = synthesize(args.devices, seed=args.seed, hours=args.hours, settings=settings)
        elif args.command == "import-fedscale":
            trace = load_fedscale(args.capacity, args.behavior, devices=args.devices)
        else:
            print(describe(load_trace(args.trace)))
            return 0
    except TraceError as exc:
        print(f"traces: {exc}", file=sys.stderr)
        return 1
    save_trace(trace, args.out)
    print(describe(trace))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
