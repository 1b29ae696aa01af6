"""The deployment's keys on disk: the service's, each worker's, and an emulated fleet's devices'.

Layout of the key folder (``Settings.key_folder``: ``--keys``, ``$FEDMQ_KEYS``, else
``$FEDMQ_HOME/keys``)::

    service.key            the service's private key (mode 0600; only the server reads it)
    service.pub            its public key: every worker pins it at start
    workers/NAME.key       a worker's private key (only that worker reads it)
    workers/NAME.pub       its public key: the service trusts the outcomes it signs
    devices/ID.key         an emulated fleet's device keys, kept so a restart re-enrolls

On one machine every process shares the folder. Across machines, copy
``service.pub`` to each worker's folder and each ``workers/NAME.pub`` to the
server's; private keys never move. Devices learn the service key when they
register (``POST /api/v1/devices``).
"""

from __future__ import annotations

import os
from pathlib import Path

from broker.errors import IdentityError
from broker.identity import SERVICE_NAME, Identity, decode_public_key, encode_key
from broker.topics import is_valid_segment


class KeyFolder:
    """Reads and creates the deployment's keys under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def service_identity(self) -> Identity:
        """Return the service's identity, creating it (and ``service.pub``) on first start."""
        identity = Identity.load_or_create(SERVICE_NAME, self.root / "service.key")
        _write_public(self.root / "service.pub", identity)
        return identity

    def service_key(self) -> bytes:
        """Return the service's pinned public key, or explain where it should be."""
        path = self.root / "service.pub"
        if not path.exists():
            raise IdentityError(
                f"no service key at {path}: start `fedmq server` with this key folder first, "
                "or copy its service.pub here"
            )
        return decode_public_key(path.read_text().strip())

    def worker_identity(self, name: str) -> Identity:
        """Return worker ``name``'s identity, creating it (and its ``.pub``) on first start."""
        identity = Identity.load_or_create(name, self._named("workers", name, ".key"))
        _write_public(self._named("workers", name, ".pub"), identity)
        return identity

    def worker_keys(self) -> dict[str, bytes]:
        """Return every trusted worker's public key, by name (unreadable files are skipped)."""
        keys: dict[str, bytes] = {}
        folder = self.root / "workers"
        for path in sorted(folder.glob("*.pub")) if folder.is_dir() else []:
            try:
                keys[path.stem] = decode_public_key(path.read_text().strip())
            except (OSError, IdentityError):
                continue
        return keys

    def worker_keys_stamp(self) -> tuple[int, int] | None:
        """Return what changes when a worker key is added or removed (None: no such folder).

        The folder's modification time, and its count of keys: two keys added
        within one tick of a coarse file system clock still change the count.
        """
        folder = self.root / "workers"
        try:
            return folder.stat().st_mtime_ns, sum(1 for _ in folder.glob("*.pub"))
        except OSError:
            return None

    def device_identity(self, device_id: str) -> Identity:
        """Return an emulated device's identity, kept so a restarted fleet keeps its keys."""
        return Identity.load_or_create(device_id, self._named("devices", device_id, ".key"))

    def _named(self, kind: str, name: str, suffix: str) -> Path:
        if not is_valid_segment(name):
            raise IdentityError(f"{name!r} cannot name a key (letters, digits, '_', '-')")
        return self.root / kind / f"{name}{suffix}"


def _write_public(path: Path, identity: Identity) -> None:
    """Write ``identity``'s public key next to its private one (readable by all)."""
    text = encode_key(identity.public_key) + "\n"
    if not path.exists() or path.read_text() != text:
        # Whole or not at all: a service reading the folder must not find it empty
        # (it would skip the key, and the folder would not change again to say so).
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(text)
        os.replace(partial, path)
