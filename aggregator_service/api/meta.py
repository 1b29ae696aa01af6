"""Liveness, the OpenAPI document, and the dashboard page.

The dashboard is a static page that embeds no data: the browser asks for a
viewer (or admin) token, keeps it in the tab's ``sessionStorage``, and reads
the guarded API with it. So the page is served openly, the token never
travels in a URL or a cookie, and the API's own checks are the only gate.
"""

from __future__ import annotations

import base64
import hashlib

from flask import Blueprint, Response, jsonify

from aggregator_service.api.openapi import OPENAPI

bp = Blueprint("meta", __name__)


@bp.get("/api/v1/health")
def health() -> Response:
    """Report that the service is up."""
    return jsonify({"status": "ok"})


@bp.get("/api/v1/openapi.json")
def openapi() -> Response:
    """Return the API's OpenAPI 3 document."""
    return jsonify(OPENAPI)


# Rows are built with textContent only: names from configs never become markup.
_SCRIPT = """
"use strict";
const KEY = "fedmq-token";
const COLUMNS = ["round", "state", "selected", "reported", "accepted",
                 "loss", "accuracy", "seconds"];
function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = String(text);
  return el;
}
function row(tag, values) {
  const tr = document.createElement("tr");
  values.forEach(v => tr.append(cell(tag, v)));
  return tr;
}
async function get(path) {
  const headers = {Authorization: "Bearer " + sessionStorage.getItem(KEY)};
  const response = await fetch("api/v1" + path, {headers});
  const body = await response.json();
  if (!response.ok) throw new Error(body.error.message);
  return body;
}
function table(rounds) {
  const t = document.createElement("table");
  t.append(row("th", COLUMNS));
  for (const r of rounds) {
    t.append(row("td", [r.round, r.state, r.selected, r.reported, r.accepted,
      (r.metrics.loss || 0).toFixed(4), (r.metrics.accuracy || 0).toFixed(4),
      (r.duration_s || 0).toFixed(2)]));
  }
  return t;
}
async function refresh() {
  const status = document.getElementById("status");
  if (!sessionStorage.getItem(KEY)) {
    status.textContent = "Enter a viewer or admin token.";
    return;
  }
  try {
    const blocks = [];
    for (const exp of (await get("/experiments")).experiments) {
      const {rounds} = await get("/experiments/" + encodeURIComponent(exp.id) + "/rounds");
      const title = cell("h2", exp.name + " ");
      const dot = " \\u00b7 ";
      title.append(cell("small", exp.id + dot + exp.state + dot + "v" + exp.model_version));
      blocks.push(title, table(rounds));
    }
    if (!blocks.length) blocks.push(cell("p", "No experiments yet."));
    document.getElementById("experiments").replaceChildren(...blocks);
    status.textContent = "";
  } catch (error) {
    status.textContent = error.message;
  }
}
document.getElementById("login").addEventListener("submit", event => {
  event.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById("token").value);
  refresh();
});
refresh();
setInterval(refresh, 5000);
"""

_DASHBOARD = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>FedMQ</title>
<style>body{{font:14px system-ui;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}</style>
</head><body><h1>FedMQ</h1>
<form id="login"><label>Token <input id="token" type="password" autocomplete="off"></label>
<button>Show</button></form>
<p id="status"></p><div id="experiments"></div>
<script>{_SCRIPT}</script>
</body></html>"""

# Only this exact script may run, and the page talks to no origin but ours.
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
_CSP = (
    f"default-src 'none'; script-src 'sha256-{_SCRIPT_HASH}'; style-src 'unsafe-inline'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


@bp.get("/")
def dashboard() -> Response:
    """Serve the self-refreshing dashboard page (it reads the API with the user's token)."""
    response = Response(_DASHBOARD, mimetype="text/html")
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["Cache-Control"] = "no-store"
    return response
