"""``LocalStore``: a model store in a local folder, the default backend.

Layout under ``root``::

    blobs/ab/ab12...ef            one file per blob, named by its sha256
    models/<model_id>/00000003.json   one manifest per version

Every file is written to a temporary name in its final folder, flushed and
fsynced, then moved into place, so a crash leaves either the whole file or
none of it (a stray ``.tmp-*`` file at worst).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from model_store.errors import ArtifactNotFound, StoreError
from model_store.manifest import check_sha256
from model_store.store import StoreBase, verified

__all__ = ["LocalStore"]

_MANIFEST_FILE = re.compile(r"(\d{8,})\.json")


class LocalStore(StoreBase):
    """A model store in a folder on this machine."""

    def __init__(self, root: Path | str) -> None:
        """Use (and create if needed) the folder ``root``."""
        self.root = Path(root).absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create store folder {self.root}: {exc}") from exc

    @classmethod
    def from_url(cls, url: str) -> LocalStore:
        """Open ``file:///ABSOLUTE/PATH`` (``file://localhost/...`` too).

        Parameters
        ----------
        url
            The store URL.

        Returns
        -------
        LocalStore
            A store rooted at the URL's path.
        """
        parts = urlsplit(url)
        if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise StoreError(f"not a local file URL (want file:///ABSOLUTE/PATH): {url!r}")
        if parts.query or parts.fragment or not parts.path.startswith("/"):
            raise StoreError(f"want file:///ABSOLUTE/PATH with no query: {url!r}")
        return cls(Path(unquote(parts.path)))

    def __repr__(self) -> str:
        """Show the root folder."""
        return f"LocalStore({str(self.root)!r})"

    # -- blobs ---------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` under its sha256 (idempotent) and return the hex digest.

        Parameters
        ----------
        data
            The bytes to store.

        Returns
        -------
        str
            The lowercase hex sha256 of ``data``.
        """
        sha256 = hashlib.sha256(data).hexdigest()
        self._put_blob_hashed(data, sha256)
        return sha256

    def _put_blob_hashed(self, data: bytes, sha256: str) -> None:
        """Write ``data`` as the blob ``sha256`` (the caller hashed it), unless it is there."""
        path = self._blob_path(sha256)
        try:
            # Same name means same content, so an existing blob of the right
            # size is kept; a truncated one is rewritten.
            if path.is_file() and path.stat().st_size == len(data):
                return
            with _temp_file(path.parent, data) as tmp:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot write blob {sha256}: {exc}") from exc

    def get_blob(self, sha256: str, *, verify: bool = True) -> bytes:
        """Return the blob after checking its checksum.

        Parameters
        ----------
        sha256
            The blob's hex digest.
        verify
            False: skip the checksum (see ``StoreBase.get_blob``).

        Returns
        -------
        bytes
            The blob; ``ArtifactNotFound`` if absent, ``IntegrityError`` if
            the file no longer hashes to ``sha256``.
        """
        path = self._blob_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"no blob {sha256} in {self.root}") from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {sha256}: {exc}") from exc
        return verified(data, sha256, f"blob at {path}") if verify else data

    def has_blob(self, sha256: str) -> bool:
        """Tell whether the blob is stored.

        Parameters
        ----------
        sha256
            The blob's hex digest.

        Returns
        -------
        bool
            True if a file for it exists (its content is checked on read).
        """
        return self._blob_path(sha256).is_file()

    def blob_url(self, sha256: str) -> str:
        """Return the blob's ``file://`` URI.

        Parameters
        ----------
        sha256
            The blob's hex digest.

        Returns
        -------
        str
            A ``file://`` URI; ``ArtifactNotFound`` if the blob is absent.
        """
        path = self._blob_path(sha256)
        if not path.is_file():
            raise ArtifactNotFound(f"no blob {sha256} in {self.root}")
        return path.as_uri()

    def _blob_path(self, sha256: str) -> Path:
        """Return where a blob lives (two-character fan-out keeps folders small)."""
        check_sha256(sha256)
        return self.root / "blobs" / sha256[:2] / sha256

    # -- manifests -------------------------------------------------------------

    def _manifest_path(self, model_id: str, version: int) -> Path:
        """Return where a manifest lives; ids are validated by the base class."""
        return self.root / "models" / model_id / f"{version:08d}.json"

    def _read_manifest(self, model_id: str, version: int) -> bytes | None:
        """Return the manifest document, or None if there is none."""
        try:
            return self._manifest_path(model_id, version).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read manifest {model_id!r} v{version}: {exc}") from exc

    def _create_manifest(self, model_id: str, version: int, data: bytes) -> bytes | None:
        """Create the manifest file unless it exists; return the existing bytes if so."""
        path = self._manifest_path(model_id, version)
        try:
            with _temp_file(path.parent, data) as tmp:
                created = _link_exclusive(tmp, path)
            if not created:
                return path.read_bytes()
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot write manifest {model_id!r} v{version}: {exc}") from exc
        return None

    def _list_versions(self, model_id: str) -> list[int]:
        """Return the versions that have a manifest file."""
        folder = self.root / "models" / model_id
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list versions of {model_id!r}: {exc}") from exc
        return [int(m.group(1)) for n in names if (m := _MANIFEST_FILE.fullmatch(n))]


@contextlib.contextmanager
def _temp_file(folder: Path, data: bytes) -> Iterator[Path]:
    """Write ``data`` durably to a temporary file in ``folder``; remove it on exit.

    The caller moves or links the file into place inside the ``with``; being
    in the same folder makes that a same-filesystem, atomic rename.
    """
    _ensure_dir(folder)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes 0600 files; devices on this machine may run as
        # another user and fetch blobs by file:// URL.
        os.chmod(tmp, 0o644)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _link_exclusive(tmp: Path, path: Path) -> bool:
    """Give ``tmp``'s content the name ``path`` unless it exists; tell if it did.

    ``os.link`` fails when the target exists, which makes create-if-absent
    atomic even between processes, unlike a check followed by a replace.
    """
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:
        # Some filesystems have no hard links; fall back to a check-then-
        # replace, which only races with a concurrent writer of this version.
        if path.exists():
            return False
        os.replace(tmp, path)
    return True


def _ensure_dir(folder: Path) -> None:
    """Create ``folder`` if needed, making the new entry durable in its parent."""
    if folder.is_dir():
        return
    _ensure_dir(folder.parent)
    with contextlib.suppress(FileExistsError):
        folder.mkdir()
    _fsync_dir(folder.parent)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries so a rename into it survives a power loss."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # platforms that cannot open folders (Windows) skip this step
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
