"""open_store: URL schemes to backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store import STORE_ALIASES, LocalStore, MemoryStore, StoreError, open_store


def test_file_url_opens_a_local_store(tmp_path: Path) -> None:
    store = open_store((tmp_path / "my store").as_uri())

    assert isinstance(store, LocalStore)
    assert store.root == tmp_path / "my store"
    assert (tmp_path / "my store").is_dir()


def test_file_url_with_localhost(tmp_path: Path) -> None:
    store = open_store(f"file://localhost{tmp_path}")

    assert isinstance(store, LocalStore)
    assert store.root == tmp_path


def test_memory_url_opens_a_fresh_memory_store() -> None:
    first = open_store("memory://")
    second = open_store("memory://")

    sha = first.put_blob(b"only in first")

    assert isinstance(first, MemoryStore)
    assert isinstance(second, MemoryStore)
    assert first.has_blob(sha) and not second.has_blob(sha)


@pytest.mark.parametrize("url", ["ftp://host/models", "models", "", "gs://bucket/x"])
def test_unknown_scheme_lists_accepted_ones(url: str) -> None:
    with pytest.raises(StoreError) as caught:
        open_store(url)

    for scheme in STORE_ALIASES:
        assert f"{scheme}://" in str(caught.value)


@pytest.mark.parametrize("url", ["file://otherhost/data", "file:relative/dir", "file:///x?y=1"])
def test_malformed_file_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreError):
        open_store(url)
