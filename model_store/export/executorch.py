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
from pathlib import Path
from typing import TYPE_CHECKING

from model_store.errors import ExportError
from model_store.ptd import PTD_KEY_PREFIX, PTD_WEIGHTS, read_layout

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
    if max_batch < 1:
        raise ExportError(f"max_batch must be at least 1, got {max_batch}")
    shape = tuple(int(n) for n in input_shape)
    was_training = model.training
    try:
        with tempfile.TemporaryDirectory(prefix="fedmq-executorch-") as tmp:
            files = {
                TRAINING_PROGRAM: _export(model, shape, max_batch, Path(tmp, "t"), training=True),
                INFERENCE_PROGRAM: _export(model, shape, max_batch, Path(tmp, "i"), training=False),
            }
            files[PTD_WEIGHTS] = Path(tmp, "t", _EXPORTED_DATA).read_bytes()
            inference_data = Path(tmp, "i", _EXPORTED_DATA).read_bytes()
    except ExportError:
        raise
    except ImportError as exc:
        raise ExportError(f"{_INSTALL_HINT} ({exc})") from exc
    except Exception as exc:  # torch.export and ExecuTorch raise many types
        raise ExportError(
            f"ExecuTorch cannot export {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    _check_weights(model, files[PTD_WEIGHTS], inference_data)
    return files


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


def _check_weights(model: nn.Module, data: bytes, inference_data: bytes) -> None:
    """Refuse a weights file that does not hold exactly the model's parameters, unchanged."""
    import numpy as np

    layout = read_layout(data)
    if set(layout) != set(read_layout(inference_data)):
        raise ExportError("the training and inference programs read different weights")
    state = {KEY_PREFIX + name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}
    if set(layout) != set(state):
        raise ExportError(
            f"the exported weights are {sorted(layout)}, the model's state {sorted(state)}: "
            "FedMQ's mobile programs take models whose state is all float32 parameters"
        )
    for key, span in layout.items():
        stored = np.frombuffer(data, dtype="<f4", count=span.nbytes // 4, offset=span.offset)
        if not np.array_equal(stored, state[key].astype(np.float32).ravel()):
            raise ExportError(f"the exported weight {key!r} differs from the model's")


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
