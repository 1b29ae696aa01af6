"""Splitting a data set's examples across devices: IID, label-Dirichlet and label shards."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from device_sdk.data.errors import PartitionError

IndexArray = npt.NDArray[np.int64]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards")

# Enough for any sensible alpha and fleet size (a few attempts are typical); a cap so
# impossible requests fail instead of spinning.
_MAX_DIRICHLET_ATTEMPTS = 1000


def partition(
    labels: npt.ArrayLike,
    num_devices: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_device: int = 2,
    min_size: int = 10,
) -> list[IndexArray]:
    """Split example indices across devices; the same arguments give the same split.

    Parameters
    ----------
    labels : array_like
        One class label per example, a 1-D array.
    num_devices : int
        How many parts to make, from 1 to ``len(labels)``.
    scheme : str
        One of ``PARTITIONS``. ``"iid"`` deals a random permutation out in parts
        whose sizes differ by at most one. ``"dirichlet"`` gives each device a share
        of every class drawn from ``Dir(alpha)``, redrawing until each device holds
        at least ``min(min_size, len(labels) // (4 * num_devices))`` examples (Hsu et al.
        2019, as FedML's ``hetero`` partition). ``"shards"`` sorts the examples by
        label, cuts them into ``num_devices * shards_per_device`` shards of (nearly)
        equal size and deals each device ``shards_per_device`` random shards
        (McMahan et al. 2017).
    seed : int
        Seed of the generator that makes the split.
    alpha : float, default 0.5
        Dirichlet concentration, > 0; smaller is more skewed. ``"dirichlet"`` only.
    shards_per_device : int, default 2
        Shards per device, >= 1. ``"shards"`` only.
    min_size : int, default 10
        Fewest examples per device, >= 0, capped at ``len(labels) // num_devices``.
        ``"dirichlet"`` only.

    Returns
    -------
    list of numpy.ndarray
        One sorted int64 array of indices into ``labels`` per device. The arrays are
        disjoint and together hold every index.

    Raises
    ------
    PartitionError
        If an argument is out of range, or if ``"dirichlet"`` finds no split meeting
        ``min_size`` within its attempts.
    """
    if scheme not in PARTITIONS:
        raise PartitionError(
            f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITIONS)}"
        )
    y = _checked_labels(labels, num_devices)
    rng = np.random.default_rng(seed)
    splitters: dict[str, Callable[[], list[IndexArray]]] = {
        "iid": lambda: _split_iid(len(y), num_devices, rng),
        "dirichlet": lambda: _split_dirichlet(y, num_devices, rng, alpha, min_size),
        "shards": lambda: _split_shards(y, num_devices, rng, shards_per_device),
    }
    return splitters[scheme]()


def _checked_labels(labels: npt.ArrayLike, num_devices: int) -> npt.NDArray[np.generic]:
    """Return ``labels`` as an array after checking it can be split ``num_devices`` ways."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array, got shape {y.shape}")
    if isinstance(num_devices, bool) or not isinstance(num_devices, int | np.integer):
        raise PartitionError(f"num_devices must be an integer, got {num_devices!r}")
    if not 1 <= num_devices <= len(y):
        raise PartitionError(
            f"num_devices must be between 1 and the number of examples ({len(y)}), "
            f"got {num_devices}"
        )
    return y


def _split_iid(num_examples: int, num_devices: int, rng: np.random.Generator) -> list[IndexArray]:
    """Deal a random permutation out in near-equal parts."""
    order = rng.permutation(num_examples).astype(np.int64, copy=False)
    return [np.sort(part) for part in np.array_split(order, num_devices)]


def _split_shards(
    y: npt.NDArray[np.generic],
    num_devices: int,
    rng: np.random.Generator,
    shards_per_device: int,
) -> list[IndexArray]:
    """Deal each device ``shards_per_device`` random shards of the label-sorted examples."""
    if shards_per_device < 1:
        raise PartitionError(f"shards_per_device must be >= 1, got {shards_per_device}")
    num_shards = num_devices * shards_per_device
    if num_shards > len(y):
        raise PartitionError(
            f"{num_devices} devices x {shards_per_device} shards = {num_shards} shards, "
            f"more than the {len(y)} examples; use fewer devices or shards per device"
        )
    # Stable, so examples of one class keep their order and a seed fully fixes the shards.
    by_label = np.argsort(y, kind="stable").astype(np.int64, copy=False)
    shards = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_devices, shards_per_device)
    return [np.sort(np.concatenate([shards[s] for s in hand])) for hand in dealt]


def _split_dirichlet(
    y: npt.NDArray[np.generic],
    num_devices: int,
    rng: np.random.Generator,
    alpha: float,
    min_size: int,
) -> list[IndexArray]:
    """Give each device a Dirichlet share of every class, redrawing until all are big enough."""
    if not (math.isfinite(alpha) and alpha > 0):
        raise PartitionError(f"alpha must be a positive finite number, got {alpha}")
    if min_size < 0:
        raise PartitionError(f"min_size must be >= 0, got {min_size}")
    # A quarter of the fair share caps the floor, so small data sets split over
    # many devices stay drawable while large ones keep FedML's floor of 10.
    required = min(min_size, max(1, len(y) // (4 * num_devices)))
    by_class = [np.flatnonzero(y == label).astype(np.int64) for label in np.unique(y)]
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        parts = _dirichlet_attempt(by_class, len(y), num_devices, rng, alpha)
        if min(len(part) for part in parts) >= required:
            return parts
    raise PartitionError(
        f"no Dirichlet split (alpha={alpha}) gave all {num_devices} devices at least "
        f"{required} examples in {_MAX_DIRICHLET_ATTEMPTS} attempts; raise alpha, lower "
        "min_size or use fewer devices"
    )


def _dirichlet_attempt(
    by_class: list[IndexArray],
    num_examples: int,
    num_devices: int,
    rng: np.random.Generator,
    alpha: float,
) -> list[IndexArray]:
    """Make one Dirichlet draw per class and cut the shuffled class at its cumulative shares."""
    pieces: list[list[IndexArray]] = [[] for _ in range(num_devices)]
    sizes = np.zeros(num_devices, dtype=np.int64)
    fair_share = num_examples / num_devices
    for members in by_class:
        shuffled = rng.permutation(members)
        shares = rng.dirichlet(np.full(num_devices, alpha))
        # Devices that already hold their fair share get nothing more, which keeps
        # the sizes balanced-ish while the label mix stays skewed.
        open_devices = sizes < fair_share
        shares[~open_devices] = 0.0
        total = shares.sum()
        if total <= 0.0:
            # With a tiny alpha every open device's share can underflow to zero; FedML
            # would divide by zero here. Spread over the open devices instead.
            shares, total = open_devices.astype(np.float64), float(open_devices.sum())
        cuts = (np.cumsum(shares / total) * len(members)).astype(np.int64)[:-1]
        for device, piece in enumerate(np.split(shuffled, cuts)):
            pieces[device].append(piece)
            sizes[device] += len(piece)
    return [np.sort(np.concatenate(device_pieces)) for device_pieces in pieces]
