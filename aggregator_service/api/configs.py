"""Example experiment configs, read-only: what the dashboard offers to start from.

The folder is ``CONFIGS_DIR`` (``FEDMQ_CONFIGS_DIR``), by default the
examples that ship beside the packages (``experiments/configs``). Only the
``.json`` and ``.toml`` files directly in it are served, by name, parsed and
checked like a POSTed config, so the dashboard never handles TOML.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, current_app, jsonify

from aggregator_service.api.errors import path_id, viewer_required
from aggregator_service.config import load_config
from aggregator_service.errors import NotFound

bp = Blueprint("configs", __name__, url_prefix="/api/v1/configs")

SUFFIXES = (".json", ".toml")
"""The config formats ``load_config`` reads."""
MAX_BYTES = 1 << 20
"""A larger file in the folder is not a config; it is left out."""

# aggregator_service/api/configs.py -> the folder that holds the packages.
_SHIPPED = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def _folder() -> Path:
    return Path(current_app.config.get("CONFIGS_DIR") or _SHIPPED)


def _examples() -> dict[str, Path]:
    """Return the example files by name (the file name without its suffix)."""
    folder = _folder()
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix in SUFFIXES and path.is_file() and path.stat().st_size <= MAX_BYTES:
            found.setdefault(path.stem, path)
    return found


@bp.get("")
@viewer_required
def list_all() -> Response:
    """List the example configs' names and files."""
    return jsonify(
        {"configs": [{"name": name, "file": path.name} for name, path in _examples().items()]}
    )


@bp.get("/<name>")
@viewer_required
def show(name: str) -> Response:
    """Return one example config as JSON (400 with every problem if it cannot run)."""
    path = _examples().get(path_id(name, "config"))
    if path is None:
        raise NotFound(f"no example config {name!r}")
    return jsonify({"name": name, "file": path.name, "config": load_config(path).to_dict()})
