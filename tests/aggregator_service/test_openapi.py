"""The OpenAPI document is valid, covers every route, and the views answer as it says."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from werkzeug.test import TestResponse

from aggregator_service.api.app import create_app
from aggregator_service.api.openapi import document
from aggregator_service.links import SignedLinks
from broker import CheckIn, RoundProgress
from device_sdk.emulator import Fleet
from tests.identities import TOPICS, device, enroll_in, sign

ADMIN = {"Authorization": "Bearer doc-admin"}
VIEWER = {"Authorization": "Bearer doc-viewer"}
API = "/api/v1"
NOT_DOCUMENTED = {"/", "/static/<name>", "/ready"}
"""The dashboard's page and files (not the JSON API), and /ready's alias of /api/v1/ready."""


def test_the_document_passes_openapi_spec_validator() -> None:
    spec = document()

    validate(spec)  # raises on the first error

    assert spec["openapi"] == "3.1.0"


def _app(stack: Any) -> Flask:
    links = SignedLinks(b"0123456789abcdef0123456789abcdef", "http://fedmq.test", ttl_s=60)
    config = {"TESTING": True, "ADMIN_TOKEN": "doc-admin", "VIEWER_TOKEN": "doc-viewer"}
    return create_app(config, service=stack.service, store=stack.store, links=links)


def test_every_route_is_documented_and_every_operation_is_a_route(stack: Any) -> None:
    app = _app(stack)
    routes = {
        (method.lower(), re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule))
        for rule in app.url_map.iter_rules()
        if rule.rule not in NOT_DOCUMENTED
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    documented = {
        (method, path if path == "/metrics" else API + path)
        for path, item in document()["paths"].items()
        for method in item
        if method != "servers"
    }

    assert routes == documented


@dataclass
class Documented:
    """Checks answers against the document: a documented status, a body of its schema."""

    spec: dict[str, Any]
    seen: set[tuple[str, str, str]]

    def check(self, response: TestResponse, method: str, path: str) -> Any:
        operation = self.spec["paths"][path][method]
        status = str(response.status_code)
        assert status in operation["responses"], (method, path, status, response.data[:300])
        answer = operation["responses"][status]
        if "$ref" in answer:
            answer = self.spec["components"]["responses"][answer["$ref"].rsplit("/", 1)[1]]
        media = answer.get("content", {})
        if "application/json" in media:
            assert response.is_json, (method, path, response.mimetype)
            schema = {**media["application/json"]["schema"], "components": self.spec["components"]}
            problems = [e.message for e in Draft202012Validator(schema).iter_errors(response.json)]
            assert problems == [], (method, path, status, response.json)
        else:
            assert not media or response.mimetype in media, (method, path, response.mimetype)
        for name, header in answer.get("headers", {}).items():
            assert re.fullmatch(header["schema"].get("pattern", ".*"), response.headers[name])
        self.seen.add((method, path, status))
        return response.json if response.is_json else response.data


@pytest.fixture
def api(stack: Any) -> Iterator[tuple[FlaskClient, Documented]]:
    with _app(stack).test_client() as client:
        yield client, Documented(document(), set())


def test_a_run_answers_as_documented(
    api: tuple[FlaskClient, Documented], stack: Any, small_config: Any
) -> None:
    client, doc = api
    config = small_config().to_dict()
    created = doc.check(
        client.post(f"{API}/experiments", json=config, headers=ADMIN), "post", "/experiments"
    )
    exp, e = f"{API}/experiments/{created['id']}", "/experiments/{experiment_id}"
    Fleet(
        lambda _id, _will: stack.transport,
        config["data"],
        seed=config["seed"],
        experiment_id=created["id"],
        enroll=enroll_in(stack.service),
    ).start()
    stack.transport.join(timeout=30)

    doc.check(client.post(f"{exp}/rounds", json={"count": 2}, headers=ADMIN), "post", f"{e}/rounds")
    stack.transport.join(timeout=60)

    rounds = doc.check(client.get(f"{exp}/rounds", headers=VIEWER), "get", f"{e}/rounds")
    assert [r["state"] for r in rounds["rounds"]] == ["committed", "committed"]
    doc.check(client.get(exp, headers=VIEWER), "get", e)
    doc.check(client.get(f"{API}/experiments", headers=VIEWER), "get", "/experiments")
    doc.check(client.get(f"{exp}/model?version=1", headers=VIEWER), "get", f"{e}/model")
    doc.check(client.post(f"{exp}/pause", headers=ADMIN), "post", f"{e}/pause")
    doc.check(client.post(f"{exp}/stop", headers=ADMIN), "post", f"{e}/stop")
    devices = doc.check(client.get(f"{API}/devices", headers=VIEWER), "get", "/devices")
    assert devices["devices"] and all(d["state"] == "online" for d in devices["devices"])
    for path in ("/health", "/ready", "/openapi.json", "/configs"):
        doc.check(client.get(API + path, headers=VIEWER), "get", path)
    example = client.get(f"{API}/configs/digits_fedavg", headers=VIEWER)
    doc.check(example, "get", "/configs/{name}")
    doc.check(client.get("/metrics"), "get", "/metrics")
    doc.check(client.delete(exp, headers=ADMIN), "delete", e)

    assert {status for _, _, status in doc.seen} == {"200", "201", "202", "204"}


def test_devices_answer_as_documented(api: tuple[FlaskClient, Documented]) -> None:
    client, doc = api
    d = "/devices/{device_id}"

    made = doc.check(
        client.post(f"{API}/devices", json={"platform": "ios"}, headers=ADMIN), "post", "/devices"
    )
    own = {"platform": "python", "device_id": "own", "public_key": device("own").public_key_text}
    doc.check(client.post(f"{API}/devices", json=own, headers=ADMIN), "post", "/devices")
    other = {**own, "public_key": device("other").public_key_text}
    doc.check(client.post(f"{API}/devices", json=other, headers=ADMIN), "post", "/devices")
    rotated = f"{API}/devices/{made['device_id']}/rotate"
    doc.check(client.post(rotated, headers=ADMIN), "post", f"{d}/rotate")
    doc.check(client.delete(f"{API}/devices/{made['device_id']}", headers=ADMIN), "delete", d)
    doc.check(client.post(rotated, headers=ADMIN), "post", f"{d}/rotate")
    doc.check(client.delete(f"{API}/devices/nope", headers=ADMIN), "delete", d)
    doc.check(
        client.post(f"{API}/devices", json={"platform": "x"}, headers=ADMIN), "post", "/devices"
    )

    assert doc.seen == {
        ("post", "/devices", "201"),
        ("post", "/devices", "409"),
        ("post", "/devices", "400"),
        ("post", f"{d}/rotate", "200"),
        ("post", f"{d}/rotate", "409"),
        ("delete", d, "200"),
        ("delete", d, "404"),
    }


def test_waiting_in_flight_and_stopped_answer_as_documented(
    api: tuple[FlaskClient, Documented], stack: Any, small_config: Any
) -> None:
    client, doc = api
    e = "/experiments/{experiment_id}"
    experiment_id = stack.service.create_experiment(small_config())
    exp = f"{API}/experiments/{experiment_id}"

    waiting = doc.check(
        client.post(f"{exp}/rounds", json={"count": 2}, headers=ADMIN), "post", f"{e}/rounds"
    )
    for name in (f"d{i}" for i in range(6)):  # devices that check in and never train
        stack.service.register_device(
            "python", public_key=device(name).public_key_text, device_id=name
        )
        stack.transport.publish(
            TOPICS.checkin(name), sign(CheckIn(device_id=name, platform="python"))
        )
    stack.transport.join(timeout=10)
    progress = RoundProgress(experiment_id=experiment_id, round=1, reported=("d0",), accepted=())
    stack.transport.publish(TOPICS.events(experiment_id), sign(progress))
    stack.transport.join(timeout=10)
    in_flight = doc.check(client.get(f"{exp}/rounds", headers=VIEWER), "get", f"{e}/rounds")
    doc.check(client.delete(exp, headers=ADMIN), "delete", e)
    doc.check(client.post(f"{exp}/stop", headers=ADMIN), "post", f"{e}/stop")
    stopped = doc.check(client.get(f"{exp}/rounds", headers=VIEWER), "get", f"{e}/rounds")

    assert waiting["state"] == "waiting" and waiting["waiting"]["needed"] == 3
    assert in_flight["rounds"][0]["progress"]["phase"] == "training"
    assert stopped["rounds"][0]["reason"] == "stopped by the operator"
    assert ("delete", e, "409") in doc.seen


def test_errors_answer_as_documented(
    api: tuple[FlaskClient, Documented], small_config: Any, tmp_path: Path
) -> None:
    client, doc = api
    e = "/experiments/{experiment_id}"
    bad = {
        **small_config().to_dict(),
        "model": {"zoo": "mlp", "input_shape": [3], "num_classes": 5},
    }

    invalid = doc.check(
        client.post(f"{API}/experiments", json=bad, headers=ADMIN), "post", "/experiments"
    )
    doc.check(client.post(f"{API}/experiments", data="x", headers=ADMIN), "post", "/experiments")
    doc.check(client.get(f"{API}/experiments"), "get", "/experiments")
    doc.check(client.get(f"{API}/experiments/nope", headers=VIEWER), "get", e)
    doc.check(
        client.get(f"{API}/experiments/nope/model?version=x", headers=VIEWER), "get", f"{e}/model"
    )
    huge = b'{"name": "' + b"x" * (1 << 20) + b'"}'
    doc.check(
        client.post(
            f"{API}/experiments", data=huge, content_type="application/json", headers=ADMIN
        ),
        "post",
        "/experiments",
    )
    doc.check(client.get(f"{API}/configs/nope", headers=VIEWER), "get", "/configs/{name}")
    upload = urlsplit(_links(client).upload("n1"))
    doc.check(client.put(f"{upload.path}?{upload.query}", data=b"w"), "put", "/uploads/{nonce}")
    doc.check(client.put(f"{upload.path}?{upload.query}", data=b"w"), "put", "/uploads/{nonce}")
    doc.check(
        client.put(f"{upload.path}?expires=1&signature=" + "0" * 64, data=b"w"),
        "put",
        "/uploads/{nonce}",
    )
    doc.check(client.get(f"{API}/blobs/{'0' * 64}"), "get", "/blobs/{sha256}")

    assert len(invalid["error"]["problems"]) == 2  # the shape and the classes, both at once
    assert {s for _, _, s in doc.seen} == {"201", "400", "401", "403", "404", "409", "413"}


def _links(client: FlaskClient) -> SignedLinks:
    links: SignedLinks = client.application.extensions["fedmq.links"]
    return links
