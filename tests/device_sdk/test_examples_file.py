"""device_sdk.data.load_examples: an edge device's own examples, from an .npz file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_sdk.data import load_examples
from device_sdk.data.errors import DataNotFound, MalformedData

X = np.arange(12, dtype=np.float64).reshape(3, 4)
Y = np.array([0, 2, 1], dtype=np.int32)


def _saved(tmp_path: Path, **arrays: Any) -> Path:
    path = tmp_path / "examples.npz"
    np.savez(path, **arrays)
    return path


def test_the_examples_come_back_as_float32_and_int64(tmp_path: Path) -> None:
    # Prepare
    path = _saved(tmp_path, x=X, y=Y)

    # Execute
    x, y = load_examples(path)

    # Assert
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, X.astype(np.float32))
    np.testing.assert_array_equal(y, Y)


@pytest.mark.parametrize(
    ("arrays", "says"),
    [
        ({"x": X}, r"lacks array\(s\) \['y'\]"),
        ({"x": X[:2], "y": Y}, "2 example\\(s\\) but 3 label\\(s\\)"),
        ({"x": X, "y": Y.astype(np.float32)}, "integer labels"),
        ({"x": X, "y": np.array([0, -1, 1])}, "labels must be 0 or more, found -1"),
        ({"x": np.array(["a", "b", "c"]).reshape(3, 1), "y": Y}, "x must be real numbers"),
        ({"x": X.astype(np.complex64), "y": Y}, "x must be real numbers"),
        ({"x": X, "y": np.array([0, 1, 2**63], dtype=np.uint64)}, "a label is too large"),
        ({"x": np.arange(3.0), "y": Y}, "one row per example"),
        ({"x": np.where(X > 5, np.nan, X), "y": Y}, "not finite"),
        ({"x": X[:0], "y": Y[:0]}, "need n > 0"),
    ],
    ids=[
        "no-y",
        "counts",
        "float-y",
        "negative",
        "strings",
        "complex",
        "huge-label",
        "flat",
        "nan",
        "empty",
    ],
)
def test_a_bad_examples_file_is_refused_with_what_is_wrong(
    tmp_path: Path, arrays: dict[str, Any], says: str
) -> None:
    # Prepare
    path = _saved(tmp_path, **arrays)

    # Execute / Assert
    with pytest.raises(MalformedData, match=says):
        load_examples(path)


def test_pickled_objects_are_refused_not_run(tmp_path: Path) -> None:
    # Prepare: an object array is stored as a pickle, which would run code on load.
    path = _saved(tmp_path, x=np.array([{"a": 1}, None, 3], dtype=object), y=Y)

    # Execute / Assert
    with pytest.raises(MalformedData, match="not a readable .npz file"):
        load_examples(path)


def test_a_file_that_is_not_npz_or_not_there_is_named(tmp_path: Path) -> None:
    # Prepare
    text = tmp_path / "notes.npz"
    text.write_text("not a zip")

    # Execute / Assert
    with pytest.raises(MalformedData, match="notes.npz is not a readable .npz file"):
        load_examples(text)
    with pytest.raises(DataNotFound, match="no examples file at .*missing.npz"):
        load_examples(tmp_path / "missing.npz")
    lone = tmp_path / "x.npy"
    np.save(lone, X)
    with pytest.raises(MalformedData, match="holds one array; save x and y with numpy.savez"):
        load_examples(lone)
