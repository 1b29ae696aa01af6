"""The weights codec: safetensors bytes, read without copying, checked against the model.

safetensors is an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range, then the raw little-endian data.
Decoding maps each tensor onto the buffer with ``numpy.frombuffer`` instead of
copying it: on the aggregation path an update is read once, by the fold.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import save as _st_save

from broker.errors import CodecError, WeightsMismatch

Weights = dict[str, np.ndarray]
"""Named float tensors, in the model's parameter order."""

WeightsSpec = Mapping[str, tuple[tuple[int, ...], str]]
"""Expected ``name -> (shape, dtype name)`` of a model's weights."""

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U32": np.dtype("<u4"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 * 1024 * 1024


def encode_weights(weights: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named tensors to safetensors bytes, keeping their order."""
    return bytes(_st_save({name: np.ascontiguousarray(t) for name, t in weights.items()}))


def decode_weights(
    data: bytes | memoryview, expected: WeightsSpec | None = None, *, copy: bool = False
) -> Weights:
    """Parse safetensors bytes; with ``expected``, insist on its names, shapes and dtypes.

    The arrays are read-only views of ``data`` unless ``copy`` is set (for a
    caller that trains on them in place).
    """
    weights = _parse(memoryview(data).cast("B"))
    if expected is not None:
        check_weights(weights, expected)
        weights = {name: weights[name] for name in expected}
    if copy:
        return {name: t.copy() for name, t in weights.items()}
    return weights


def _parse(buffer: memoryview) -> Weights:
    """Map every tensor of a safetensors buffer onto it; raise ``CodecError`` if malformed."""
    if len(buffer) < 8:
        raise CodecError("not a safetensors blob: shorter than its header length")
    (length,) = struct.unpack_from("<Q", buffer)
    start = 8 + length
    if length > _MAX_HEADER or start > len(buffer):
        raise CodecError("not a safetensors blob: header length out of range")
    try:
        header = json.loads(bytes(buffer[8:start]))
    except ValueError as exc:
        raise CodecError(f"not a safetensors blob: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError("not a safetensors blob: header is not an object")
    header.pop("__metadata__", None)
    weights: Weights = {}
    # Tensors are stored in offset order; the header's key order is not the model's.
    for name, info in sorted(header.items(), key=lambda kv: _offsets(kv[1])[0]):
        begin, end = _offsets(info)
        dtype = _DTYPES.get(str(info.get("dtype")))
        shape = info.get("shape")
        if (
            dtype is None
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise CodecError(f"not a safetensors blob: bad entry for {name!r}")
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * dtype.itemsize or start + end > len(buffer):
            raise CodecError(f"not a safetensors blob: {name!r} does not fit its byte range")
        weights[name] = np.frombuffer(buffer, dtype, count, start + begin).reshape(shape)
    return weights


def _offsets(info: object) -> tuple[int, int]:
    """Return a header entry's byte range, or raise ``CodecError``."""
    if not isinstance(info, dict):
        raise CodecError("not a safetensors blob: a tensor entry is not an object")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CodecError("not a safetensors blob: bad data_offsets")
    return offsets[0], offsets[1]


def check_weights(weights: Mapping[str, np.ndarray], expected: WeightsSpec) -> None:
    """Raise ``WeightsMismatch`` (with ``reason``) unless names, shapes and dtypes match."""
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        raise WeightsMismatch(f"names differ: missing {missing}, unexpected {extra}", "names")
    for name, (shape, dtype) in expected.items():
        tensor = weights[name]
        if tuple(tensor.shape) != tuple(shape):
            raise WeightsMismatch(f"{name}: shape {tensor.shape} != {tuple(shape)}", "shape")
        if tensor.dtype != np.dtype(dtype):
            raise WeightsMismatch(f"{name}: dtype {tensor.dtype} != {dtype}", "dtype")


def weights_spec(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Return the names, shapes and dtypes of ``weights``."""
    return {name: (tuple(t.shape), t.dtype.name) for name, t in weights.items()}
