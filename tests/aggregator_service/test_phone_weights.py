"""Each committed version carries its own ExecuTorch weights file, so a phone fetches only that."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from executorch.extension.pybindings.portable_lib import _load_for_executorch

from aggregator_service.versions import write_version
from android_bridge import android_artifacts
from model_store import LocalStore, ManifestError, ModelSpec, build_model, state_to_numpy
from model_store.ptd import read_layout, rewrite_weights

SPEC = ModelSpec("mlp", (8,), 3, hidden=(16,))


@pytest.fixture(scope="module")
def phone_package() -> dict[str, tuple[bytes, str]]:
    return android_artifacts(build_model(SPEC, seed=0), SPEC.input_shape)


def test_a_committed_versions_weights_file_holds_its_weights_and_runs(
    tmp_path: Path, phone_package: dict[str, tuple[bytes, str]]
) -> None:
    # Prepare: version 0 with the Android package, as a service publishes it.
    store = LocalStore(tmp_path / "store")
    store.publish("exp", 0, phone_package, parent=None, metadata={})
    model = build_model(SPEC, seed=7).eval()

    # Execute: a worker commits version 1 with other weights.
    write_version(store, "exp", 0, 1, state_to_numpy(model), {})

    # Assert: version 1's .ptd is a new file, and the inference program runs its weights.
    v0, v1 = store.get_manifest("exp", 0), store.get_manifest("exp", 1)
    assert v1.artifacts["android/weights.ptd"].sha256 != v0.artifacts["android/weights.ptd"].sha256
    assert v1.artifacts["android/inference.pte"] == v0.artifacts["android/inference.pte"]
    folder = tmp_path / "phone"
    folder.mkdir()
    for name in ("inference.pte", "weights.ptd"):
        (folder / name).write_bytes(store.get_blob(v1.artifacts[f"android/{name}"].sha256))
    program = _load_for_executorch(
        str(folder / "inference.pte"), data_path=str(folder / "weights.ptd")
    )
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    assert torch.abs(program.forward((x,))[0] - expected).max().item() <= 1e-6


def test_rewriting_refuses_weights_that_do_not_fit_the_file(
    phone_package: dict[str, tuple[bytes, str]],
) -> None:
    ptd = phone_package["android/weights.ptd"][0]
    weights = state_to_numpy(build_model(SPEC, seed=0))

    with pytest.raises(ManifestError, match="shape"):
        rewrite_weights(ptd, {**weights, "fc1.bias": np.zeros(17, np.float32)}, key_prefix="net.")
    with pytest.raises(ManifestError, match="holds"):
        rewrite_weights(ptd, {"other": np.zeros(3, np.float32)}, key_prefix="net.")
    with pytest.raises(ManifestError, match="not an ExecuTorch"):
        read_layout(b"\x00" * 64)
    with pytest.raises(ManifestError):
        read_layout(ptd[:200])  # cut short: the index points past the end


def test_a_chain_of_versions_keeps_each_versions_weights_for_both_phones(
    tmp_path: Path, phone_package: dict[str, tuple[bytes, str]]
) -> None:
    store = LocalStore(tmp_path / "store")
    ios = {"ios/" + name.removeprefix("android/"): v for name, v in phone_package.items()}
    store.publish("exp", 0, {**phone_package, **ios}, parent=None, metadata={})

    for version in (1, 2):
        weights = state_to_numpy(build_model(SPEC, seed=10 + version))
        write_version(store, "exp", version - 1, version, weights, {})

        artifacts = store.get_manifest("exp", version).artifacts
        android, ios_file = artifacts["android/weights.ptd"], artifacts["ios/weights.ptd"]
        assert android.sha256 == ios_file.sha256  # written once, listed for both
        data = store.get_blob(android.sha256)
        for name, array in weights.items():
            span = read_layout(data)["net." + name]
            stored = np.frombuffer(data, "<f4", span.nbytes // 4, span.offset).reshape(span.shape)
            np.testing.assert_array_equal(stored, array)
