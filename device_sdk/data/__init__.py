"""Data sets and partitioners for emulated devices; numpy only, never downloads.

``load_dataset("digits" | "mnist" | "mnist1d")`` returns a :class:`Dataset` with a
fixed train/test split, and ``partition(labels, num_devices, scheme, seed=...)``
splits its training examples across devices (``"iid"``, ``"dirichlet"``,
``"shards"``). A device with data of its own reads it with ``load_examples``
(an ``.npz`` file of ``x`` and ``y``). Errors derive from
:class:`device_sdk.data.errors.DataError`.
Data set files are looked for only where the caller says: ``load_dataset``'s
``data_dir`` (a composition root passes its settings' folders);
``check_available`` says whether they are there without reading them.
"""

from __future__ import annotations

from device_sdk.data._datasets import (
    DATASET_FACTS,
    DATASETS,
    Dataset,
    DatasetFacts,
    check_available,
    load_dataset,
)
from device_sdk.data._examples import load_examples
from device_sdk.data._mnist import DataDirs
from device_sdk.data._partition import PARTITIONS, partition

__all__ = [
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
]
