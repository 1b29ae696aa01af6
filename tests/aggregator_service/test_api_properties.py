"""Every REST input, generated: never a 5xx, always a JSON error, no state change without a right.

The routes come from the app's own URL map, so a view added later is fuzzed
too; ``GUARDS`` says what each known one needs.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator_service.api.app import create_app
from aggregator_service.links import SignedLinks

ADMIN = "prop-admin-token"
VIEWER = "prop-viewer-token"
SECRET = b"0123456789abcdef0123456789abcdef"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")

GUARDS: dict[str, str] = {
    "experiments.create": "admin",
    "experiments.start_rounds": "admin",
    "experiments.list_all": "viewer",
    "experiments.show": "viewer",
    "experiments.list_rounds": "viewer",
    "experiments.round_devices": "viewer",
    "experiments.pause": "admin",
    "experiments.stop": "admin",
    "experiments.delete": "admin",
    "configs.list_all": "viewer",
    "configs.show": "viewer",
    "models.download": "viewer",
    "devices.list_all": "viewer",
    "devices.register": "admin",
    "devices.rotate": "admin",
    "devices.revoke": "admin",
    "metrics.metrics": "open",
    "readiness.ready": "open",
    "meta.health": "open",
    "meta.openapi": "open",
    "dashboard.page": "open",
    "dashboard.asset": "open",
    "blobs.download": "signed",
    "blobs.upload": "signed",
}
"""What each route needs; a route missing here is fuzzed as 'unknown' (never a 5xx, no change)."""

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- generated inputs ----------------------------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**80)
    | st.integers(max_value=0)
    | st.floats()  # NaN and infinities included: they leave as NaN/Infinity literals
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_HUGE = "9" * 5000
NASTY_TEXT = st.sampled_from(
    [
        _HUGE,
        "-" + _HUGE,
        "1e309",
        "-1e309",
        "NaN",
        "-Infinity",
        "[" * 5000,
        '{"a":' * 3000,
        "[" * 100 + "]" * 100,
        '"' + "x" * 70_000 + '"',
        '{"count": ' + _HUGE + "}",
        '{"count": 1e309}',
        '{"count": NaN}',
        '{"count": -1}',
        '{"count": "2"}',
        '{"platform": "' + "x" * 70_000 + '"}',
        '{"name": "' + "x" * 70_000 + '"}',
        '{"a": ' + '"x",' * 300_000 + '"x"}',  # above the 1 MiB body limit
        '{"a": 1, "a": 2}',
        "null",
        "[]",
        "",
    ]
)
BODIES = (
    st.none()
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    | NASTY_TEXT.map(str.encode)
    | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.binary(max_size=200)
)
CONTENT_TYPES = st.sampled_from(
    [None, "application/json", "application/json; charset=utf-16", "text/plain"]
    + ["application/octet-stream", "application/x-www-form-urlencoded", "multipart/form-data"]
) | st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
_LATIN1 = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
AUTHORIZATION = (
    st.sampled_from(
        [None, f"Bearer {ADMIN}", f"Bearer {VIEWER}", f"bearer {VIEWER}", "Bearer ", ADMIN]
    )
    | _LATIN1
    | _LATIN1.map("Bearer {}".format)
)
SEGMENTS = st.sampled_from(
    ["..", ".", "%2e%2e", "a%00b", "%ff", "%", "x" * 5000, "a.b", "-", "_"]
) | st.text(max_size=30).map(lambda t: quote(t.encode("utf-8", "surrogatepass"), safe=""))
_NUMBERS = st.sampled_from(["-1", "abc", "\u00b2", "99999999999999999999", "1e3", " 1", "0x1", ""])
QUERIES = st.dictionaries(
    st.sampled_from(["version", "expires", "signature", "token"]) | st.text(max_size=8),
    _NUMBERS | st.text(max_size=30) | st.integers().map(str) | st.just(_HUGE),
    max_size=4,
) | st.text(alphabet="abcdefgsinvrxtoke0123456789=&%+;.-_ ", max_size=60)


# -- the app and its state -----------------------------------------------------


@dataclass
class Api:
    app: Flask
    client: FlaskClient
    stack: Any
    links: SignedLinks
    experiment_id: str
    store_root: Path

    def state(self) -> Any:
        """Return everything a call could change: records, rounds and stored files."""
        service = self.stack.service
        experiments = [
            (e.id, e.state, e.rounds_requested, e.model_version, e.current_round, e.config)
            for e in service.experiments()
        ]
        rounds = [[vars(r) for r in service.rounds(e[0])] for e in experiments]
        devices = [vars(d) for d in service.devices()]
        files = sorted(str(p) for p in self.store_root.rglob("*"))
        return experiments, rounds, devices, files


@pytest.fixture
def api(stack: Any, small_config: Any, tmp_path: Path) -> Iterator[Api]:
    links = SignedLinks(SECRET, "http://fedmq.test", ttl_s=60, clock=lambda: 1_000_000.0)
    config = {"TESTING": True, "ADMIN_TOKEN": ADMIN, "VIEWER_TOKEN": VIEWER}
    app = create_app(
        {**config, "MAX_UPLOAD_BYTES": 4096}, service=stack.service, store=stack.store, links=links
    )
    experiment_id = stack.service.create_experiment(small_config())
    with app.test_client() as client:
        yield Api(app, client, stack, links, experiment_id, Path(stack.store.root))


def _routes(app: Flask) -> list[tuple[str, str, str]]:
    """Return (method, rule, endpoint) for every route but the static folder."""
    return sorted(
        (method, rule.rule, rule.endpoint)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
    )


def _assert_json_error(response: Any) -> None:
    assert response.is_json, (response.status_code, response.data[:200])
    error = response.get_json()["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str)


def _send(client: FlaskClient, method: str, path: str, **kwargs: Any) -> Any:
    response = client.open(path, method=method, **kwargs)
    assert response.status_code < 500, (method, path, response.status_code, response.data[:300])
    if response.status_code >= 400:
        _assert_json_error(response)
    return response


def test_every_known_route_is_fuzzed(api: Api) -> None:
    endpoints = {endpoint for _, _, endpoint in _routes(api.app)}

    assert set(GUARDS) == endpoints


# -- the properties ------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_no_request_is_a_5xx_and_none_changes_state_without_a_right(
    api: Api, data: st.DataObject
) -> None:
    routes = _routes(api.app)
    method, rule, _ = data.draw(st.sampled_from(routes), label="route")
    if data.draw(st.integers(0, 9), label="other method") == 0:
        method = data.draw(st.sampled_from(METHODS), label="method")
    endpoint = {(m, r): e for m, r, e in routes}.get((method, rule), "")
    guard = GUARDS.get(endpoint, "unknown")
    segment = data.draw(st.just(api.experiment_id) | SEGMENTS, label="segment")
    path = re.sub(r"<[^>]+>", lambda _: segment, rule)
    query: Any = data.draw(QUERIES, label="query")
    signed = guard == "signed" and data.draw(st.booleans(), label="validly signed")
    if signed:
        parts = urlsplit(
            api.links.upload(segment) if "uploads" in rule else api.links.download(segment)
        )
        path, query = parts.path, {k: v[0] for k, v in parse_qs(parts.query).items()}
    headers = {}
    authorization = data.draw(AUTHORIZATION, label="authorization")
    if authorization is not None:
        headers["Authorization"] = authorization
    content_type = data.draw(CONTENT_TYPES, label="content type")
    body = data.draw(BODIES, label="body")
    before = api.state()

    response = _send(
        api.client,
        method,
        path,
        query_string=query,
        headers=headers,
        data=body,
        content_type=content_type,
    )

    scheme, _, token = (authorization or "").partition(" ")
    bearer = scheme.lower() == "bearer"
    admin = bearer and token.strip() == ADMIN
    viewer = admin or (bearer and token.strip() == VIEWER)
    if (guard == "admin" and not admin) or (guard == "viewer" and not viewer):
        # 3xx: werkzeug's redirect of a doubled slash, to a URL that asks again.
        assert not 200 <= response.status_code < 300, response.data[:200]
    if not admin and not signed:
        assert api.state() == before, (method, path)


def _mutated(config: dict[str, Any], where: list[Any], value: Any) -> dict[str, Any]:
    """Return ``config`` with the value at path ``where`` replaced (or added)."""
    out = copy.deepcopy(config)
    node: Any = out
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    return out


def _paths(value: Any, prefix: list[Any]) -> Iterator[list[Any]]:
    """Yield the path of every node of a JSON value, containers included."""
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, [*prefix, key])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, [*prefix, index])


# Model sizes stay small: a valid but huge model is an allocation, not a malformed input.
_SMALL_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 16) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@FUZZ
@given(data=st.data())
def test_any_config_field_of_any_type_is_a_4xx_or_an_experiment(
    api: Api, small_config: Any, data: st.DataObject
) -> None:
    config = small_config().to_dict()
    where = data.draw(st.sampled_from(list(_paths(config, []))), label="field")
    values = _SMALL_JSON if where[0] == "model" else JSON_VALUES
    in_object = len(where) == 1 or isinstance(where[-1], str)
    if in_object and data.draw(st.booleans(), label="add a sibling"):
        where = [*where[:-1], data.draw(st.text(max_size=8), label="new key")]
    raw = _mutated(config, where, data.draw(values, label="value"))
    auth = {"Authorization": f"Bearer {ADMIN}"}

    created = _send(api.client, "POST", "/api/v1/experiments", json=raw, headers=auth)

    assert created.status_code in (201, 400), created.json
    if created.status_code == 201:
        rounds = f"/api/v1/experiments/{created.json['id']}/rounds"
        _send(api.client, "POST", rounds, json={"count": 1}, headers=auth)
        _send(api.client, "GET", rounds, headers=auth)


@FUZZ
@given(count=JSON_VALUES | NASTY_TEXT, raw=st.booleans())
def test_any_round_count_is_a_4xx_or_queued(api: Api, count: Any, raw: bool) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    # A string is sent either as the whole body or as the count's value.
    text = count if isinstance(count, str) and raw else json.dumps({"count": count})

    response = _send(
        api.client,
        "POST",
        f"/api/v1/experiments/{api.experiment_id}/rounds",
        data=text,
        content_type="application/json",
        headers=auth,
    )

    ok = isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= 10_000
    assert (response.status_code == 202) == ok, (count, response.json)


@FUZZ
@given(version=_NUMBERS | st.text(max_size=24) | st.integers().map(str))
def test_any_model_version_is_a_4xx_or_the_weights(api: Api, version: str) -> None:
    response = _send(
        api.client,
        "GET",
        f"/api/v1/experiments/{api.experiment_id}/model",
        query_string={"version": version},
        headers={"Authorization": f"Bearer {VIEWER}"},
    )

    digits = version.isascii() and version.isdigit() and len(version) <= 18
    assert (response.status_code == 200) == (digits and int(version) == 0), response.json


_NASTY = ["[" * 5000, '{"a":' * 3000, '{"count": ' + _HUGE + "}", '{"x": NaN}', "\xff{"]
_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


@pytest.mark.parametrize("body", _NASTY, ids=["brackets", "objects", "huge-int", "nan", "binary"])
def test_every_route_refuses_nasty_bodies_even_from_the_admin(api: Api, body: str) -> None:
    refused = 0
    for method, rule, _ in _routes(api.app):
        path = re.sub(r"<[^>]+>", api.experiment_id, rule)
        kwargs = {"content_type": "application/json", "headers": _ADMIN}
        response = _send(api.client, method, path, data=body.encode("latin-1"), **kwargs)
        if method in ("POST", "PUT", "PATCH"):  # a route that reads its body refuses this one
            assert 400 <= response.status_code < 500, (method, path, response.status_code)
            refused += 1
    assert refused >= 5


# devices.rotate once read its body with request.get_json(silent=True), which let the
# parser's RecursionError through as a 500; it uses json_body() now.
def test_device_rotation_refuses_deep_nesting(api: Api) -> None:
    body = ("[" * 5000).encode()
    kwargs = {"content_type": "application/json", "headers": _ADMIN}
    registered = api.stack.service.register_device("python")

    response = _send(
        api.client, "POST", f"/api/v1/devices/{registered.device_id}/rotate", data=body, **kwargs
    )

    assert response.status_code == 400, response.json
