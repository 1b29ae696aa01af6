"""`fedmq conformance`: the setup it prints, the report, its exit statuses."""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import connect
from broker.identity import SERVICE_NAME, Identity
from broker.topics import Topics
from fedmq.cli import build_parser, main
from fedmq.conformance import (
    DeviceSetup,
    KitModel,
    KitOptions,
    SdkDevice,
    _command,
    emulated_handler,
    run_command,
)
from fedmq.settings import load_settings
from tests.fedmq.conformance.broken_devices import EXAMPLES
from tests.fedmq.conformance.conftest import fresh_device_id, fresh_namespace


class Announced(io.StringIO):
    """Captures the command's output and says when the kit waits for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def write(self, text: str) -> int:
        if "waiting up to" in text:
            self.waiting.set()
        return super().write(text)


def test_the_command_prints_the_setup_then_the_report_and_exits_0_for_a_conforming_device(
    tmp_path: Path,
    broker_url: str,
    kit_model: Callable[[str], KitModel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the keys an app developer would have, the command's flags; the model
    # built once for every test, and a short watch after each answer
    model = kit_model("python")
    monkeypatch.setattr(KitModel, "build", lambda platform: model)
    monkeypatch.setattr(_command, "KitOptions", functools.partial(KitOptions, settle_s=0.2))
    namespace, device_id = fresh_namespace(), fresh_device_id()
    device = Identity.generate(device_id)
    device_key = tmp_path / "device.pub"
    device_key.write_text(device.public_key_text + "\n")
    service_key = tmp_path / "service.key"
    service = Identity.load_or_create(SERVICE_NAME, service_key)
    argv = ["conformance", "--broker", broker_url, "--namespace", namespace]
    argv += ["--device-id", device_id, "--device-key", str(device_key)]
    argv += ["--service-key", str(service_key), "--timeout", "8", "--come-back-after", "0.5"]
    args = build_parser().parse_args(argv)
    out = Announced()
    status: list[int] = []
    kit = threading.Thread(
        target=lambda: status.append(run_command(args, load_settings(args), out))
    )

    # Execute: the kit waits; the device starts once told what to pin
    kit.start()
    assert out.waiting.wait(60), out.getvalue()
    setup = DeviceSetup(broker_url, Topics(namespace), device, service.public_key)
    handler = emulated_handler("python", examples=EXAMPLES)
    app = SdkDevice(setup, handler, examples=EXAMPLES)
    # Outlives the kit's subscription: a device that reconnected lately retries a
    # publish nobody subscribes to (its check-out) for half a minute.
    coordinator = connect(broker_url)
    coordinator.subscribe(setup.topics.all_checkins, lambda delivery: delivery.ack())
    try:
        app.start()
        kit.join(120)
    finally:
        app.close()
        coordinator.close()

    # Assert
    text = out.getvalue()
    assert status == [0], text
    assert f"service key  {service.public_key_text}" in text
    assert f"{namespace}/checkin/{device_id}" in text
    assert "10 passed, 0 failed, 0 not checked" in text


def test_the_command_exits_1_naming_the_check_when_no_device_checks_in(
    tmp_path: Path, broker_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "device.pub"
    key.write_text(Identity.generate("d").public_key_text)
    argv = ["conformance", "--broker", broker_url, "--namespace", fresh_namespace()]
    argv += ["--device-id", fresh_device_id(), "--device-key", str(key), "--timeout", "0.5"]

    status = main(argv)

    out = capsys.readouterr().out
    assert status == 1
    assert "check_in           FAIL" in out
    assert "0 passed, 1 failed, 9 not checked" in out


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--device-key", "missing.pub"], "cannot read the device key"),
        (["--device-key", "bad.pub"], "not base64"),
        (["--device-key", "good.pub", "--http", "no-port"], "--http takes HOST:PORT"),
    ],
)
def test_unusable_flags_exit_2(
    flags: list[str],
    why: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.pub").write_text("not a key!")
    (tmp_path / "good.pub").write_text(Identity.generate("d").public_key_text)

    status = main(["conformance", "--device-id", "phone-1", *flags])

    assert status == 2
    assert why in capsys.readouterr().err


def test_a_device_id_that_cannot_be_a_topic_segment_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["conformance", "--device-id", "phone/1", "--device-key", "k.pub"])

    assert exit_info.value.code == 2
