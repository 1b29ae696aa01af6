"""Only ``broker/`` knows the broker URL schemes; everything else asks it (``broker.connect``).

A composition that tested ``url.startswith("mqtt")`` itself would drift from
the transports the broker package offers (STYLE.md: a transport interface
callers never type-check).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# model_store has URL schemes of its own (file://, s3://, memory:// stores).
PACKAGES = ("fedmq", "aggregator_service", "device_sdk", "android_bridge", "ios_bridge")
BROKER_SCHEMES = frozenset({"mqtt", "mqtts", "amqp", "amqps", "memory"})


def scheme_literals(source: str) -> list[int]:
    """Return the lines of ``source`` holding a broker scheme as a string of its own."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and node.value in BROKER_SCHEMES
    ]


def test_the_scanner_finds_a_scheme_test() -> None:
    # Prepare
    source = 'ok = url.startswith("mqtt")\nfine = "mqtt://host"\nalso = scheme in ("amqp", "x")\n'

    # Execute
    lines = scheme_literals(source)

    # Assert
    assert lines == [1, 3]


def test_no_module_outside_broker_tests_a_broker_scheme() -> None:
    # Prepare
    files = [f for package in PACKAGES for f in sorted((ROOT / package).rglob("*.py"))]

    # Execute
    found = {
        str(f.relative_to(ROOT)): lines
        for f in files
        if (lines := scheme_literals(f.read_text(encoding="utf-8")))
    }

    # Assert
    assert len(files) > 100
    assert found == {}, "ask broker.connect (is_in_process, binds_client_ids, ...) instead"
