"""LocalStore specifics: on-disk layout, corruption, atomic writes, reopening."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from model_store import IntegrityError, LocalStore, StoreError


def test_layout_on_disk(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path)

    # Execute
    manifest = store.publish("digits", 3, {"w": (b"weights", "x/y")}, parent=None)

    # Assert
    sha = manifest.artifacts["w"].sha256
    assert (tmp_path / "blobs" / sha[:2] / sha).read_bytes() == b"weights"
    doc = json.loads((tmp_path / "models" / "digits" / "00000003.json").read_bytes())
    assert doc["artifacts"]["w"]["sha256"] == sha


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    store.publish("digits", 0, {"w": (b"weights", "x/y")}, parent=None)
    store.put_blob(b"weights")

    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_corrupted_blob_raises_integrity_error(tmp_path: Path) -> None:
    # Prepare
    store = LocalStore(tmp_path)
    sha = store.put_blob(b"original weights")
    (tmp_path / "blobs" / sha[:2] / sha).write_bytes(b"tampered weights")

    # Execute / Assert
    with pytest.raises(IntegrityError, match=sha):
        store.get_blob(sha)


def test_put_blob_repairs_a_truncated_blob(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    sha = store.put_blob(b"0123456789")
    (tmp_path / "blobs" / sha[:2] / sha).write_bytes(b"01234")

    store.put_blob(b"0123456789")

    assert store.get_blob(sha) == b"0123456789"


def test_blob_url_is_a_fetchable_file_uri(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    sha = store.put_blob(b"fetch me")

    url = store.blob_url(sha)

    assert url.startswith("file:///")
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"fetch me"


def test_a_new_instance_sees_what_an_earlier_one_wrote(tmp_path: Path) -> None:
    first = LocalStore(tmp_path)
    published = first.publish("digits", 0, {"w": (b"w", "x/y")}, parent=None)

    reopened = LocalStore(tmp_path)

    assert reopened.latest_version("digits") == 0
    assert reopened.get_manifest("digits", 0) == published


def test_manifest_filed_under_the_wrong_version_is_rejected(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.publish("digits", 0, {"w": (b"w", "x/y")}, parent=None)
    folder = tmp_path / "models" / "digits"
    (folder / "00000001.json").write_bytes((folder / "00000000.json").read_bytes())

    with pytest.raises(StoreError, match="describes"):
        store.get_manifest("digits", 1)


def test_blob_files_are_readable_by_other_users(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    sha = store.put_blob(b"shared")

    assert (tmp_path / "blobs" / sha[:2] / sha).stat().st_mode & 0o044 == 0o044


def test_sha_of_blob_file_name_matches_content(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for i in range(5):
        store.put_blob(f"blob {i}".encode())

    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]

    assert len(files) == 5
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == p.name for p in files)
