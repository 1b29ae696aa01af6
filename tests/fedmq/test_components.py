"""The in-process and the per-process runs build their components through one set of builders."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

import aggregator_service.rounds
from aggregator_service.links import PresignedLinks, SignedLinks, StoreLinks
from fedmq import components
from fedmq.compose import simulate
from fedmq.processes import FleetOptions, fleet_running, serving, working
from fedmq.rest import RestClient
from fedmq.settings import Settings
from model_store import LocalStore
from tests.s3_server import CREDENTIALS, MotoS3, s3_server


class _Presigning:
    """A store that presigns, as far as ``artifact_links`` can tell."""

    def presign_download(self, sha256: str, ttl_s: float | None = None) -> str:
        return f"https://objects.example/{sha256}"

    def presign_upload(self, name: str, ttl_s: float | None = None) -> str:
        return f"https://objects.example/uploads/{name}"

    def claim_upload(self, name: str, sha256: str) -> bytes:
        return b""


def test_links_follow_the_store_then_whether_devices_reach_a_service(tmp_path: Path) -> None:
    local = LocalStore(tmp_path / "store")
    keyed = Settings(signing_key=b"k" * 16)

    in_process = components.artifact_links(local, keyed, None)
    served = components.artifact_links(local, keyed, "http://10.0.0.5:8080")
    presigned = components.artifact_links(_Presigning(), keyed, None)  # type: ignore[arg-type]

    assert isinstance(in_process, StoreLinks)
    assert isinstance(served, SignedLinks)
    assert served.download("ab" * 32).startswith("http://10.0.0.5:8080/api/v1/blobs/")
    assert isinstance(presigned, PresignedLinks)
    assert presigned.upload("x") == "https://objects.example/uploads/x"


class _Built:
    """Records the keyword arguments each component class was built with, in order."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, Any]]] = {}

    def spy_on(self, monkeypatch: pytest.MonkeyPatch, name: str, module: Any = components) -> None:
        real: Any = getattr(module, name)
        calls = self.calls.setdefault(name, [])

        class Spy(real):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                calls.append(kwargs)
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(module, name, Spy)


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> _Built:
    spy = _Built()
    # The coordinator's class is imported where it is built (see fedmq.components).
    spy.spy_on(monkeypatch, "RoundService", aggregator_service.rounds)
    for name in ("AggregatorWorker", "Fleet"):
        spy.spy_on(monkeypatch, name)
    return spy


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)  # boto3 reads its credentials itself
    with s3_server() as server:
        yield server


def _coordinator_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return what configures a coordinator, leaving out its connections and identity."""
    return {
        "links": type(kwargs["links"]),
        "max_inline_bytes": kwargs["max_inline_bytes"],
        "topics": kwargs["topics"],
        "packagers": sorted(kwargs["packagers"]),
        "evaluates": kwargs["evaluator_factory"] is not None,
    }


def test_simulate_and_the_processes_build_equal_components_from_one_settings(
    tmp_path: Path, small_config: Any, built: _Built, s3: MotoS3
) -> None:
    # Prepare: an S3 store, a namespace and an inline limit both kinds of run must honour
    config = small_config()
    settings = Settings(
        home=tmp_path,
        broker="memory://",
        store=f"s3://{s3.bucket}/{uuid.uuid4().hex[:8]}?endpoint_url={s3.endpoint_url}",
        db=f"sqlite:///{tmp_path / 'fedmq.db'}",
        namespace="same-deployment",
        admin_token="admin",
        max_inline_bytes=1024,
    )

    # Execute: the in-process run, then the per-process components on the same settings
    in_process = simulate(config, settings=settings)
    with serving(settings, host="127.0.0.1", port=0) as port:
        api = dataclasses.replace(settings, server=f"http://127.0.0.1:{port}")
        experiment = RestClient(api.server_url, "admin").json(
            "POST", "/api/v1/experiments", config.to_dict()
        )
        with (
            working(api, name="worker-1"),
            fleet_running(api, FleetOptions(devices=2, experiment_id=str(experiment["id"]))),
        ):
            pass

    # Assert: each kind of component went through the builders once per kind of run
    server_side, simulated = built.calls["RoundService"][1], built.calls["RoundService"][0]
    assert len(built.calls["RoundService"]) == 2
    assert _coordinator_config(simulated) == _coordinator_config(server_side)
    assert _coordinator_config(simulated)["links"] is PresignedLinks
    assert _coordinator_config(simulated)["max_inline_bytes"] == 1024
    worker_sim, worker_process = built.calls["AggregatorWorker"]
    assert worker_sim["topics"] == worker_process["topics"] == settings.topics
    assert worker_sim["checkpoint_every"] == worker_process["checkpoint_every"]
    fleet_sim, fleet_process = built.calls["Fleet"]
    assert fleet_sim["topics"] == fleet_process["topics"] == settings.topics
    assert fleet_sim["seed"] == fleet_process["seed"] == config.seed
    # The in-process devices went through the store as remote ones would, same model.
    assert in_process.fleet["uploads"] > 0
    assert [r.state for r in in_process.rounds] == ["committed"] * 2
    on_folder = simulate(config)
    final, expected = load(in_process.final_weights), load(on_folder.final_weights)
    assert all((final[name] == expected[name]).all() for name in expected)
