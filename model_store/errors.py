"""Errors raised by ``model_store``.

Every error the package raises derives from :class:`StoreError`, so a caller
can catch one type at its boundary::

    StoreError                 root: bad store URL, unsafe model id, I/O failure,
    │                          S3 bucket missing or access denied
    ├── StoreUnavailable       the store's service cannot be reached now (retry)
    ├── ArtifactNotFound       no blob / manifest under that key
    ├── IntegrityError         a blob's bytes do not match its sha256
    ├── ManifestError          malformed manifest, or a conflicting version
    ├── ModelSpecError         unknown zoo name or a bad shape in a model spec
    └── ExportError            torch could not script / export a model

Lower-library errors (``OSError``, botocore's errors, torch's exporter errors,
``json`` errors) are translated into this tree where they cross the package
boundary, with the original kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "ArtifactNotFound",
    "ExportError",
    "IntegrityError",
    "ManifestError",
    "ModelSpecError",
    "StoreError",
    "StoreUnavailable",
]


class StoreError(Exception):
    """Root of every error raised by ``model_store``."""


class StoreUnavailable(StoreError):
    """The store's service is unreachable or failing (timeout, 5xx); retrying may help."""


class ArtifactNotFound(StoreError):
    """A blob or manifest does not exist in the store."""


class IntegrityError(StoreError):
    """Stored bytes do not hash to the checksum they are filed under."""


class ManifestError(StoreError):
    """A manifest is malformed, or conflicts with one already stored."""


class ModelSpecError(StoreError):
    """A model spec names an unknown zoo model or has an invalid shape."""


class ExportError(StoreError):
    """A model could not be scripted or exported to a deployable format."""
