"""ExecuTorch's ``.ptd`` weights file: where each tensor sits, and new values written in place.

A phone that trains with ExecuTorch loads its program (``.pte``) once and a
weights file each round. Every version of a model holds the same tensors
with the same shapes, so a version's weights file is the export-time file
with the tensors' bytes replaced. That needs no ExecuTorch, only this reader
of the file's index, a FlatBuffer (``extension/flat_tensor/serialize/
flat_tensor.fbs`` in ExecuTorch) read with the ``flatbuffers`` runtime:

    FlatTensor { version: uint32; segments: [DataSegment]; named_data: [NamedData] }
    DataSegment { offset: uint64; size: uint64 }
    NamedData { key: string; segment_index: uint32; tensor_layout: TensorLayout }
    TensorLayout { scalar_type: int8; sizes: [int32]; dim_order: [uint8] }

An extended header at byte 8 (magic ``FH01``) gives where the segments
start. The workers and the service rewrite files with this module; the
exporter that writes the first file is ``model_store.export.executorch``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flatbuffers import number_types
from flatbuffers.table import Table

from model_store.errors import ManifestError

__all__ = ["PTD_KEY_PREFIX", "PTD_WEIGHTS", "TensorSpan", "read_layout", "rewrite_weights"]

#: The weights file of a platform package (``android/weights.ptd``, ``ios/weights.ptd``).
PTD_WEIGHTS = "weights.ptd"
#: What the keys of FedMQ's exported weights files add in front of the parameter
#: names: the exported programs hold the model as their ``net`` attribute.
PTD_KEY_PREFIX = "net."

_IDENTIFIER = b"FT01"
_HEADER_MAGIC = b"FH01"
_HEADER_AT = 8
_HEADER_LENGTH = 40
# ExecuTorch's ScalarType.FLOAT: FedMQ's parameters are float32.
_FLOAT = 6
# Field slots of the tables above, in declaration order.
_SEGMENTS, _NAMED_DATA = 1, 2
_SEGMENT_OFFSET, _SEGMENT_SIZE = 0, 1
_KEY, _SEGMENT_INDEX, _LAYOUT = 0, 1, 2
_SCALAR_TYPE, _SIZES, _DIM_ORDER = 0, 1, 2


@dataclass(frozen=True)
class TensorSpan:
    """Where one float32 tensor's bytes sit in a ``.ptd`` file."""

    key: str
    offset: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes (float32)."""
        return 4 * int(np.prod(self.shape, dtype=np.int64))


def read_layout(data: bytes) -> dict[str, TensorSpan]:
    """Return every tensor of a ``.ptd`` file by key, with its byte offset and shape.

    Parameters
    ----------
    data
        The file's bytes.

    Returns
    -------
    dict
        ``key -> TensorSpan``. ``ManifestError`` when the bytes are not a
        flat-tensor file, a tensor is not float32 in contiguous order, or a
        tensor's bytes lie outside the file.
    """
    if len(data) < _HEADER_AT + _HEADER_LENGTH or data[4:8] != _IDENTIFIER:
        raise ManifestError("not an ExecuTorch .ptd file (no FT01 identifier)")
    header = data[_HEADER_AT : _HEADER_AT + _HEADER_LENGTH]
    if header[:4] != _HEADER_MAGIC:
        raise ManifestError("not an ExecuTorch .ptd file (no FH01 header)")
    base = int.from_bytes(header[24:32], "little")
    try:
        root = Table(data, int.from_bytes(data[0:4], "little"))
        segments = [_segment(t) for t in _tables(root, _SEGMENTS)]
        spans = [_span(t, segments, base) for t in _tables(root, _NAMED_DATA)]
    except (IndexError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ManifestError(f"malformed .ptd index: {exc}") from exc
    end, previous = 0, ""
    for span in sorted(spans, key=lambda s: s.offset):
        if span.offset + span.nbytes > len(data):
            raise ManifestError(f"tensor {span.key!r} lies past the end of the .ptd file")
        if span.offset < end:
            # The exporter stores equal tensors once; rewriting one would change both.
            raise ManifestError(f"tensors {previous!r} and {span.key!r} share bytes")
        end, previous = span.offset + span.nbytes, span.key
    return {span.key: span for span in spans}


def rewrite_weights(
    data: bytes, weights: Mapping[str, np.ndarray], *, key_prefix: str = ""
) -> bytes:
    """Return ``data`` with each tensor's bytes replaced by ``weights[name]``.

    Parameters
    ----------
    data
        A ``.ptd`` file whose keys are ``key_prefix + name`` for every name of
        ``weights``, with the same shapes.
    weights
        The new values, by parameter name.
    key_prefix
        What the file's keys add in front of the parameter names.

    Returns
    -------
    bytes
        The new file; ``ManifestError`` when the file's tensors and
        ``weights`` differ in names or shapes.
    """
    layout = read_layout(data)
    expected = {key_prefix + name for name in weights}
    if set(layout) != expected:
        raise ManifestError(f"the .ptd file holds {sorted(layout)}, the weights {sorted(expected)}")
    out = bytearray(data)
    for name, array in weights.items():
        span = layout[key_prefix + name]
        if tuple(array.shape) != span.shape:
            raise ManifestError(
                f"weight {name!r} has shape {list(array.shape)}, the .ptd file {list(span.shape)}"
            )
        values = np.ascontiguousarray(array, dtype="<f4")
        out[span.offset : span.offset + span.nbytes] = values.tobytes()
    return bytes(out)


def _tables(table: Table, slot: int) -> list[Table]:
    """Return the tables of a vector-of-tables field (empty when absent)."""
    offset = table.Offset(4 + 2 * slot)
    if not offset:
        return []
    start = table.Vector(offset)
    return [
        Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(table.VectorLen(offset))
    ]


def _scalar(table: Table, slot: int, flags: type, default: int = 0) -> int:
    """Return a scalar field (its default when absent)."""
    offset = table.Offset(4 + 2 * slot)
    return int(table.Get(flags, table.Pos + offset)) if offset else default


def _vector(table: Table, slot: int, flags: type, size: int) -> list[int]:
    """Return a vector-of-scalars field (empty when absent)."""
    offset = table.Offset(4 + 2 * slot)
    if not offset:
        return []
    start = table.Vector(offset)
    return [int(table.Get(flags, start + size * i)) for i in range(table.VectorLen(offset))]


def _segment(table: Table) -> tuple[int, int]:
    """Return one DataSegment's (offset, size)."""
    return (
        _scalar(table, _SEGMENT_OFFSET, number_types.Uint64Flags),
        _scalar(table, _SEGMENT_SIZE, number_types.Uint64Flags),
    )


def _span(table: Table, segments: list[tuple[int, int]], base: int) -> TensorSpan:
    """Return one NamedData's span, refusing what a weights rewrite cannot handle."""
    key_at = table.Offset(4 + 2 * _KEY)
    key = table.String(table.Pos + key_at).decode() if key_at else ""
    layout_at = table.Offset(4 + 2 * _LAYOUT)
    if not key or not layout_at:
        raise ValueError("a named entry without a key or a tensor layout")
    layout = Table(table.Bytes, table.Indirect(table.Pos + layout_at))
    scalar_type = _scalar(layout, _SCALAR_TYPE, number_types.Int8Flags)
    shape = tuple(_vector(layout, _SIZES, number_types.Int32Flags, 4))
    dim_order = _vector(layout, _DIM_ORDER, number_types.Uint8Flags, 1)
    if scalar_type != _FLOAT:
        raise ValueError(f"tensor {key!r} is not float32 (scalar type {scalar_type})")
    if dim_order and dim_order != sorted(dim_order):
        raise ValueError(f"tensor {key!r} is not in contiguous order ({dim_order})")
    offset, size = segments[_scalar(table, _SEGMENT_INDEX, number_types.Uint32Flags)]
    span = TensorSpan(key, base + offset, shape)
    if size < span.nbytes:
        raise ValueError(f"tensor {key!r} needs {span.nbytes} bytes, its segment has {size}")
    return span
