"""The `fedmq` command line: one line per failure, -v anywhere, --version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.cli import _verbose_first, build_parser


def _fedmq(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmq", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "FEDMQ_HOME": str(home)},
    )


def test_an_unreachable_broker_is_one_line_not_the_clients_tracebacks(tmp_path: Path) -> None:
    done = _fedmq("server", "--port", "0", "--broker", "amqp://u:p@127.0.0.1:1/", home=tmp_path)

    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        line for line in done.stderr.splitlines() if line.startswith("fedmq: cannot reach")
    ], done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert "u:***@" in done.stderr  # the password is never printed


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_is_taken_before_or_after_the_command(where: str, tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[2] / "experiments/configs/digits_fedavg.json"
    args = ["validate", str(config)]
    args = ["-v", *args] if where == "before" else [*args, "-v"]

    done = _fedmq(*args, home=tmp_path)

    assert done.returncode == 0, done.stderr
    assert f"{config}: valid." in done.stdout
    assert build_parser().parse_args(_verbose_first(args)).verbose  # not only accepted


def test_version_is_printed(tmp_path: Path) -> None:
    done = _fedmq("--version", home=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("fedmq ")
