"""The emulated Android device trains through ONNX Runtime alone: torch never loads."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from android_bridge import android_artifacts
from android_bridge.device import android_ort_trainers
from broker import ModelRef, TrainTask, decode_weights
from device_sdk import ArtifactFetcher, DeviceContext
from model_store import ModelSpec, build_model

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.1}

# Runs in a fresh interpreter: the device's imports only, then one round.
DEVICE = """
import json, sys
import numpy as np
import device_sdk.trainers.onnxruntime
from android_bridge.device import android_ort_trainers
from broker import ModelRef, TrainTask, decode_weights
from device_sdk import ArtifactFetcher, DeviceContext

refs = {name: ModelRef(**ref) for name, ref in json.loads(sys.argv[1]).items()}
settings = json.loads(sys.argv[2])
fetcher = ArtifactFetcher()
weights = decode_weights(fetcher.fetch(refs["android/weights.safetensors"]), copy=True)
rng = np.random.default_rng(0)
x = rng.standard_normal((40, 64), dtype=np.float32)
y = rng.integers(0, 10, size=40)
task = TrainTask(experiment_id="e", round=1, base_version=0,
                 model=refs["android/weights.safetensors"], artifacts=refs, training=settings)
result = android_ort_trainers(5)(x, y, 3)(task, DeviceContext("android-3", weights, refs, fetcher))
print(json.dumps({"torch": "torch" in sys.modules, "metrics": dict(result.metrics)}))
"""


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelRef]:
    folder = tmp_path_factory.mktemp("blobs")
    spec = ModelSpec("mlp", (64,), 10, hidden=(16,))
    out = {}
    for name, (data, _) in android_artifacts(build_model(spec, seed=0), spec.input_shape).items():
        sha = hashlib.sha256(data).hexdigest()
        (folder / sha).write_bytes(data)
        out[name] = ModelRef((folder / sha).as_uri(), sha, len(data))
    return out


def _in_process(refs: dict[str, ModelRef]) -> dict[str, Any]:
    fetcher = ArtifactFetcher()
    weights = decode_weights(fetcher.fetch(refs["android/weights.safetensors"]), copy=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 64), dtype=np.float32)
    y = rng.integers(0, 10, size=40)
    task = TrainTask(
        experiment_id="e",
        round=1,
        base_version=0,
        model=refs["android/weights.safetensors"],
        artifacts=refs,
        training=SETTINGS,
    )
    result = android_ort_trainers(5)(x, y, 3)(
        task, DeviceContext("android-3", weights, refs, fetcher)
    )
    return dict(result.metrics)


def test_an_android_device_trains_without_importing_torch(refs: dict[str, ModelRef]) -> None:
    wire = {
        name: {"uri": r.uri, "sha256": r.sha256, "size": r.size, "format": r.format}
        for name, r in refs.items()
    }

    out = subprocess.run(
        [sys.executable, "-c", DEVICE, json.dumps(wire), json.dumps(SETTINGS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])

    assert report["torch"] is False
    metrics = report["metrics"]
    assert metrics["local_steps"] == 2 * 3  # ceil(40 / 16) batches per epoch
    assert metrics["loss"] < metrics["loss_before"]
    # The torch-free import path trains exactly as ORT does beside torch.
    assert metrics == _in_process(refs)
