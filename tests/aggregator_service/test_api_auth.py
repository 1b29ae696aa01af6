"""Who may call what: admin and viewer tokens, open endpoints, the dashboard, OpenAPI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from aggregator_service.api.app import create_app
from fedmq.settings import load_settings

ADMIN = "auth-admin-token"
VIEWER = "auth-viewer-token"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _app(stack: Any, **config: Any) -> Flask:
    return create_app({"TESTING": True, **config}, service=stack.service)


@pytest.fixture
def app(stack: Any) -> Flask:
    return _app(stack, ADMIN_TOKEN=ADMIN, VIEWER_TOKEN=VIEWER)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as client:
        yield client


@pytest.fixture
def experiment_id(stack: Any, small_config: Any) -> str:
    return str(stack.service.create_experiment(small_config()))


def _reads(experiment_id: str) -> list[str]:
    base = f"/api/v1/experiments/{experiment_id}"
    return ["/api/v1/experiments", base, f"{base}/rounds", f"{base}/model", "/api/v1/devices"]


def _assert_401(response: Any) -> None:
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        _bearer("wrong"),
        _bearer(""),
        _bearer(VIEWER + "x"),
        _bearer(VIEWER[:-1]),
        {"Authorization": VIEWER},
        {"Authorization": f"Basic {VIEWER}"},
        {"Authorization": f"Token {ADMIN}"},
    ],
)
def test_guarded_reads_refuse_a_missing_or_wrong_token(
    client: FlaskClient, experiment_id: str, headers: dict[str, str]
) -> None:
    for path in _reads(experiment_id):
        _assert_401(client.get(path, headers=headers))


@pytest.mark.parametrize("token", [VIEWER, ADMIN])
def test_guarded_reads_take_the_viewer_or_the_admin_token(
    client: FlaskClient, experiment_id: str, token: str
) -> None:
    for path in _reads(experiment_id):
        assert client.get(path, headers=_bearer(token)).status_code == 200, path


def test_the_bearer_scheme_is_case_insensitive(client: FlaskClient, experiment_id: str) -> None:
    response = client.get("/api/v1/experiments", headers={"Authorization": f"bearer {VIEWER}"})

    assert response.status_code == 200


def test_the_viewer_token_changes_nothing(client: FlaskClient, experiment_id: str) -> None:
    viewer = _bearer(VIEWER)

    _assert_401(client.post("/api/v1/experiments", json={}, headers=viewer))
    _assert_401(
        client.post(
            f"/api/v1/experiments/{experiment_id}/rounds", json={"count": 1}, headers=viewer
        )
    )
    _assert_401(client.post("/api/v1/devices", json={"platform": "ios"}, headers=viewer))


def test_an_unknown_experiment_is_401_before_404(client: FlaskClient) -> None:
    # Without a token, the API does not even tell which experiments exist.
    _assert_401(client.get("/api/v1/experiments/nope"))
    assert client.get("/api/v1/experiments/nope", headers=_bearer(VIEWER)).status_code == 404


def test_liveness_and_the_openapi_document_stay_open(client: FlaskClient) -> None:
    assert client.get("/api/v1/health").status_code == 200
    assert client.get("/api/v1/openapi.json").status_code == 200


def test_without_a_viewer_token_only_the_admin_token_reads(stack: Any, experiment_id: str) -> None:
    with _app(stack, ADMIN_TOKEN=ADMIN).test_client() as client:
        _assert_401(client.get("/api/v1/experiments", headers=_bearer("")))
        _assert_401(client.get("/api/v1/experiments", headers=_bearer("None")))
        assert client.get("/api/v1/experiments", headers=_bearer(ADMIN)).status_code == 200


def test_without_any_token_configured_every_guarded_call_is_refused(
    stack: Any, experiment_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDMQ_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("FEDMQ_VIEWER_TOKEN", raising=False)

    with _app(stack).test_client() as client:
        for path in _reads(experiment_id):
            _assert_401(client.get(path, headers=_bearer("")))
        _assert_401(client.post("/api/v1/devices", json={"platform": "ios"}))


def test_the_viewer_token_comes_from_the_settings_not_from_the_app(
    stack: Any, experiment_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app reads nothing from the environment itself: the entry point's
    # settings carry the variable in.
    monkeypatch.setenv("FEDMQ_VIEWER_TOKEN", "from-the-env")
    settings = load_settings({})

    with _app(stack, ADMIN_TOKEN=ADMIN).test_client() as client:
        ignored = client.get("/api/v1/experiments", headers=_bearer("from-the-env"))
    with _app(stack, ADMIN_TOKEN=ADMIN, VIEWER_TOKEN=settings.viewer_token).test_client() as client:
        response = client.get("/api/v1/experiments", headers=_bearer("from-the-env"))

    assert ignored.status_code == 401
    assert response.status_code == 200


def test_the_dashboard_is_open_but_embeds_no_data(client: FlaskClient, experiment_id: str) -> None:
    response = client.get("/")
    script = client.get("/static/api.js")

    assert response.status_code == 200 and response.mimetype == "text/html"
    assert experiment_id.encode() not in response.data
    assert b'<script type="module" src="static/dashboard.js">' in response.data
    assert b"api/v1" in script.data and b"sessionStorage" in script.data
    policy = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe" not in policy


def test_openapi_names_the_tokens_each_operation_needs(client: FlaskClient) -> None:
    spec = client.get("/api/v1/openapi.json").json
    paths = spec["paths"]

    def security(path: str, method: str) -> list[Any] | None:
        result: list[Any] | None = paths[path][method].get("security")
        return result

    assert set(spec["components"]["securitySchemes"]) == {"admin", "viewer", "enrollment"}
    for path, method in [
        ("/experiments", "post"),
        ("/experiments/{experiment_id}/rounds", "post"),
    ]:
        assert security(path, method) == [{"admin": []}]
    assert security("/devices", "post") == [{"enrollment": []}, {"admin": []}]
    for path in [
        "/experiments",
        "/experiments/{experiment_id}",
        "/experiments/{experiment_id}/rounds",
        "/experiments/{experiment_id}/model",
        "/devices",
    ]:
        assert security(path, "get") == [{"viewer": []}, {"admin": []}]
        assert "401" in paths[path]["get"]["responses"]
    for path in ["/health", "/openapi.json"]:
        assert security(path, "get") is None
