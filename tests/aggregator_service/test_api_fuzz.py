"""The API against its own OpenAPI document (schemathesis): no request is ever a 5xx.

Schemathesis generates requests from the document, valid ones and ones that
break it, for every operation, once with the admin token and once with no
token, and sends them through Flask's test client (no network). Every answer
must be documented (status, media type, headers, body schema), every request
the document forbids must be refused with a 4xx, and a guarded operation
without a token must be 401. Workflows then follow the document's links
(create, queue, pause, stop, delete; register, rotate, revoke) with the ids
the answers give. ``test_api_properties.py`` fuzzes below the document (raw
bytes, odd headers, every route in the URL map).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis import checks

from aggregator_service import Database, ExperimentConfig
from aggregator_service.api.app import create_app
from aggregator_service.api.config_contract import EXAMPLE_CONFIG
from aggregator_service.api.openapi import document
from aggregator_service.links import SignedLinks
from broker import MemoryTransport
from model_store import LocalStore
from tests.identities import BUILT_WORKERS, aggregator, round_service

ADMIN = "fuzz-admin-token"
EXAMPLES = 40
"""Generated requests per operation and token (with the workflows, about 30 s on two cores)."""
WORKFLOWS = 40
"""Generated sequences of linked calls (up to 6 each)."""

# /metrics lives at the root, which schemathesis does not take from a path-level server;
# test_api_properties.py and test_metrics.py cover it.
schema = schemathesis.openapi.from_dict(document()).exclude(path="/metrics")

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


@contextmanager
def _service(root: Path) -> Iterator[Flask]:
    """Yield the app of a fresh service (an experiment, a device, a worker) under ``root``."""
    transport, store, db = MemoryTransport(), LocalStore(root / "store"), Database("sqlite://")
    service = round_service(transport, store, db)
    service.start()
    worker = aggregator(transport, store)
    BUILT_WORKERS.remove(worker)  # it serves the whole module, not one test: stopped below
    worker.start()
    # Something to find: lists then name real ids, which the workflows follow.
    service.create_experiment(ExperimentConfig.from_dict(EXAMPLE_CONFIG))
    service.register_device("python")
    links = SignedLinks(b"0123456789abcdef0123456789abcdef", "http://fedmq.test", ttl_s=60)
    # Small models only: a valid but large one is an allocation, not a malformed input.
    config = {"TESTING": True, "ADMIN_TOKEN": ADMIN, "MAX_MODEL_PARAMETERS": 1 << 20}
    try:
        yield create_app(config, service=service, store=store, links=links)
    finally:
        worker.stop()
        transport.close()
        db.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    """Return one service for the module's single calls: what one creates, later ones meet."""
    with _service(tmp_path_factory.mktemp("fuzz")) as app:
        yield app


def _authorize(case: Any, token: str | None) -> None:
    """Send ``token`` (or none): whatever credentials schemathesis drew are replaced."""
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    if token is not None:
        case.headers["Authorization"] = f"Bearer {token}"


@pytest.fixture(params=["admin", "no token"])
def token(request: pytest.FixtureRequest) -> str | None:
    return ADMIN if request.param == "admin" else None


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_is_a_5xx_and_every_answer_is_documented(
    case: Any, app: Flask, token: str | None
) -> None:
    _authorize(case, token)

    response = case.call_and_validate(app=app, base_url="/api/v1", checks=CHECKS)

    guarded = bool(case.operation.definition.raw.get("security"))
    documented_method = case.method.lower() == case.operation.method.lower()
    if token is None and guarded and documented_method:
        assert response.status_code == 401, (case.method, case.formatted_path)


def test_workflows_along_the_documents_links_are_never_a_5xx(tmp_path: Path) -> None:
    scenarios = itertools.count()

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        """Create, queue, pause, stop, delete; register, rotate, revoke: ids from the answers."""

        # Each scenario gets a fresh service: Hypothesis replays scenarios, and one
        # that met another's leftovers would draw differently the second time.
        def setup(self) -> None:
            self.service = _service(tmp_path / str(next(scenarios)))
            self.app = self.service.__enter__()

        def teardown(self) -> None:
            self.service.__exit__(None, None, None)

        def before_call(self, case: Any) -> None:
            _authorize(case, ADMIN)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"app": self.app, "base_url": "/api/v1"}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    Workflow.run(
        settings=settings(
            max_examples=WORKFLOWS,
            stateful_step_count=6,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
    )


# Found while fuzzing by hand: such a model reached torch, whose allocation failed
# inside the view (a 500), or worse, succeeded. It is refused before anything is built.
@pytest.mark.parametrize(
    "model",
    [
        {"num_classes": 10**12},
        {"hidden": [10**7, 10**7]},
        {"num_classes": 2**62},
        {"hidden": [2**14]},
    ],
    ids=["classes", "hidden", "overflow", "above-the-limit"],
)
def test_a_model_too_large_to_build_is_a_400_naming_the_limit(
    app: Flask, model: dict[str, Any]
) -> None:
    config = {**EXAMPLE_CONFIG, "model": {**EXAMPLE_CONFIG["model"], **model}}

    response = app.test_client().post(
        "/api/v1/experiments", json=config, headers={"Authorization": f"Bearer {ADMIN}"}
    )

    assert response.status_code == 400, response.json
    assert "MAX_MODEL_PARAMETERS" in response.json["error"]["problems"][0]
