"""Each package's public surface is exactly its ``__all__``, and every name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = {
    "broker": {
        "connect",
        "MemoryTransport",
        "Transport",
        "TrainTask",
        "ModelUpdate",
        "encode",
        "decode",
        "encode_weights",
        "decode_weights",
        "ModelRef",
        "topics",
    },
    "model_store": {
        "LocalStore",
        "MemoryStore",
        "ModelStore",
        "open_store",
        "ModelSpec",
        "build_initial_artifacts",
        "export_onnx",
        "export_torchscript",
    },
    "aggregator_service": {
        "RoundService",
        "AggregatorWorker",
        "ExperimentConfig",
        "Database",
        "OnnxEvaluator",
        "load_config",
    },
    "device_sdk": {"DeviceApp", "DeviceClient", "DeviceContext", "TrainResult", "ArtifactFetcher"},
    "device_sdk.data": {"load_dataset", "partition", "Dataset", "DATASETS", "PARTITIONS"},
}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_all_lists_resolvable_names_including_the_core_ones(package: str) -> None:
    module = importlib.import_module(package)

    exported = set(module.__all__)

    assert PACKAGES[package] <= exported
    assert len(module.__all__) == len(exported), "duplicates in __all__"
    for name in exported:
        assert hasattr(module, name), f"{package}.{name} is in __all__ but missing"


def test_the_aggregation_path_and_device_sdk_never_import_torch_at_import_time() -> None:
    code = (
        "import sys, broker, aggregator_service, device_sdk, model_store;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_l0_packages_import_no_project_package() -> None:
    code = (
        "import sys, broker, model_store;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'aggregator_service','device_sdk','fedmq','android_bridge','ios_bridge'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


SERVICE_LAYER = ("flask", "waitress", "sqlalchemy", "alembic", "onnxruntime", "torch")


def test_the_worker_and_fleet_command_modules_import_no_database_http_or_evaluator() -> None:
    # Every `fedmq worker` and `fedmq fleet` process used to import the whole
    # service (about 0.5 s of CPU at each start, and `fedmq --help` took 0.9 s).
    code = (
        "import sys, fedmq.cli, fedmq.processes, fedmq.components, aggregator_service;"
        "aggregator_service.AggregatorWorker, aggregator_service.ExperimentConfig;"
        f"print(sorted(m for m in {SERVICE_LAYER!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_lazy_name_is_its_modules_object_and_an_unknown_one_an_attribute_error() -> None:
    import aggregator_service
    from aggregator_service.persistence import Database

    assert aggregator_service.Database is Database
    with pytest.raises(AttributeError, match="no attribute 'Databse'"):
        aggregator_service.Databse  # noqa: B018
