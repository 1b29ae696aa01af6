"""The dashboard: a static page and its script modules, which read and drive the JSON API.

The page embeds no data: the browser asks for a viewer (or admin) token,
keeps it in the tab's ``sessionStorage``, and calls the guarded API with it.
So the files are served openly, the token never travels in a URL or a
cookie, and the API's own checks are the only gate. There is no build step:
the files in ``static/`` are what the browser runs, and the
Content-Security-Policy lets it run nothing else (no inline script or style,
no other origin).
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

from aggregator_service.errors import NotFound

bp = Blueprint("dashboard", __name__)

STATIC = Path(__file__).with_name("static")
"""Where the page, its stylesheet and its script modules live."""

FILES = {
    "dashboard.css": "text/css",
    "dashboard.js": "text/javascript",
    "api.js": "text/javascript",
    "charts.js": "text/javascript",
    "views.js": "text/javascript",
    "favicon.svg": "image/svg+xml",
}
"""Every file the page may load, by name: nothing else in the folder is served."""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
"""Only our own files run and style the page, and it talks to no origin but ours."""


def _guarded(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/")
def page() -> Response:
    """Serve the dashboard page."""
    return _guarded(send_from_directory(STATIC, "index.html", mimetype="text/html"))


@bp.get("/static/<name>")
def asset(name: str) -> Response:
    """Serve one of the page's files (404 for any other name)."""
    mimetype = FILES.get(name)
    if mimetype is None:
        raise NotFound(f"no dashboard file {name[:64]!r}")
    return _guarded(send_from_directory(STATIC, name, mimetype=mimetype))
