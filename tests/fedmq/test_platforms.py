"""Platform mixes for emulated fleets, and the config's ``model.platforms``."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from aggregator_service import Database, ExperimentConfig
from aggregator_service.errors import ConfigError
from broker import CheckIn, Delivery, MemoryTransport, TrainTask, decode
from fedmq.defaults import DEMO_CONFIG
from fedmq.platforms import assign_platforms, parse_mix, platform_packagers
from model_store import ExportError, LocalStore, ModelSpec
from tests.identities import SERVICE, TOPICS, device, round_service, sign


def test_a_mix_is_normalised_to_shares() -> None:
    assert parse_mix("python:2,android:1,ios:1") == {"python": 0.5, "android": 0.25, "ios": 0.25}
    assert parse_mix("android") == {"android": 1.0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("python,windows", "unknown platform 'windows'"),
        ("python:x", "bad share 'x'"),
        ("android:0", "must be positive"),
        ("", "at least one platform"),
    ],
)
def test_a_bad_mix_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mix(text)


def test_every_device_gets_a_platform_in_blocks_that_follow_the_shares() -> None:
    assigned = assign_platforms(parse_mix("python,android,ios"), 20)
    assert len(assigned) == 20
    assert Counter(assigned) == {"python": 7, "android": 7, "ios": 6}
    # Contiguous blocks: the platform of an index does not depend on the process.
    assert assigned == ["python"] * 7 + ["android"] * 7 + ["ios"] * 6
    assert assign_platforms(parse_mix("ios:3,python:1"), 8) == ["ios"] * 6 + ["python"] * 2


def _config(**model: Any) -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["model"].update(model)
    return raw


def test_the_config_names_the_platforms_it_is_packaged_for() -> None:
    assert ExperimentConfig.from_dict(_config()).platforms() == ("python",)
    config = ExperimentConfig.from_dict(_config(platforms=["ios", "android"]))
    assert config.platforms() == ("python", "android", "ios")
    assert config.model_spec().zoo == "mlp"


@pytest.mark.parametrize(
    ("platforms", "message"),
    [(["windows"], "unknown \\['windows'\\]"), ("android", "a list of names")],
)
def test_unknown_platforms_are_config_errors(platforms: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=f"model.platforms: {message}"):
        ExperimentConfig.from_dict(_config(platforms=platforms))


def test_a_package_that_cannot_be_built_is_a_config_error(tmp_path: Path) -> None:
    def no_executorch(spec: ModelSpec, seed: int) -> Mapping[str, tuple[bytes, str]]:
        raise ExportError("ExecuTorch is not installed")

    transport, db = MemoryTransport(), Database("sqlite://")
    store = LocalStore(tmp_path / "store")
    service = round_service(transport, store, db, packagers={"ios": no_executorch})
    config = ExperimentConfig.from_dict(_config(platforms=["ios"]))

    with pytest.raises(ConfigError, match="cannot package for ios: ExecuTorch is not installed"):
        service.create_experiment(config)
    transport.close()
    db.close()


def test_a_service_without_a_packager_refuses_the_platform(tmp_path: Path) -> None:
    transport, db = MemoryTransport(), Database("sqlite://")
    service = round_service(transport, LocalStore(tmp_path / "store"), db)  # no packagers
    config = ExperimentConfig.from_dict(_config(platforms=["android"]))
    with pytest.raises(ConfigError, match="cannot package for \\['android'\\]"):
        service.create_experiment(config)
    transport.close()
    db.close()


def test_version_zero_carries_the_phone_packages_and_tasks_point_at_them(tmp_path: Path) -> None:
    transport, store, db = MemoryTransport(), LocalStore(tmp_path / "store"), Database("sqlite://")
    service = round_service(transport, store, db, packagers=platform_packagers())
    service.start()
    phone = device("phone")
    service.register_device("android", public_key=phone.public_key_text, device_id="phone")
    raw = _config(platforms=["android", "ios"])
    raw["rounds"].update(devices_per_round=1, min_reports=1)
    experiment_id = service.create_experiment(ExperimentConfig.from_dict(raw))
    tasks: list[TrainTask] = []

    def capture(delivery: Delivery) -> None:
        message = decode(delivery.body)
        if isinstance(message, TrainTask):
            tasks.append(message)
        delivery.ack()

    transport.subscribe(TOPICS.device("phone"), capture)
    transport.publish(TOPICS.checkin("phone"), sign(CheckIn(device_id="phone", platform="android")))
    service.request_rounds(experiment_id, 1)
    transport.join(timeout=10)
    transport.close()
    db.close()

    artifacts = store.get_manifest(experiment_id, 0).artifacts
    for platform in ("android", "ios"):
        for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
            assert f"{platform}/{name}" in artifacts
        for name in ("training.pte", "inference.pte", "weights.ptd"):
            assert f"{platform}/{name}" in artifacts
    [task] = tasks
    assert task.sender == SERVICE.name and task.grant  # signed by the service, with its grant
    assert task.artifacts["android/checkpoint"].sha256 == artifacts["android/checkpoint"].sha256
    assert task.artifacts["ios/weights.ptd"].sha256 == artifacts["ios/weights.ptd"].sha256
    assert task.artifacts["android/training_model.onnx"].format == "onnx"
    # The round's weights travel as the task's model, never version 0's package copy.
    assert not [name for name in task.artifacts if name.endswith("weights.safetensors")]
    assert task.model.sha256 == artifacts["weights.safetensors"].sha256
