"""What every trainer does alike: check the local data, seed a round, cut it into batches.

The TorchScript, ExecuTorch and ONNX Runtime trainers take the same batches
in the same order for the same task, seed and stream, which is what lets
their updates be compared to 1e-5 and a mixed fleet land next to the
all-Python run.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["epoch_batches", "local_data", "round_rng"]


def local_data(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the examples as contiguous float32 and the labels as int64.

    ``ValueError`` unless there are as many labels as examples, and at least one.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError("a trainer needs as many labels as examples, and at least one")
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(y, dtype=np.int64)


def round_rng(
    seed: int, round_number: int, stream: int | None, device_id: str
) -> np.random.Generator:
    """Return the batch-order generator of one device's task in one round.

    ``stream`` separates devices with the same seed (the fleet passes the
    device's index); without one it is derived from the device id, the same in
    every process.
    """
    if stream is None:
        stream = int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big")
    return np.random.default_rng([seed, round_number, stream])


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Return one epoch's batches: ``range(n)`` permuted, cut in near-equal parts.

    ceil(n / batch_size) parts, so no batch is larger than ``batch_size``.
    """
    return np.array_split(rng.permutation(n), max(1, -(-n // batch_size)))
