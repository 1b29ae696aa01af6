"""The deployment files are valid: docker-compose.yml parses, the Mosquitto config is safe."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.brokers import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]


def test_docker_compose_file_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        skip_or_fail("docker-compose is not installed (make test installs it with apt)")
        return

    result = subprocess.run(
        [binary, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr


def test_compose_runs_every_component_with_health_checks() -> None:
    import yaml  # docker-compose's own dependency; only needed here

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]

    assert {"rabbitmq", "mosquitto", "minio", "postgres", "service", "worker", "fleet"} <= set(
        services
    )
    # Every long-running component has a health check; a one-shot job runs to completion.
    jobs = {name for name, spec in services.items() if spec.get("restart") == "no"}
    assert jobs == {"minio-init"}
    assert all("healthcheck" in spec for name, spec in services.items() if name not in jobs)
    # Artifacts live in MinIO, whose bucket exists before the service starts.
    assert compose["x-fedmq-env"]["FEDMQ_STORE_URL"].startswith("s3://")
    depends = services["service"]["depends_on"]["minio-init"]
    assert depends == {"condition": "service_completed_successfully"}
    mounted = services["mosquitto"]["volumes"][0].split(":")[0]
    assert (ROOT / mounted).is_file()


def test_shipped_mosquitto_config_does_not_drop_queued_messages_at_1000() -> None:
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    settings = dict(
        line.split(None, 1)
        for line in conf.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and " " in line.strip()
    )

    assert int(settings["max_queued_messages"]) > 1000
