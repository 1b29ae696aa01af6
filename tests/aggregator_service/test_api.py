"""The REST API through Flask's test client, errors included."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flask.testing import FlaskClient
from safetensors.numpy import load

from aggregator_service.api.app import create_app
from device_sdk.emulator import Fleet
from tests.identities import enroll_in

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VIEWER = {"Authorization": "Bearer test-viewer-token"}


@pytest.fixture
def client(stack: Any) -> Iterator[FlaskClient]:
    app = create_app(
        {"TESTING": True, "ADMIN_TOKEN": TOKEN, "VIEWER_TOKEN": "test-viewer-token"},
        service=stack.service,
    )
    with app.test_client() as client:
        yield client


@pytest.fixture
def config(small_config: Any) -> dict[str, Any]:
    return copy.deepcopy(small_config().to_dict())


def _create(client: FlaskClient, config: dict[str, Any]) -> str:
    response = client.post("/api/v1/experiments", json=config, headers=AUTH)
    assert response.status_code == 201, response.json
    return str(response.json["id"])  # type: ignore[index]


def _error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status
    assert response.json["error"]["code"] == code
    return str(response.json["error"]["message"])


def test_health_and_openapi(client: FlaskClient) -> None:
    assert client.get("/api/v1/health").json == {"status": "ok"}
    spec = client.get("/api/v1/openapi.json").json
    assert spec["openapi"].startswith("3.")
    assert "/experiments/{experiment_id}/rounds" in spec["paths"]


def test_create_show_and_list_experiments(client: FlaskClient, config: dict[str, Any]) -> None:
    experiment_id = _create(client, config)

    shown = client.get(f"/api/v1/experiments/{experiment_id}", headers=VIEWER).json
    listed = client.get("/api/v1/experiments", headers=VIEWER).json

    assert shown["state"] == "idle" and shown["model_version"] == 0
    assert shown["current_round"] == 0
    assert shown["config"]["model"]["zoo"] == "mlp"
    assert [e["id"] for e in listed["experiments"]] == [experiment_id]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c.pop("model"), "model"),
        (lambda c: c["rounds"].update(count=0), "rounds.count"),
        (lambda c: c["training"].update(lr="fast"), "training.lr"),
        (lambda c: c["strategy"].update(name="nope"), "strategy.name"),
        (lambda c: c.update(surprise=1), "unknown config section"),
        (lambda c: c["model"].update(zoo="resnet9000"), "resnet9000"),
    ],
)
def test_bad_configs_are_400_with_a_reason(
    client: FlaskClient, config: dict[str, Any], mutate: Any, needle: str
) -> None:
    mutate(config)

    response = client.post("/api/v1/experiments", json=config, headers=AUTH)

    assert response.status_code == 400
    assert needle in response.json["error"]["message"]


def test_non_json_body_is_400(client: FlaskClient) -> None:
    response = client.post(
        "/api/v1/experiments", data="nope", headers=AUTH, content_type="text/plain"
    )
    _error(response, 400, "bad_request")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("[1, 2]", 400),
        ('"text"', 400),
        ("null", 400),
        ('{"count": 1', 400),
        ("\xff\xfe{}", 400),
        ('{"count": ' + "9" * 5000 + "}", 400),  # above int()'s 4300-digit limit
        ('{"count": 99999999999999999999}', 400),  # beyond 64 bits
        ('{"count": 1e309}', 400),
        ('{"count": NaN}', 400),
        ('{"count": -Infinity}', 400),
        ("[" * 5000 + "]" * 5000, 400),  # deeper than the parser's recursion limit
        ('{"a":' * 40 + "1" + "}" * 40, 400),  # deeper than MAX_DEPTH
        ('{"count": "' + "x" * 70_000 + '"}', 400),  # a field above 64 KiB
        ('{"x": "' + "x" * (1 << 20) + '"}', 413),  # a body above 1 MiB
    ],
    ids=[
        "array",
        "string",
        "null",
        "truncated",
        "not-utf8",
        "5000-digits",
        "beyond-64-bits",
        "1e309",
        "NaN",
        "-Infinity",
        "5000-brackets",
        "41-levels",
        "70k-string",
        "1MiB-body",
    ],
)
def test_malformed_json_bodies_are_4xx(
    client: FlaskClient, config: dict[str, Any], body: str, status: int
) -> None:
    experiment_id = _create(client, config)

    for path in ("/api/v1/experiments", f"/api/v1/experiments/{experiment_id}/rounds"):
        response = client.post(
            path, data=body.encode("latin-1"), content_type="application/json", headers=AUTH
        )
        assert response.status_code == status, (path, response.json)
        assert set(response.json["error"]) == {"code", "message"}
        if status == 413:  # the code docs/api.md names
            assert response.json["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "experiment_id",
    ["..", "a%00b", "%27%22", "a%0d%0aSet-Cookie:x", "x" * 5000, "%ff", "-", ".hidden"],
)
def test_odd_experiment_ids_are_404(client: FlaskClient, experiment_id: str) -> None:
    for path in ("", "/rounds", "/model"):
        response = client.get(f"/api/v1/experiments/{experiment_id}{path}", headers=VIEWER)
        assert response.status_code == 404, (experiment_id, path)
        assert response.json["error"]["code"] == "not_found"
    response = client.post(
        f"/api/v1/experiments/{experiment_id}/rounds", json={"count": 1}, headers=AUTH
    )
    assert response.status_code == 404


def test_a_rounds_body_takes_only_a_count(client: FlaskClient, config: dict[str, Any]) -> None:
    experiment_id = _create(client, config)

    response = client.post(
        f"/api/v1/experiments/{experiment_id}/rounds", json={"count": 1, "x": 2}, headers=AUTH
    )

    _error(response, 400, "bad_request")


def test_a_negative_seed_is_400(client: FlaskClient, config: dict[str, Any]) -> None:
    config["seed"] = -1

    response = client.post("/api/v1/experiments", json=config, headers=AUTH)

    assert "seed" in _error(response, 400, "invalid_config")


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
def test_state_changing_calls_need_the_admin_token(
    client: FlaskClient, config: dict[str, Any], headers: dict[str, str]
) -> None:
    _error(client.post("/api/v1/experiments", json=config, headers=headers), 401, "unauthorized")
    _error(
        client.post("/api/v1/devices", json={"platform": "ios"}, headers=headers),
        401,
        "unauthorized",
    )


def test_unknown_experiment_is_404_everywhere(client: FlaskClient) -> None:
    for path in ("", "/rounds", "/model"):
        _error(client.get(f"/api/v1/experiments/nope{path}", headers=VIEWER), 404, "not_found")
    _error(
        client.post("/api/v1/experiments/nope/rounds", json={"count": 1}, headers=AUTH),
        404,
        "not_found",
    )
    _error(client.get("/api/v1/no/such/route"), 404, "not_found")


@pytest.mark.parametrize("count", [0, -1, "2", True, 10_001])
def test_bad_round_counts_are_400(client: FlaskClient, config: dict[str, Any], count: Any) -> None:
    experiment_id = _create(client, config)

    response = client.post(
        f"/api/v1/experiments/{experiment_id}/rounds", json={"count": count}, headers=AUTH
    )

    _error(response, 400, "bad_request")


def test_model_download_by_version_and_its_errors(
    client: FlaskClient, config: dict[str, Any]
) -> None:
    experiment_id = _create(client, config)

    response = client.get(f"/api/v1/experiments/{experiment_id}/model", headers=VIEWER)
    weights = load(response.data)

    assert response.status_code == 200
    assert response.headers["X-FedMQ-Model-Version"] == "0"
    assert weights["fc1.weight"].shape == (16, 64)
    model = f"/api/v1/experiments/{experiment_id}/model"
    for version in ("x", "-1", "1.0", "\u00b2", "99999999999999999999", ""):
        _error(
            client.get(model, query_string={"version": version}, headers=VIEWER), 400, "bad_request"
        )
    _error(client.get(f"{model}?version=3", headers=VIEWER), 404, "not_found")


def test_devices_register_with_a_one_time_token_and_are_listed(client: FlaskClient) -> None:
    response = client.post("/api/v1/devices", json={"platform": "android"}, headers=AUTH)

    assert response.status_code == 201
    body = response.json
    assert body["device_id"].startswith("android-") and len(body["token"]) >= 32
    listed = client.get("/api/v1/devices", headers=VIEWER).json["devices"]
    assert [(d["id"], d["platform"], d["rounds_served"]) for d in listed] == [
        (body["device_id"], "android", 0)
    ]
    assert "token" not in listed[0]
    _error(
        client.post("/api/v1/devices", json={"platform": "palm-pilot"}, headers=AUTH),
        400,
        "bad_request",
    )


def test_rounds_requested_through_the_api_run_and_are_reported(
    client: FlaskClient, stack: Any, config: dict[str, Any]
) -> None:
    experiment_id = _create(client, config)
    Fleet(
        lambda _id, _will: stack.transport,
        config["data"],
        seed=config["seed"],
        experiment_id=experiment_id,
        enroll=enroll_in(stack.service),
    ).start()
    stack.transport.join(timeout=30)

    response = client.post(
        f"/api/v1/experiments/{experiment_id}/rounds", json={"count": 2}, headers=AUTH
    )
    stack.transport.join(timeout=60)

    assert response.status_code == 202
    rounds = client.get(f"/api/v1/experiments/{experiment_id}/rounds", headers=VIEWER).json[
        "rounds"
    ]
    # Over-selection (default 1.3): 6 invited for a target of 4; the round closes once
    # 4 are in, and the updates already folded by then count too.
    assert [(r["round"], r["state"], r["selected"]) for r in rounds] == [
        (1, "committed", 6),
        (2, "committed", 6),
    ]
    assert all(4 <= r["accepted"] <= 6 for r in rounds)
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["metrics"]["loss"] > 0 for r in rounds)
    shown = client.get(f"/api/v1/experiments/{experiment_id}", headers=VIEWER).json
    assert shown["model_version"] == 2
    devices = client.get("/api/v1/devices", headers=VIEWER).json["devices"]
    assert sum(d["rounds_served"] for d in devices) == sum(r["accepted"] for r in rounds)
    model = f"/api/v1/experiments/{experiment_id}/model"
    v1 = load(client.get(f"{model}?version=1", headers=VIEWER).data)
    v2 = load(client.get(model, headers=AUTH).data)  # the admin token opens reads too
    assert not np.array_equal(v1["fc1.weight"], v2["fc1.weight"])
    page = client.get("/").data  # served openly: it reads the API in the browser
    assert experiment_id.encode() not in page
