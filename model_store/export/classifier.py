"""What every export checks first: the model is a classifier, and how many classes it has."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model_store.errors import ExportError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["output_classes"]


def output_classes(model: nn.Module, shape: tuple[int, ...], expected: int | None = None) -> int:
    """Return the width of a classifier's logits, by running it once on zeros.

    Parameters
    ----------
    model
        The torch classifier; its mode is restored after.
    shape
        One example's shape, without the batch axis.
    expected
        The number of classes it should output, when known.

    Returns
    -------
    int
        The number of classes; ``ExportError`` when the model does not run on
        that shape, returns no ``(batch, classes)`` tensor, or outputs another
        number than ``expected``.
    """
    import torch

    if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
        raise ExportError(f"input_shape must be positive integers, got {list(shape)}")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros((1, *shape), dtype=torch.float32))
    except Exception as exc:  # the user's forward can raise anything; translate it
        raise ExportError(
            f"{type(model).__name__} does not run on input shape {list(shape)}: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ExportError(
            f"{type(model).__name__} must return logits of shape (batch, classes), got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    classes = int(out.shape[1])
    if expected is not None and expected != classes:
        raise ExportError(f"num_classes is {expected} but the model outputs {classes} logits")
    return classes
