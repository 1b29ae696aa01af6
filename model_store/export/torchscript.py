"""Export a model as TorchScript: a full trainable module, or a lite one.

The lite export also comes in a functional form whose weights are inputs,
so one module evaluates every round's weights on a phone.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from model_store.errors import ExportError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.jit import ScriptModule

__all__ = ["export_torchscript", "export_torchscript_lite", "export_torchscript_lite_functional"]


def export_torchscript(model: nn.Module, *, training: bool = True) -> bytes:
    """Script ``model`` and save it as a full TorchScript module.

    A device loads it with ``torch.jit.load``, assigns weights with
    ``load_state_dict`` (same names as ``model.state_dict()``) and trains it
    with ``torch.optim``, without the model's Python source.

    The bytes are not reproducible across processes: torch writes a module's
    ``Final`` constants (``in_features``, ``out_features``...) in ``set``
    order, which Python's string-hash randomization changes per process.
    The behaviour is identical; only checksums differ.

    Parameters
    ----------
    model
        A TorchScript-scriptable torch model; its mode is restored after.
    training
        The mode the saved module starts in (train by default: it is the
        trainable artifact).

    Returns
    -------
    bytes
        The ``torch.jit.save`` archive.
    """
    import torch

    buffer = io.BytesIO()
    with _scripted(model, training=training) as scripted:
        try:
            torch.jit.save(scripted, buffer)
        except Exception as exc:  # translate torch's error types at the boundary
            raise ExportError(f"saving TorchScript failed: {exc}") from exc
    return buffer.getvalue()


def export_torchscript_lite(model: nn.Module, *, training: bool = False) -> bytes:
    """Script ``model`` and save it for the PyTorch Mobile lite interpreter.

    Parameters
    ----------
    model
        A TorchScript-scriptable torch model; its mode is restored after.
    training
        The mode the saved module starts in (eval by default: the lite
        interpreter is mainly for inference).

    Returns
    -------
    bytes
        A module that ``torch.jit.mobile._load_for_lite_interpreter`` loads.
    """
    with _scripted(model, training=training) as scripted:
        try:
            data: bytes = scripted._save_to_buffer_for_lite_interpreter()
        except Exception as exc:  # translate torch's error types at the boundary
            raise ExportError(f"saving TorchScript lite failed: {exc}") from exc
    return data


@contextmanager
def _scripted(model: nn.Module, *, training: bool) -> Iterator[ScriptModule]:
    """Yield ``torch.jit.script(model)`` in the given mode, with deprecation noise muted."""
    import torch

    was_training = model.training
    try:
        with warnings.catch_warnings():
            # torch marks TorchScript deprecated; it is still what the mobile
            # runtimes load, and the warning is not actionable for users.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            model.train(training)
            try:
                scripted = torch.jit.script(model)
            except Exception as exc:  # translate torch's error types at the boundary
                raise ExportError(
                    f"torch.jit.script failed for {type(model).__name__}: {exc}"
                ) from exc
            yield scripted
    finally:
        model.train(was_training)


def export_torchscript_lite_functional(
    model: nn.Module, input_shape: Sequence[int]
) -> tuple[bytes, list[str]]:
    """Save ``model`` for the lite interpreter with its weights as inputs.

    The module's ``forward(x, w0, w1, ...)`` returns the logits of ``x``
    under the weights given, so an app evaluates any round's weights with
    the one module it shipped with (``module.forward([x, *weights])`` in
    LibTorch-Lite); no weights are baked into the file. The weights are the
    model's floating-point ``state_dict`` entries (parameters, and buffers
    such as batch-norm statistics), fed in the returned order.

    The module is traced in eval mode, so it must not branch on the input's
    values; the export checks it against torch with perturbed weights and a
    batch size other than the traced one, and raises ``ExportError`` when a
    weight was baked in or the batch axis is fixed.

    Parameters
    ----------
    model
        The torch model; its forward takes one tensor and returns one tensor.
        It is traced in eval mode, and its mode is restored after.
    input_shape
        One example's shape, without the batch axis (which is dynamic).

    Returns
    -------
    tuple
        ``(data, names)``: the module for
        ``torch.jit.mobile._load_for_lite_interpreter``, and the state-dict
        names of the weight inputs that follow ``x``, in order.
    """
    import torch

    shape = _example_shape(input_shape)
    was_training = model.training
    try:
        model.eval()
        state = model.state_dict()
        names = [name for name, tensor in state.items() if tensor.is_floating_point()]
        weights = tuple(state[name].detach().clone() for name in names)
        example = torch.zeros((1, *shape), dtype=torch.float32)
        with _quiet(), torch.no_grad():
            traced = torch.jit.trace(  # type: ignore[no-untyped-call]
                _weights_as_inputs(model, names), (example, *weights), check_trace=False
            )
            data: bytes = traced._save_to_buffer_for_lite_interpreter()
        _check_weights_are_inputs(data, model, names, shape)
    except ExportError:
        raise
    except Exception as exc:  # torch raises many unrelated types; translate them all
        raise ExportError(
            f"functional TorchScript lite export of {type(model).__name__} failed: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    return data, names


def _example_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints, or raise ``ExportError``."""
    shape = tuple(input_shape)
    if not shape or not all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape
    ):
        raise ExportError(f"input_shape must be positive integers, got {list(shape)}")
    return shape


def _weights_as_inputs(model: nn.Module, names: list[str]) -> nn.Module:
    """Return a module computing ``model(x)`` with the named weights taken as inputs.

    ``torch.func.functional_call`` refuses to run under the tracer, so the
    wrapper does the same by hand on a copy of the model whose weights were
    removed: each call sets the given tensors as plain attributes where the
    weights were, runs the model, and removes them again. The tracer then
    sees every weight as a graph input, and the copy holds none to save.
    """
    import torch
    from torch import nn

    stripped = copy.deepcopy(model)
    for name in names:
        owner, leaf = _owner(stripped, name)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)

    class WeightsAsInputs(nn.Module):
        """``forward(x, *weights)``: the model's output under the given weights."""

        def __init__(self) -> None:
            super().__init__()
            self.model = stripped

        def forward(self, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
            """Run the model on ``x`` with ``weights`` in place of its own."""
            owners = [_owner(self.model, name) for name in names]
            for (owner, leaf), tensor in zip(owners, weights, strict=True):
                object.__setattr__(owner, leaf, tensor)
            try:
                out = self.model(x)
            finally:
                for owner, leaf in owners:
                    object.__delattr__(owner, leaf)
            if not isinstance(out, torch.Tensor):
                raise ExportError(f"forward must return one tensor, got {type(out).__name__}")
            return out

    return WeightsAsInputs()


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Return the submodule holding the dotted state-dict entry ``name``, and its leaf name."""
    *path, leaf = name.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def _check_weights_are_inputs(
    data: bytes, model: nn.Module, names: list[str], shape: tuple[int, ...]
) -> None:
    """Raise ``ExportError`` unless the saved module follows new weights like torch does."""
    import torch
    from torch.jit.mobile import _load_for_lite_interpreter

    generator = torch.Generator().manual_seed(0)
    state = model.state_dict()
    probe = {
        name: state[name] + 0.05 * torch.randn(state[name].shape, generator=generator)
        for name in names
    }
    # Batch 3, not the traced 1: a batch size frozen into the trace shows up too.
    x = torch.randn((3, *shape), generator=generator)
    with torch.no_grad():
        expected = torch.func.functional_call(model, probe, (x,))
        lite = _load_for_lite_interpreter(io.BytesIO(data))  # type: ignore[no-untyped-call]
        got = lite(x, *(probe[name] for name in names))
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else math.inf
        raise ExportError(
            f"the traced module does not follow its weight inputs (max abs diff {diff:.3g} "
            f"for batch 3, shapes {tuple(got.shape)} vs {tuple(expected.shape)})"
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """Mute TorchScript deprecation and tracer warnings: the weight check is the stricter test."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        yield
