"""Only ``fedmq/settings.py`` reads the environment; every other module gets ``Settings``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "fedmq",
    "aggregator_service",
    "device_sdk",
    "broker",
    "model_store",
    "android_bridge",
    "ios_bridge",
)
READER = "fedmq/settings.py"
ENVIRONMENT_NAMES = frozenset({"environ", "environb", "getenv", "getenvb"})

# Flask's from_prefixed_env reads FEDMQ_* too: no module may call it.
PREFIXED_ENV_READERS: frozenset[str] = frozenset()


def environment_reads(source: str) -> list[int]:
    """Return the lines of ``source`` that read the process environment through ``os``."""
    tree = ast.parse(source)
    aliases = {"os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "os"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(a.name in ENVIRONMENT_NAMES for a in node.names):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in ENVIRONMENT_NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            lines.append(node.lineno)
    return lines


def prefixed_env_reads(source: str) -> list[int]:
    """Return the lines of ``source`` that call Flask's ``from_prefixed_env``."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr == "from_prefixed_env"
    ]


def _modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    "source",
    [
        "import os\nos.environ.get('X')",
        "import os\nos.getenv('X')",
        "import os as system\nsystem.environ['X']",
        "from os import environ\n",
        "from os import getenv as read\n",
        "import os\nvalue = os.environ",
    ],
)
def test_the_check_sees_every_way_to_read_the_environment(source: str) -> None:
    assert environment_reads(source)


def test_the_check_leaves_other_os_use_alone() -> None:
    assert environment_reads("import os\nos.path.join('a', 'b')\nos.PathLike") == []


def test_only_the_settings_module_reads_the_environment() -> None:
    readers = {
        str(path.relative_to(ROOT)): lines
        for path in _modules()
        if (lines := environment_reads(path.read_text()))
    }

    assert set(readers) == {READER}, readers


def test_no_new_module_reads_flasks_prefixed_environment() -> None:
    readers = {
        str(path.relative_to(ROOT)) for path in _modules() if prefixed_env_reads(path.read_text())
    }

    assert readers <= PREFIXED_ENV_READERS
