"""Export ExecuTorch programs of a model: one that trains, one that infers, weights apart.

ExecuTorch is the runtime phones ship for on-device training
(``executorch.extension.training``: ``TrainingModule`` and its SGD on
Android, the same C++ classes on iOS). Three files come out:

- ``training.pte``: method ``forward(input, labels) -> (loss, logits)``, with
  the backward pass in the program, so the runtime's ``forward_backward``
  yields the loss and every parameter's gradient;
- ``inference.pte``: method ``forward(input) -> logits``;
- ``weights.ptd``: every parameter, keyed ``net.<state_dict name>``. Both
  programs read their weights from it, so a phone downloads the programs
  once and a new weights file each round (``model_store.ptd`` writes a
  version's file without ExecuTorch).

The batch axis is dynamic up to ``max_batch``; the runtime plans memory for
that size. Two sharp edges of the 1.5.1 runtime are handled here: its
max-pool backward kernel never zeroes its gradient buffer, so that op is
decomposed into ones that do; and ``named_parameters`` answers only after
the first ``forward_backward`` (the device trainers know).
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model_store.errors import ExportError, ManifestError
from model_store.ptd import PTD_KEY_PREFIX, PTD_WEIGHTS, read_layout, rewrite_weights

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "DEFAULT_MAX_BATCH",
    "EXECUTORCH_FILES",
    "INFERENCE_PROGRAM",
    "KEY_PREFIX",
    "MEDIA_EXECUTORCH_DATA",
    "MEDIA_EXECUTORCH_PROGRAM",
    "TRAINING_PROGRAM",
    "export_executorch",
]

TRAINING_PROGRAM = "training.pte"
INFERENCE_PROGRAM = "inference.pte"
#: The files :func:`export_executorch` returns.
EXECUTORCH_FILES = (TRAINING_PROGRAM, INFERENCE_PROGRAM, PTD_WEIGHTS)

MEDIA_EXECUTORCH_PROGRAM = "application/vnd.fedmq.executorch-program"
MEDIA_EXECUTORCH_DATA = "application/vnd.fedmq.executorch-data"

#: What the weights file's keys add in front of the parameter names.
KEY_PREFIX = PTD_KEY_PREFIX

#: Largest batch the programs take by default (the runtime plans memory for it).
DEFAULT_MAX_BATCH = 128

# The exporter writes the weights of both programs to this file.
_EXPORTED_DATA = "_default_external_constant.ptd"
_INSTALL_HINT = (
    "ExecuTorch is not installed; install it beside torch with "
    "`pip install --no-deps executorch==1.5.1 ruamel.yaml tabulate` (see docs/mobile.md)"
)


def export_executorch(
    model: nn.Module, input_shape: Sequence[int], *, max_batch: int = DEFAULT_MAX_BATCH
) -> dict[str, bytes]:
    """Return the ExecuTorch training program, inference program and weights of ``model``.

    Parameters
    ----------
    model
        A torch classifier whose forward maps a float32 batch to logits; its
        mode and weights are left as they were.
    input_shape
        One example's shape, without the batch axis.
    max_batch
        The largest batch either program accepts.

    Returns
    -------
    dict
        ``name -> bytes`` for each of :data:`EXECUTORCH_FILES`; ``ExportError``
        when ExecuTorch is missing or cannot export the model.
    """
    if max_batch < 2:
        # torch.export cannot make a dynamic axis whose only size is 1.
        raise ExportError(f"max_batch must be at least 2, got {max_batch}")
    try:
        import executorch.exir  # noqa: F401 - only to say clearly that it is missing
    except ImportError as exc:
        raise ExportError(f"{_INSTALL_HINT} ({exc})") from exc
    shape = tuple(int(n) for n in input_shape)
    state = _float32_state(model)
    # ExecuTorch stores equal tensors once (two zero-initialised biases would share
    # bytes, and a later version's values could not differ): export a copy whose
    # values are all distinct, then write the model's own into the file.
    stand_in = _with_distinct_values(model)
    try:
        with tempfile.TemporaryDirectory(prefix="fedmq-executorch-") as tmp:
            files = {
                TRAINING_PROGRAM: _export(
                    stand_in, shape, max_batch, Path(tmp, "t"), training=True
                ),
                INFERENCE_PROGRAM: _export(
                    stand_in, shape, max_batch, Path(tmp, "i"), training=False
                ),
            }
            exported = Path(tmp, "t", _EXPORTED_DATA).read_bytes()
            inference_data = Path(tmp, "i", _EXPORTED_DATA).read_bytes()
    except Exception as exc:  # torch.export and ExecuTorch raise many types
        raise ExportError(
            f"ExecuTorch cannot export {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        if set(read_layout(exported)) != set(read_layout(inference_data)):
            raise ExportError("the training and inference programs read different weights")
        files[PTD_WEIGHTS] = rewrite_weights(exported, state, key_prefix=KEY_PREFIX)
    except ManifestError as exc:
        raise ExportError(f"the exported weights file does not fit the model: {exc}") from exc
    return files


def _float32_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Return the model's state as float32 arrays; refuse other dtypes."""
    state = {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}
    other = sorted(name for name, array in state.items() if array.dtype != np.float32)
    if other:
        raise ExportError(f"FedMQ's phone programs take float32 models; {other} are not float32")
    return state


def _with_distinct_values(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` whose every tensor holds distinct random values."""
    import torch

    copy = deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in copy.state_dict().values():  # views of the parameters
            tensor.copy_(torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype))
    return copy


def _export(
    model: nn.Module, shape: tuple[int, ...], max_batch: int, out: Path, *, training: bool
) -> bytes:
    """Export one program into ``out``; return the program's bytes (its weights stay in ``out``)."""
    import torch
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from torch.export import Dim, export

    batch = Dim("batch", min=1, max=max_batch)
    # Two examples: a batch of one would let the exporter specialise the axis.
    x = torch.zeros((2, *shape), dtype=torch.float32)
    if training:
        from torch._decomp import get_decompositions
        from torch.export.experimental import _export_forward_backward

        y = torch.zeros(2, dtype=torch.long)
        root = _roots()[0](model.train())
        program = export(root, (x, y), dynamic_shapes=({0: batch}, {0: batch}), strict=False)
        program = _export_forward_backward(program)
        # The runtime's max-pool backward kernel accumulates into a buffer it
        # never zeroes (1.4.1-1.5.1); the decomposed ops overwrite theirs.
        pool_backward = torch.ops.aten.max_pool2d_with_indices_backward.default
        program = program.run_decompositions(get_decompositions([pool_backward]))
        backend = ExecutorchBackendConfig(external_mutable_weights=True)
    else:
        root = _roots()[1](model.eval())
        program = export(root, (x,), dynamic_shapes=({0: batch},), strict=False)
        backend = ExecutorchBackendConfig(external_constants=True)
    # The joint forward-backward graph holds ops outside the core ATen set the
    # validator knows; the portable kernels run them.
    edge = to_edge(program, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    executable = edge.to_executorch(backend)
    out.mkdir()
    executable.write_tensor_data_to_file(str(out))
    return bytes(executable.buffer)


@functools.cache
def _roots() -> tuple[type[nn.Module], type[nn.Module]]:
    """Return the export roots' classes (defined on first use: torch loads only to export)."""
    import torch
    from torch import nn

    class WithLoss(nn.Module):
        """``(input, labels) -> (mean cross-entropy, logits)``; output 0 is differentiated."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.net(x)
            return torch.nn.functional.cross_entropy(logits, y), logits.detach()

    class Logits(nn.Module):
        """``input -> logits``, with the model under the same ``net.`` prefix."""

        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x)
            return out

    return WithLoss, Logits
