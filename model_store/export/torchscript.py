"""Export a model as TorchScript: a full trainable module, or a lite one."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from model_store.errors import ExportError

if TYPE_CHECKING:
    from torch import nn
    from torch.jit import ScriptModule

__all__ = ["export_torchscript", "export_torchscript_lite"]


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
