"""A device's own training examples, read from an ``.npz`` file it holds."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from device_sdk.data.errors import DataNotFound, MalformedData

EXAMPLES_KEYS = ("x", "y")
"""The arrays an examples file holds: ``x`` (one row per example) and ``y`` (integer labels)."""


def load_examples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the examples (float32) and labels (int64) in the ``.npz`` file at ``path``.

    The file holds ``x``, shaped ``(n, *input_shape)``, and ``y``, ``n``
    integer labels from 0: what ``numpy.savez(path, x=..., y=...)`` writes.
    Pickled objects are refused (``allow_pickle=False``): a data file must
    not run code.

    Raises
    ------
    DataNotFound
        No file at ``path``.
    MalformedData
        Not an ``.npz`` file (a lone ``.npy`` included), an array missing,
        examples that are not finite real numbers, labels that are not
        integers from 0 to int64's largest, or counts that differ.
    """
    file = Path(path)
    if not file.is_file():
        raise DataNotFound(f"no examples file at {file}")
    try:
        loaded = np.load(file, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):  # a lone .npy array
            raise MalformedData(f"{file} holds one array; save x and y with numpy.savez")
        with loaded as arrays:
            missing = [key for key in EXAMPLES_KEYS if key not in arrays.files]
            if missing:
                raise MalformedData(
                    f"{file} lacks array(s) {missing}; it holds {sorted(arrays.files)}"
                )
            x, y = arrays["x"], arrays["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise MalformedData(f"{file} is not a readable .npz file: {exc}") from exc
    return _checked(file, x, y)


def _checked(file: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real = np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)
    if x.ndim < 2 or not (real or x.dtype == np.bool_):
        raise MalformedData(
            f"{file}: x must be real numbers with one row per example, got {x.dtype} {x.shape}"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise MalformedData(
            f"{file}: y must be a 1-d array of integer labels, got {y.dtype} {y.shape}"
        )
    if len(x) != len(y) or len(x) == 0:
        raise MalformedData(
            f"{file}: {len(x)} example(s) but {len(y)} label(s); need n > 0 of each"
        )
    if y.min() < 0:
        raise MalformedData(f"{file}: labels must be 0 or more, found {int(y.min())}")
    if y.max() > np.iinfo(np.int64).max:  # uint64 labels would wrap negative
        raise MalformedData(f"{file}: a label is too large: {int(y.max())}")
    examples = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(examples).all():
        raise MalformedData(f"{file}: x holds values that are not finite")
    return examples, np.ascontiguousarray(y, dtype=np.int64)
