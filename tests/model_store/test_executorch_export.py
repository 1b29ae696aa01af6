"""Parity: ExecuTorch's programs, run on its runtime, compute what torch computes.

The runtime here is the C++ one an app embeds, through its Python bindings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from executorch.extension.pybindings.portable_lib import _load_for_executorch
from executorch.extension.training import TrainingModule, get_sgd_optimizer

from model_store import ExportError, ManifestError, ModelSpec, build_model, state_to_numpy
from model_store.export import executorch as executorch_export
from model_store.export.executorch import EXECUTORCH_FILES, KEY_PREFIX, export_executorch
from model_store.ptd import read_layout, rewrite_weights

SPECS = {
    "mlp": ModelSpec("mlp", (64,), 10, hidden=(16,)),
    # Small images keep the portable kernels' convolutions quick; the pooling
    # backward (decomposed at export) is what this model checks.
    "mnist_cnn": ModelSpec("mnist_cnn", (1, 12, 12), 10),
}
MAX_BATCH = 16


@pytest.fixture(scope="module", params=sorted(SPECS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    spec = SPECS[request.param]
    files = export_executorch(build_model(spec, seed=0), spec.input_shape, max_batch=MAX_BATCH)
    folder = tmp_path_factory.mktemp(request.param)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return spec, files, folder


def _batch(spec: ModelSpec, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape), dtype=np.float32)
    return torch.from_numpy(x), torch.from_numpy(rng.integers(0, 10, size=n).astype(np.int64))


def _weights_file(folder: Path, files: dict[str, bytes], model: torch.nn.Module) -> Path:
    """Write a weights file holding ``model``'s weights, as a later version's would be."""
    path = folder / f"weights-{id(model)}.ptd"
    path.write_bytes(
        rewrite_weights(files["weights.ptd"], state_to_numpy(model), key_prefix=KEY_PREFIX)
    )
    return path


def test_the_export_writes_both_programs_and_one_weights_file_of_the_models_parameters(
    exported: Any,
) -> None:
    spec, files, _ = exported
    state = state_to_numpy(build_model(spec, seed=0))

    layout = read_layout(files["weights.ptd"])

    assert list(files) == list(EXECUTORCH_FILES)
    assert {key.removeprefix(KEY_PREFIX) for key in layout} == set(state)
    for name, array in state.items():
        span = layout[KEY_PREFIX + name]
        assert span.shape == array.shape
        stored = files["weights.ptd"][span.offset : span.offset + span.nbytes]
        assert stored == array.astype("<f4").tobytes()


def test_the_inference_program_matches_torch_with_any_versions_weights(exported: Any) -> None:
    spec, files, folder = exported
    model = build_model(spec, seed=3).eval()  # not the exported weights
    program = _load_for_executorch(
        str(folder / "inference.pte"), data_path=str(_weights_file(folder, files, model))
    )

    for n in (1, 5, MAX_BATCH):  # the batch axis is dynamic
        x, _ = _batch(spec, n, seed=n)
        (logits,) = program.forward((x,))
        with torch.no_grad():
            expected = model(x)
        # Measured: max |diff| 7e-8 (mlp), 2e-7 (mnist_cnn).
        assert torch.abs(logits - expected).max().item() <= 1e-6


def test_sgd_steps_with_momentum_and_weight_decay_match_torch_sgd(exported: Any) -> None:
    spec, files, folder = exported
    reference = build_model(spec, seed=1)
    weights = _weights_file(folder, files, reference)
    module = TrainingModule(
        _load_for_executorch(str(folder / "training.pte"), data_path=str(weights))
    )
    settings = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    torch_sgd = torch.optim.SGD(reference.parameters(), **settings)
    optimizer = None

    # Three steps: momentum acts from the second; batch sizes vary within max_batch.
    for step, n in enumerate((8, 3, MAX_BATCH)):
        x, y = _batch(spec, n, seed=10 + step)
        loss, _logits = module.forward_backward("forward", (x, y))
        if optimizer is None:  # the runtime names its parameters once a method ran
            optimizer = get_sgd_optimizer(
                module.named_parameters(), settings["lr"], settings["momentum"], 0.0,
                settings["weight_decay"], False,
            )  # fmt: skip
        optimizer.step(module.named_gradients())
        torch_sgd.zero_grad()
        expected = torch.nn.functional.cross_entropy(reference(x), y)
        expected.backward()  # type: ignore[no-untyped-call]
        torch_sgd.step()
        assert abs(float(loss) - float(expected.detach())) <= 1e-6

    trained = module.named_parameters()
    for name, parameter in reference.named_parameters():
        # Measured after three steps: max |diff| 3e-8 (mlp), 2e-7 (mnist_cnn).
        diff = torch.abs(trained[KEY_PREFIX + name] - parameter.detach()).max().item()
        assert diff <= 1e-6, name


def test_a_batch_over_the_exported_maximum_is_refused_by_the_runtime(exported: Any) -> None:
    spec, files, folder = exported
    program = _load_for_executorch(
        str(folder / "inference.pte"), data_path=str(folder / "weights.ptd")
    )
    x, _ = _batch(spec, MAX_BATCH + 1, seed=0)
    (logits,) = program.forward((x[:MAX_BATCH],))  # the program runs, up to its maximum
    assert tuple(logits.shape) == (MAX_BATCH, spec.num_classes)

    # 0x10 is ExecuTorch's NotSupported: a tensor resized past its planned bound.
    with pytest.raises(RuntimeError, match="forward, error: 0x10"):
        program.forward((x,))


def test_a_model_that_does_not_export_raises_export_error() -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on data: torch.export cannot trace it
                return x
            return -x

    with pytest.raises(ExportError, match="ExecuTorch cannot export DataDependent"):
        export_executorch(DataDependent(), (4,))


def test_max_batch_below_two_is_refused() -> None:
    # torch.export cannot make a dynamic axis whose only size is 1.
    with pytest.raises(ExportError, match="max_batch must be at least 2"):
        export_executorch(build_model(SPECS["mlp"], seed=0), (64,), max_batch=1)


def test_equal_tensors_get_bytes_of_their_own_so_a_later_version_can_differ(
    tmp_path: Path,
) -> None:
    # Prepare: two zero-initialised biases of one shape, which ExecuTorch's exporter
    # would otherwise store once.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].bias.zero_()
        model[2].bias.zero_()
    files = export_executorch(model, (4,), max_batch=4)

    # Execute: a later version whose biases differ.
    with torch.no_grad():
        model[0].bias.fill_(0.5)
        model[2].bias.fill_(-0.25)
    weights = tmp_path / "weights.ptd"
    weights.write_bytes(
        rewrite_weights(files["weights.ptd"], state_to_numpy(model), key_prefix=KEY_PREFIX)
    )
    (tmp_path / "inference.pte").write_bytes(files["inference.pte"])
    program = _load_for_executorch(str(tmp_path / "inference.pte"), data_path=str(weights))

    # Assert: the file's tensors are apart, and the program computes the new version.
    layout = read_layout(files["weights.ptd"])
    assert layout["net.0.bias"].offset != layout["net.2.bias"].offset
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    assert torch.abs(program.forward((x,))[0] - expected).max().item() <= 1e-6


def test_a_file_whose_tensors_share_bytes_is_refused(tmp_path: Path) -> None:
    # ExecuTorch's exporter, run on two equal biases directly, stores them once.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].bias.zero_()
        model[2].bias.zero_()
    executorch_export._export(model, (4,), 4, tmp_path / "out", training=False)
    shared = (tmp_path / "out" / "_default_external_constant.ptd").read_bytes()

    with pytest.raises(ManifestError, match="share bytes"):
        read_layout(shared)
