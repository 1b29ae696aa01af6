"""The dashboard's files: each one the page loads is served, under a CSP that runs nothing else."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient

from aggregator_service.api.app import create_app
from aggregator_service.api.dashboard import CSP, FILES, STATIC


@pytest.fixture
def client(stack: object) -> Iterator[FlaskClient]:
    app = create_app({"TESTING": True, "ADMIN_TOKEN": "x"}, service=stack.service)  # type: ignore[attr-defined]
    with app.test_client() as client:
        yield client


def _referenced() -> set[str]:
    """Return every file the page and its modules load."""
    page = (STATIC / "index.html").read_text()
    names = set(re.findall(r'(?:src|href)="static/([^"]+)"', page))
    for name in [n for n in FILES if n.endswith(".js")]:
        names |= set(re.findall(r'from "\./([^"]+)"', (STATIC / name).read_text()))
    return names


def test_every_file_the_page_loads_is_served_with_the_policy(client: FlaskClient) -> None:
    assert _referenced() <= set(FILES)
    for name, mimetype in FILES.items():
        response = client.get(f"/static/{name}")
        assert response.status_code == 200, name
        assert response.mimetype == mimetype
        assert response.headers["Content-Security-Policy"] == CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    page = client.get("/")
    assert page.headers["Content-Security-Policy"] == CSP


@pytest.mark.parametrize(
    "name", ["index.html", "..%2Fdashboard.py", "nope.js", "%2e%2e", "dashboard.js.map"]
)
def test_no_other_file_is_served(client: FlaskClient, name: str) -> None:
    response = client.get(f"/static/{name}")

    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"


def test_the_page_has_no_inline_script_style_or_handler() -> None:
    page = (STATIC / "index.html").read_text()

    assert re.findall(r"<script(?![^>]*\bsrc=)", page) == []
    assert re.findall(r"<style|\sstyle=|\son[a-z]+=", page) == []
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere


def test_the_scripts_build_markup_from_text_only() -> None:
    for name in [n for n in FILES if n.endswith(".js")]:
        source = (STATIC / name).read_text()
        assert "innerHTML" not in source and "insertAdjacentHTML" not in source, name
        assert "eval(" not in source and "new Function" not in source, name
