"""`fedmq devices run`'s checks before it enrolls: its flags and whether the examples fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator_service import ServiceError
from broker.identity import Identity
from fedmq.cli import main
from fedmq.edge import EdgeOptions, check_examples_fit, edge_device_running
from fedmq.settings import load_settings


def _experiment(zoo: str, input_shape: list[int], num_classes: int = 10) -> dict[str, Any]:
    model = {"zoo": zoo, "input_shape": input_shape, "num_classes": num_classes}
    return {"id": "e1", "config": {"model": model}}


@pytest.mark.parametrize("heartbeat", ["0", "-5", "inf", "soon"])
def test_a_heartbeat_that_is_not_a_positive_number_is_refused(
    heartbeat: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    argv = ["devices", "run", "--device-id", "d", "--key-file", "k", "--data", "x.npz"]

    # Execute
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--heartbeat", heartbeat])

    # Assert
    assert exit_.value.code == 2
    assert "--heartbeat" in capsys.readouterr().err


def test_a_flattening_model_takes_examples_of_the_same_size_in_any_shape() -> None:
    # Prepare: an MLP over 784 inputs, as a config for MNIST gives it.
    experiment = _experiment("mlp", [784])
    images = np.zeros((3, 1, 28, 28), np.float32)

    # Execute / Assert: no error
    check_examples_fit(experiment, images, np.array([0, 1, 9]))


@pytest.mark.parametrize(
    ("zoo", "shape", "x_shape", "labels", "says"),
    [
        ("mlp", [64], (3, 8, 9), [0, 1, 2], r"shaped \[64\]; the data file's are \[8, 9\]"),
        ("mnist_cnn", [1, 28, 28], (3, 784), [0, 1, 2], r"shaped \[1, 28, 28\]"),
        ("mlp", [64], (3, 64), [0, 1, 10], r"10 classes \(labels 0-9\); .* has label 10"),
    ],
    ids=["size", "cnn-needs-its-shape", "label"],
)
def test_examples_the_model_cannot_take_are_refused_with_why(
    zoo: str, shape: list[int], x_shape: tuple[int, ...], labels: list[int], says: str
) -> None:
    # Prepare
    experiment = _experiment(zoo, shape)
    x = np.zeros(x_shape, np.float32)

    # Execute / Assert
    with pytest.raises(ServiceError, match=says):
        check_examples_fit(experiment, x, np.array(labels))


@pytest.mark.parametrize(
    ("flag", "value"), [("--seed", "-1"), ("--stream", "-3"), ("--heartbeat", "0.5")]
)
def test_a_negative_seed_or_stream_or_a_sub_second_heartbeat_is_refused(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    argv = ["devices", "run", "--device-id", "d", "--key-file", "k", "--data", "x.npz"]

    # Execute
    with pytest.raises(SystemExit) as exit_:
        main([*argv, flag, value])

    # Assert
    assert exit_.value.code == 2
    assert flag in capsys.readouterr().err


def _options(tmp_path: Path, device_id: str = "gw-1") -> EdgeOptions:
    data = tmp_path / "examples.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32), y=np.array([0, 1, 2, 3]))
    return EdgeOptions(device_id=device_id, key_file=tmp_path / "gw.key", data=data)


def _start(settings: Any, options: EdgeOptions) -> None:
    with edge_device_running(settings, options):
        pass


def _unreachable_with_token() -> Any:
    """Settings whose service is on port 9, where nothing listens: every enrollment fails."""
    return load_settings(
        environ={"FEDMQ_SERVER_URL": "http://127.0.0.1:9", "FEDMQ_ENROLLMENT_TOKEN": "t"},
        flags={},
    )


def test_a_key_made_for_a_refused_enrollment_is_removed_and_a_kept_one_stays(
    tmp_path: Path,
) -> None:
    # Prepare
    options = _options(tmp_path)
    settings = _unreachable_with_token()

    # Execute / Assert: a new key goes with the failed enrollment...
    with pytest.raises(ServiceError, match="cannot reach the FedMQ service"):
        _start(settings, options)
    assert not options.key_file.exists()
    # ... a key the device already had stays.
    Identity.load_or_create("gw-1", options.key_file)
    with pytest.raises(ServiceError, match="cannot reach the FedMQ service"):
        _start(settings, options)
    assert options.key_file.exists()


def test_a_bad_device_id_is_refused_before_a_key_is_made(tmp_path: Path) -> None:
    # Prepare
    options = _options(tmp_path, device_id="bad/id+#")

    # Execute / Assert
    with pytest.raises(ServiceError, match=r"device id 'bad/id\+#': 1-128 letters"):
        _start(_unreachable_with_token(), options)
    assert not options.key_file.exists()


def test_a_second_process_with_the_same_key_file_is_refused(tmp_path: Path) -> None:
    # Prepare: another process holds the key file's lock.
    options = _options(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "gw.key.lock")], stdout=subprocess.PIPE
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"

    # Execute / Assert
    try:
        with pytest.raises(ServiceError, match="another process runs the device of .*gw.key"):
            _start(_unreachable_with_token(), options)
    finally:
        holder.kill()
        holder.wait()


_HOLD = """
import fcntl, sys, time
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""
