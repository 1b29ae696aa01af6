"""Only ``fedmq/settings.py`` reads the environment; every other module gets ``Settings``."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
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


def _scan(check: str) -> dict[str, list[int]]:
    """Return the modules ``check`` finds lines in, scanned by a fresh interpreter.

    CPython 3.11 keeps ``ast.parse``'s recursion count per interpreter, not per
    thread: a traceback printed on another thread of this long test process
    (3.11 parses each line for its carets) can make a concurrent parse fail
    with "AST constructor recursion depth mismatch". A process of its own has
    no such neighbours.
    """
    script = (
        "import json, tests.test_settings_single_reader as t\n"
        f"check = t.{check}\n"
        "found = {str(p.relative_to(t.ROOT)): check(p.read_text()) for p in t._modules()}\n"
        "print(json.dumps({k: v for k, v in found.items() if v}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    scanned: dict[str, list[int]] = json.loads(done.stdout)
    return scanned


def test_only_the_settings_module_reads_the_environment() -> None:
    readers = _scan("environment_reads")

    assert set(readers) == {READER}, readers


def test_no_new_module_reads_flasks_prefixed_environment() -> None:
    readers = set(_scan("prefixed_env_reads"))

    assert readers <= PREFIXED_ENV_READERS
