"""Artifacts and manifests: the versioned description of a model in the store."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from model_store.errors import ManifestError, StoreError

__all__ = [
    "MANIFEST_SCHEMA_VERSION",
    "Artifact",
    "Manifest",
    "check_model_id",
    "check_sha256",
    "utc_now",
]

#: Bumped when the manifest JSON layout changes incompatibly.
MANIFEST_SCHEMA_VERSION = 1

# model ids become directory names (and S3 key parts), so keep them to a
# charset that cannot express a path separator, "..", or a hidden file.
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A platform package's files sit under one folder level ("android/checkpoint");
# names are manifest keys, never paths, but ".." stays out all the same.
_ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def check_model_id(model_id: str) -> str:
    """Return ``model_id`` if it is safe to use as a path part, else raise.

    Parameters
    ----------
    model_id
        Letters, digits, ``.``, ``_`` and ``-``; starts with a letter or
        digit; at most 128 characters.

    Returns
    -------
    str
        The same id.
    """
    if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id):
        raise StoreError(
            f"invalid model id {model_id!r}: use 1-128 of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return model_id


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is a lowercase hex SHA-256 digest, else raise.

    Parameters
    ----------
    sha256
        The digest to check; it names a file, so it is validated strictly.

    Returns
    -------
    str
        The same digest.
    """
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise StoreError(f"not a lowercase hex sha256 digest: {sha256!r}")
    return sha256


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 with a ``Z`` suffix."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _is_int(value: object) -> bool:
    """Tell whether ``value`` is an int and not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Artifact:
    """One stored file of a model version, addressed by its checksum."""

    name: str
    sha256: str
    size: int
    media_type: str

    def __post_init__(self) -> None:
        """Validate the fields so a bad artifact never reaches a store."""
        if not isinstance(self.name, str) or not _ARTIFACT_NAME.fullmatch(self.name):
            raise ManifestError(f"invalid artifact name {self.name!r}")
        try:
            check_sha256(self.sha256)
        except StoreError as exc:
            raise ManifestError(f"artifact {self.name!r}: {exc}") from None
        if not _is_int(self.size) or self.size < 0:
            raise ManifestError(f"artifact {self.name!r}: invalid size {self.size!r}")
        if not isinstance(self.media_type, str) or not self.media_type:
            raise ManifestError(f"artifact {self.name!r}: empty media type")

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (without the name, which is the key)."""
        return {"sha256": self.sha256, "size": self.size, "media_type": self.media_type}


@dataclass(frozen=True)
class Manifest:
    """A model version: its artifacts by name, its lineage and metadata."""

    model_id: str
    version: int
    parent: int | None
    artifacts: Mapping[str, Artifact]
    created_at: str = field(default_factory=utc_now)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate the fields and freeze the top-level mappings."""
        try:
            check_model_id(self.model_id)
        except StoreError as exc:
            raise ManifestError(str(exc)) from None
        if not _is_int(self.version) or self.version < 0:
            raise ManifestError(f"invalid version {self.version!r}")
        if self.parent is not None and (
            not _is_int(self.parent) or not 0 <= self.parent < self.version
        ):
            raise ManifestError(f"parent {self.parent!r} must be None or in [0, {self.version})")
        for name, artifact in self.artifacts.items():
            if not isinstance(artifact, Artifact) or artifact.name != name:
                raise ManifestError(f"artifact under {name!r} is not an Artifact of that name")
        try:
            # A JSON round trip deep-copies the metadata and turns tuples into
            # lists, so a manifest equals itself after to_json/from_json.
            metadata = json.loads(json.dumps(dict(self.metadata), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"metadata is not JSON-serializable: {exc}") from None
        # frozen only stops rebinding; a read-only view keeps callers from
        # mutating a manifest that a store may already have written.
        object.__setattr__(self, "artifacts", MappingProxyType(dict(self.artifacts)))
        object.__setattr__(self, "metadata", MappingProxyType(metadata))

    def same_content(self, other: Manifest) -> bool:
        """Tell whether ``other`` describes the same version, ignoring ``created_at``."""
        return (
            self.model_id == other.model_id
            and self.version == other.version
            and self.parent == other.parent
            and self.artifacts == other.artifacts
            and self.metadata == other.metadata
        )

    def to_json(self) -> bytes:
        """Serialize to canonical UTF-8 JSON (sorted keys, stable across runs).

        Returns
        -------
        bytes
            The manifest document.
        """
        doc = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "model_id": self.model_id,
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "artifacts": {name: a.to_dict() for name, a in self.artifacts.items()},
            "metadata": dict(self.metadata),
        }
        return json.dumps(doc, sort_keys=True, indent=2, allow_nan=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest written by :meth:`to_json`.

        Parameters
        ----------
        data
            The manifest document.

        Returns
        -------
        Manifest
            The parsed, validated manifest.
        """
        try:
            doc = json.loads(data)
            if doc.get("schema_version") != MANIFEST_SCHEMA_VERSION:
                raise ManifestError(
                    f"unsupported manifest schema_version {doc.get('schema_version')!r}"
                )
            artifacts = {
                name: Artifact(name=name, **fields) for name, fields in doc["artifacts"].items()
            }
            return cls(
                model_id=doc["model_id"],
                version=doc["version"],
                parent=doc["parent"],
                artifacts=artifacts,
                created_at=doc["created_at"],
                metadata=doc["metadata"],
            )
        except ManifestError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ManifestError(f"malformed manifest: {exc!r}") from exc
