"""Artifact and Manifest: validation and the JSON form."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from model_store import Artifact, Manifest, ManifestError

SHA = hashlib.sha256(b"w").hexdigest()


def _artifact(name: str = "weights.safetensors") -> Artifact:
    return Artifact(name=name, sha256=SHA, size=1, media_type="application/vnd.fedmq.safetensors")


def test_json_round_trip() -> None:
    # Prepare
    manifest = Manifest(
        model_id="digits",
        version=4,
        parent=3,
        artifacts={"weights.safetensors": _artifact()},
        created_at="2026-01-02T03:04:05.000Z",
        metadata={"parameters": {"fc.weight": {"shape": (10, 64), "dtype": "float32"}}},
    )

    # Execute
    parsed = Manifest.from_json(manifest.to_json())

    # Assert
    assert parsed == manifest
    assert parsed.metadata["parameters"]["fc.weight"]["shape"] == [10, 64]


def test_json_is_canonical() -> None:
    a = Manifest("m", 0, None, {"b": _artifact("b"), "a": _artifact("a")}, "t", {"y": 1, "x": 2})
    b = Manifest("m", 0, None, {"a": _artifact("a"), "b": _artifact("b")}, "t", {"x": 2, "y": 1})

    assert a.to_json() == b.to_json()
    assert json.loads(a.to_json())["schema_version"] == 1


def test_manifest_mappings_are_read_only() -> None:
    metadata: dict[str, Any] = {"k": [1]}
    manifest = Manifest("m", 0, None, {"a": _artifact("a")}, "t", metadata)
    metadata["k"].append(2)

    with pytest.raises(TypeError):
        manifest.artifacts["b"] = _artifact("b")  # type: ignore[index]
    assert manifest.metadata["k"] == [1]


def test_a_platform_package_file_may_sit_one_folder_down() -> None:
    artifact = Artifact(name="android/checkpoint", sha256=SHA, size=1, media_type="x/y")

    assert artifact.name == "android/checkpoint"


@pytest.mark.parametrize(
    "fields",
    [
        {"sha256": "not-hex"},
        {"sha256": SHA.upper()},
        {"size": -1},
        {"size": True},
        {"name": ""},
        {"name": "a/b/c"},
        {"name": "../w"},
        {"name": "android/"},
        {"name": "/w"},
        {"media_type": ""},
    ],
)
def test_invalid_artifact_is_refused(fields: dict[str, Any]) -> None:
    base: dict[str, Any] = {"name": "w", "sha256": SHA, "size": 1, "media_type": "x/y"}

    with pytest.raises(ManifestError):
        Artifact(**(base | fields))


@pytest.mark.parametrize(
    "fields",
    [
        {"version": -1},
        {"version": True},
        {"parent": 5},
        {"parent": 2},
        {"model_id": "../x"},
        {"metadata": {"x": object()}},
        {"metadata": {"x": float("nan")}},
        {"artifacts": {"other-name": _artifact("w")}},
    ],
)
def test_invalid_manifest_is_refused(fields: dict[str, Any]) -> None:
    base: dict[str, Any] = {"model_id": "m", "version": 2, "parent": 1, "artifacts": {}}

    with pytest.raises(ManifestError):
        Manifest(**(base | fields))


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"schema_version": 1}',
        b'{"schema_version": 99, "model_id": "m"}',
        json.dumps(
            {
                "schema_version": 1,
                "model_id": "m",
                "version": 0,
                "parent": None,
                "created_at": "t",
                "artifacts": {"w": {"sha256": SHA, "size": 1}},
                "metadata": {},
            }
        ).encode(),
    ],
)
def test_malformed_json_raises_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(data)


def test_same_content_ignores_only_created_at() -> None:
    a = Manifest("m", 0, None, {"w": _artifact("w")}, "2026-01-01T00:00:00.000Z", {"k": 1})
    later = Manifest("m", 0, None, {"w": _artifact("w")}, "2026-06-01T00:00:00.000Z", {"k": 1})
    changed = Manifest("m", 0, None, {"w": _artifact("w")}, "2026-01-01T00:00:00.000Z", {"k": 2})

    assert a.same_content(later)
    assert not a.same_content(changed)
