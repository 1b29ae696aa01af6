"""Export a model's inference graph to ONNX with its weights feedable by name."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from model_store.errors import ExportError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["INPUT_NAME", "ONNX_OPSET", "OUTPUT_NAME", "export_onnx"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

#: Pinned rather than torch's default, which moves with torch releases;
#: 17 runs on ONNX Runtime >= 1.14, including its mobile packages.
ONNX_OPSET = 17


def export_onnx(model: nn.Module, input_shape: Sequence[int], *, opset: int = ONNX_OPSET) -> bytes:
    """Export the inference graph of ``model`` as an ONNX document.

    Every parameter stays an initializer named as in ``model.state_dict()``
    and is also a graph input, so one ONNX Runtime session can run any
    version of the weights: ``session.run(None, {"input": x, **weights})``.
    (ONNX Runtime lists such inputs under ``get_overridable_initializers()``,
    not ``get_inputs()``.)

    Parameters
    ----------
    model
        The torch model; exported in eval mode, its mode is restored after.
    input_shape
        One example's shape, without the batch axis (which is dynamic).
    opset
        The ONNX opset to target.

    Returns
    -------
    bytes
        The serialized ``ModelProto``, weights embedded; input ``"input"``,
        output ``"logits"``.
    """
    import torch

    was_training = model.training
    buffer = io.BytesIO()
    try:
        model.eval()
        example = torch.zeros((1, *input_shape), dtype=torch.float32)
        with warnings.catch_warnings(), torch.no_grad():
            # dynamo=False is the TorchScript-based exporter: torch flags it
            # deprecated, but it is the one that keeps state_dict names as
            # graph inputs and needs no onnxscript. Users can't act on it.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                # torch's stubs say path-only; the TorchScript exporter has
                # always written to file objects, and it spares a temp file.
                buffer,  # type: ignore[arg-type]
                dynamo=False,
                opset_version=opset,
                export_params=True,
                # No folding: a folded weight (e.g. a pre-transposed matrix)
                # would become an anonymous constant no one could feed.
                do_constant_folding=False,
                # Also disables the exporter's deduplication of equal-valued
                # initializers (e.g. two zero biases), which would merge names.
                keep_initializers_as_inputs=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
    except Exception as exc:  # torch raises many unrelated types; translate them all
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {exc}") from exc
    finally:
        model.train(was_training)
    data = buffer.getvalue()
    _check_parameters_feedable(data, [name for name, _ in model.named_parameters()])
    return data


def _check_parameters_feedable(data: bytes, parameter_names: Sequence[str]) -> None:
    """Raise ``ExportError`` unless every parameter is a named graph input."""
    import onnx

    graph = onnx.load_model_from_string(data).graph
    inputs = {value.name for value in graph.input}
    initializers = {tensor.name for tensor in graph.initializer}
    lost = [n for n in parameter_names if n not in inputs or n not in initializers]
    if lost:
        # The aggregator evaluates new weights by feeding them by name;
        # a renamed or folded parameter would silently keep its old value.
        raise ExportError(f"ONNX graph does not expose parameters {lost} as named inputs")
