"""The named data sets and their loaders."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from device_sdk.data._mnist import DataDirs, find_mnist_dir, load_mnist_arrays
from device_sdk.data.errors import DataError, UnknownDataset

# The digits split must not move with an experiment's seed: every run, and the
# aggregator's held-out evaluation, has to see the same test set.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_MAX_PIXEL = 16.0
_MNIST_MAX_PIXEL = 255.0


# eq=False: the generated __eq__ and __hash__ would compare and hash the arrays
# element-wise, which is ambiguous for numpy and unhashable respectively.
@dataclass(frozen=True, eq=False)
class Dataset:
    """A named data set with a fixed train/test split.

    Attributes
    ----------
    name : str
        The name it was loaded by, one of ``DATASETS``.
    x_train, x_test : numpy.ndarray
        Inputs as float32, one example per row of the first axis.
    y_train, y_test : numpy.ndarray
        Class labels as int64 in ``0 .. num_classes - 1``.
    num_classes : int
        The number of classes.
    """

    name: str
    x_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]
    num_classes: int

    def __post_init__(self) -> None:
        """Reject arrays whose dtypes or lengths do not fit together."""
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dtype != np.float32 or y.dtype != np.int64:
                raise DataError(
                    f"{self.name} {split}: expected float32 inputs and int64 labels, "
                    f"got {x.dtype} and {y.dtype}"
                )
            if y.ndim != 1 or len(x) != len(y):
                raise DataError(
                    f"{self.name} {split}: {len(x)} inputs but labels of shape {y.shape}"
                )
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise DataError(
                f"{self.name}: train examples have shape {self.x_train.shape[1:]} "
                f"but test examples {self.x_test.shape[1:]}"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example, without the leading example axis."""
        return tuple(int(d) for d in self.x_train.shape[1:])


@dataclass(frozen=True)
class DatasetFacts:
    """What a config can be checked against without loading a data set."""

    input_shape: tuple[int, ...]
    num_classes: int
    train_examples: int


DATASET_FACTS = {
    "digits": DatasetFacts((64,), 10, 1437),
    "mnist": DatasetFacts((1, 28, 28), 10, 60000),
    "mnist1d": DatasetFacts((40,), 10, 4000),
}
"""Shape, classes and training-split size of each named data set (tests check them)."""


def load_dataset(name: str, *, data_dir: DataDirs = None) -> Dataset:
    """Load a named data set from local files or installed packages; never download.

    Parameters
    ----------
    name : str
        One of ``DATASETS``: ``"digits"`` (scikit-learn's 8x8 digits, inputs of
        shape ``(64,)``), ``"mnist"`` (inputs of shape ``(1, 28, 28)``) or
        ``"mnist1d"`` (inputs of shape ``(40,)``).
    data_dir : str, os.PathLike or a sequence of them, optional
        The folders searched, in order, for data set files (used by ``"mnist"``:
        each folder itself or its ``mnist`` subfolder). None searches none: the caller's settings
        say where data lives (``FEDMQ_DATA_DIR``, ``../shared/data/mnist``).

    Returns
    -------
    Dataset
        Fresh float32 inputs and int64 labels that the caller may modify.

    Raises
    ------
    UnknownDataset
        If ``name`` is not in ``DATASETS``.
    DataNotFound
        If the files of the data set are in none of the searched folders.
    ChecksumMismatch
        If a file found does not match its published sha256.
    MalformedData
        If a file verifies but cannot be parsed.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise UnknownDataset(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return loader(data_dir)


def _load_digits(data_dir: DataDirs) -> Dataset:
    """Load scikit-learn's bundled 8x8 digits with a fixed stratified 80/20 split."""
    del data_dir  # bundled with scikit-learn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32).reshape(len(bunch.images), -1)
    x /= _DIGITS_MAX_PIXEL
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, stratify=y, random_state=_DIGITS_SPLIT_SEED
    )
    return Dataset(
        name="digits",
        x_train=np.asarray(x_train, dtype=np.float32),
        y_train=np.asarray(y_train, dtype=np.int64),
        x_test=np.asarray(x_test, dtype=np.float32),
        y_test=np.asarray(y_test, dtype=np.int64),
        num_classes=10,
    )


def _load_mnist(data_dir: DataDirs) -> Dataset:
    """Load MNIST from verified local IDX files, images scaled to [0, 1]."""
    arrays = load_mnist_arrays(data_dir)
    return Dataset(
        name="mnist",
        x_train=_scale_images(arrays.x_train),
        y_train=arrays.y_train.astype(np.int64),
        x_test=_scale_images(arrays.x_test),
        y_test=arrays.y_test.astype(np.int64),
        num_classes=10,
    )


def _scale_images(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """Return (n, 28, 28) bytes as (n, 1, 28, 28) float32 in [0, 1], channel first."""
    scaled = images[:, np.newaxis].astype(np.float32)
    scaled /= _MNIST_MAX_PIXEL
    return scaled


def _load_mnist1d(data_dir: DataDirs) -> Dataset:
    """Load MNIST-1D as generated offline with the package's default arguments."""
    del data_dir  # generated, not read
    x_train, y_train, x_test, y_test = _generate_mnist1d()
    return Dataset(
        name="mnist1d",
        x_train=x_train.astype(np.float32),
        y_train=y_train.astype(np.int64),
        x_test=x_test.astype(np.float32),
        y_test=y_test.astype(np.int64),
        num_classes=10,
    )


@functools.cache
def _generate_mnist1d() -> tuple[npt.NDArray[np.generic], ...]:
    """Generate MNIST-1D once per process; its own 4000/1000 split."""
    # mnist1d.data.get_dataset would try a download first; make_dataset only computes.
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` and `np.random` generators; put them
    # back so loading data does not silently change a caller's random stream.
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = tuple(np.asarray(raw[key]) for key in ("x", "y", "x_test", "y_test"))
    for array in arrays:
        array.flags.writeable = False
    return arrays


_LOADERS: dict[str, Callable[[DataDirs], Dataset]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "mnist1d": _load_mnist1d,
}

DATASETS: tuple[str, ...] = tuple(_LOADERS)

_FILES: dict[str, Callable[[DataDirs], object]] = {"mnist": find_mnist_dir}
"""How to find the data sets read from files; the others are bundled or generated."""


def check_available(name: str, data_dir: DataDirs) -> None:
    """Raise ``DataNotFound`` if data set ``name`` is read from files none of the folders hold.

    Cheap: it looks for the files and reads none, so a command can say so
    before it starts a run instead of when its first device loads them.
    """
    find = _FILES.get(name)
    if find is not None:
        find(data_dir)
