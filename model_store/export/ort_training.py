"""Export ONNX Runtime on-device training artifacts for a model.

A phone that trains with ONNX Runtime's training API needs four files: the
training graph (forward, loss and gradients), the eval graph (forward and
loss), the optimizer graph and a checkpoint holding the parameters. They are
generated here from a torch model, so the device runs no Python and no torch.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_store.errors import ExportError
from model_store.export.onnx import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "CHECKPOINT",
    "EVAL_MODEL",
    "LABELS_NAME",
    "MEDIA_ORT_CHECKPOINT",
    "OPTIMIZER_MODEL",
    "TRAINING_FILES",
    "TRAINING_MODEL",
    "TRAINING_OPTIMIZERS",
    "export_training_artifacts",
    "parameter_order",
]

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
#: The files ``generate_artifacts`` writes, which a device loads together.
TRAINING_FILES = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT)

#: The name ONNX Runtime's cross-entropy block gives the labels input.
LABELS_NAME = "labels"

#: ORT's checkpoint is its own flatbuffer format, not an ONNX document.
MEDIA_ORT_CHECKPOINT = "application/vnd.fedmq.ort-checkpoint"

#: Optimizers ONNX Runtime's artifact generator offers, by FedMQ name.
TRAINING_OPTIMIZERS = ("sgd", "adamw")

_LOSSES = ("cross_entropy",)

# ORT's gradient builder names each trainable parameter's gradient input so.
_GRAD_BUFFER_SUFFIX = "_grad.accumulation.buffer"

# ORT 1.19.2 (the last onnxruntime-training release) loads IR <= 10;
# onnx >= 1.18 stamps new graphs IR 11+, though these use nothing newer.
_ORT_MAX_IR_VERSION = 10


def export_training_artifacts(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    loss: str = "cross_entropy",
    optimizer: str = "sgd",
) -> dict[str, bytes]:
    """Generate ONNX Runtime's on-device training artifacts for ``model``.

    Every parameter is trainable; the batch axis is dynamic; the labels are
    ``int64`` class indices of shape ``[batch]``, fed as input ``"labels"``
    after ``"input"``. Parameters keep their ``state_dict`` names in the
    checkpoint, so a device can set them from a weights file by name.

    Parameters
    ----------
    model
        The torch model; it returns logits. Its train/eval mode is restored.
    input_shape
        One example's shape, without the batch axis.
    loss
        ``"cross_entropy"`` (the only loss FedMQ's tasks train with).
    optimizer
        ``"sgd"`` (plain SGD, the learning rate set per task) or ``"adamw"``.

    Returns
    -------
    dict
        The bytes of each of :data:`TRAINING_FILES`:
        ``"training_model.onnx"``, ``"eval_model.onnx"``,
        ``"optimizer_model.onnx"`` and ``"checkpoint"``.
    """
    if loss not in _LOSSES:
        raise ExportError(f"unsupported training loss {loss!r}; supported: {', '.join(_LOSSES)}")
    if optimizer not in TRAINING_OPTIMIZERS:
        raise ExportError(
            f"unsupported training optimizer {optimizer!r}; "
            f"supported: {', '.join(TRAINING_OPTIMIZERS)}"
        )
    proto = _training_graph(model, input_shape)
    parameters = [name for name, _ in model.named_parameters()]
    files = _generate(proto, parameters, optimizer)
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL):
        files[name] = _loadable_by_ort(files[name])
    return files


def parameter_order(training_model: bytes) -> list[str]:
    """Return the trainable parameters in the order of ORT's flat parameter buffer.

    ONNX Runtime's ``CopyBufferToParameters`` / ``CopyParametersToBuffer``
    (``Module.copy_buffer_to_parameters`` in Python, ``FromBuffer`` /
    ``ToBuffer`` in C++) move all trainable parameters as one float vector,
    concatenated in the training graph's input order.

    Parameters
    ----------
    training_model
        The ``"training_model.onnx"`` bytes from :func:`export_training_artifacts`.

    Returns
    -------
    list
        Parameter names, in buffer order.
    """
    import onnx

    inputs = [value.name for value in onnx.load_model_from_string(training_model).graph.input]
    # Each trainable parameter comes with a gradient-accumulation input.
    accumulated = set(inputs)
    return [name for name in inputs if f"{name}{_GRAD_BUFFER_SUFFIX}" in accumulated]


def _training_graph(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """Export ``model`` for training and return the ``onnx.ModelProto``."""
    import onnx
    import torch

    was_training = model.training
    buffer = io.BytesIO()
    try:
        example = torch.zeros((1, *input_shape), dtype=torch.float32)
        with warnings.catch_warnings():
            # The TorchScript-based exporter (dynamo=False) is flagged
            # deprecated, but it keeps state_dict names and needs no onnxscript.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                buffer,  # type: ignore[arg-type]  # file objects work; stubs say path
                dynamo=False,
                opset_version=ONNX_OPSET,
                export_params=True,
                training=torch.onnx.TrainingMode.TRAINING,
                # Folding would turn a parameter into an anonymous constant the
                # gradient builder cannot train and the device cannot set.
                do_constant_folding=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as exc:  # torch raises many unrelated types; translate them all
        raise ExportError(f"ONNX training export of {type(model).__name__} failed: {exc}") from exc
    finally:
        model.train(was_training)
    proto = onnx.load_model_from_string(buffer.getvalue())
    initializers = {tensor.name for tensor in proto.graph.initializer}
    lost = [name for name, _ in model.named_parameters() if name not in initializers]
    if lost:
        raise ExportError(f"ONNX training graph does not keep parameters {lost} by name")
    return proto


def _generate(proto: Any, parameters: list[str], optimizer: str) -> dict[str, bytes]:
    """Run ORT's artifact generator on the model ``proto``; return the files' bytes."""
    # Imported here: this pulls in ORT's training package (and torch with it).
    from onnxruntime.training import artifacts

    # Buffers (e.g. batch-norm statistics) stay in the graph but are not trained.
    frozen = [t.name for t in proto.graph.initializer if t.name not in set(parameters)]
    optim = artifacts.OptimType.SGD if optimizer == "sgd" else artifacts.OptimType.AdamW
    with tempfile.TemporaryDirectory(prefix="fedmq-ort-artifacts-") as folder:
        try:
            artifacts.generate_artifacts(
                proto,
                requires_grad=parameters,
                frozen_params=frozen,
                loss=artifacts.LossType.CrossEntropyLoss,
                optimizer=optim,
                artifact_directory=folder,
            )
            return {name: (Path(folder) / name).read_bytes() for name in TRAINING_FILES}
        except Exception as exc:  # ORT's generator raises RuntimeError, onnx errors, OSError
            raise ExportError(f"ONNX Runtime training artifact generation failed: {exc}") from exc


def _loadable_by_ort(data: bytes) -> bytes:
    """Return ``data``, rewritten to an IR version ORT 1.19.2 loads if it is newer."""
    import onnx

    proto = onnx.load_model_from_string(data)
    if proto.ir_version <= _ORT_MAX_IR_VERSION:
        return data
    proto.ir_version = _ORT_MAX_IR_VERSION
    return bytes(proto.SerializeToString())
