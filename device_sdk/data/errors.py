"""Errors raised by the data sets and partitioners.

::

    DataError
    ├── UnknownDataset        a data set name FedMQ does not know
    ├── DataNotFound          the data set's files are in none of the searched folders
    ├── ChecksumMismatch      a file's bytes do not hash to the published sha256
    ├── MalformedData         a file that verifies but cannot be parsed (bad IDX header, size)
    └── PartitionError        bad partition arguments, or no partition meets the constraints

The errors carry only a message, so they pickle across process boundaries
(the emulated fleet may run devices in worker processes).
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatch",
    "DataError",
    "DataNotFound",
    "MalformedData",
    "PartitionError",
    "UnknownDataset",
]


class DataError(Exception):
    """Root of every error the data package raises."""


class UnknownDataset(DataError):
    """A data set name that is not in ``DATASETS``."""


class DataNotFound(DataError):
    """The files of a data set are in none of the folders searched."""


class ChecksumMismatch(DataError):
    """A data file whose sha256 differs from the published one."""


class MalformedData(DataError):
    """A data file whose content cannot be parsed."""


class PartitionError(DataError):
    """Invalid partition arguments, or no partition satisfying the constraints was found."""
