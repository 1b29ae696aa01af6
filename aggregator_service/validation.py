"""Checks an update must pass before it may touch the aggregate."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from broker import CodecError, RejectReason, WeightsMismatch, WeightsSpec, decode_weights

_MISMATCH_REASONS = {
    "names": RejectReason.NAMES_MISMATCH,
    "shape": RejectReason.SHAPE_MISMATCH,
    "dtype": RejectReason.DTYPE_MISMATCH,
}


class Rejected(Exception):
    """An update failed validation; carries the reason reported to the device."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_update_weights(data: bytes | memoryview, spec: WeightsSpec) -> dict[str, np.ndarray]:
    """Decode an update's weights against the model's spec, or raise ``Rejected``."""
    try:
        return decode_weights(data, spec)
    except WeightsMismatch as exc:
        raise Rejected(_MISMATCH_REASONS[exc.what], str(exc)) from exc
    except CodecError as exc:
        raise Rejected(RejectReason.UNDECODABLE, str(exc)) from exc


def check_finite(weights: Mapping[str, np.ndarray]) -> None:
    """Raise ``Rejected`` if any tensor holds NaN or Inf."""
    for name, tensor in weights.items():
        # max and min propagate NaN, and show +Inf and -Inf: two vectorised
        # passes with no temporary, 3x faster than a float64 sum on the
        # worker's hot path (8.5 vs 29 us for 100k float32 values).
        if tensor.size and not (np.isfinite(tensor.max()) and np.isfinite(tensor.min())):
            raise Rejected(RejectReason.NON_FINITE, f"{name} holds NaN or Inf")


def check_examples(num_examples: int) -> None:
    """Raise ``Rejected`` unless the example count is a positive integer."""
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        raise Rejected(RejectReason.BAD_EXAMPLE_COUNT, f"num_examples={num_examples!r}")
