"""A conformance kit for app developers: the service's side of the protocol, check by check.

The kit stands in for FedMQ's service towards one device: it pins the
device's key, signs tasks, grants and come-back-later notes with a service key
of its own, serves the artifacts over HTTP with signed URLs (misbehaving on
purpose where a check needs it), reads every frame the device sends, and
reports one ``CheckResult`` per ``Check``. ``fedmq conformance`` runs it
against an external device (an app on a phone); ``run_in_process`` runs it
against a Python device built by a factory (the kit's own tests).
"""

from fedmq.conformance._blobs import BlobServer, Fault
from fedmq.conformance._command import run_command
from fedmq.conformance._harness import (
    DeviceFactory,
    DeviceSetup,
    DeviceUnderTest,
    SdkDevice,
    emulated_handler,
    run_in_process,
)
from fedmq.conformance._kit import Conformance, KitOptions, TakeOver
from fedmq.conformance._model import DEFAULT_SPEC, KitModel
from fedmq.conformance._report import Check, CheckResult, Outcome, Report
from fedmq.conformance._standin import ServiceStandIn
from fedmq.conformance._takeover import connection_taker

__all__ = [
    "DEFAULT_SPEC",
    "BlobServer",
    "Check",
    "CheckResult",
    "Conformance",
    "DeviceFactory",
    "DeviceSetup",
    "DeviceUnderTest",
    "Fault",
    "KitModel",
    "KitOptions",
    "Outcome",
    "Report",
    "SdkDevice",
    "ServiceStandIn",
    "TakeOver",
    "connection_taker",
    "emulated_handler",
    "run_command",
    "run_in_process",
]
