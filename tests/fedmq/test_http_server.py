"""fedmq.wiring.HttpServer: the production WSGI server the service runs, and how it stops."""

from __future__ import annotations

import http.client
import threading
import time

from flask import Flask

from fedmq.wiring import start_http


def _app(started: threading.Event, release: threading.Event) -> Flask:
    app = Flask("probe")

    @app.get("/quick")
    def quick() -> str:
        return "ok"

    @app.get("/slow")
    def slow() -> str:
        started.set()
        release.wait(10)
        return "done"

    return app


def test_shutdown_closes_idle_keep_alive_connections_at_once() -> None:
    # Prepare: a client that keeps its connection open after a request, as browsers do.
    server = start_http(_app(threading.Event(), threading.Event()), "127.0.0.1", 0)
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    client.request("GET", "/quick")
    assert client.getresponse().read() == b"ok"

    # Execute
    began = time.monotonic()
    server.shutdown()
    took = time.monotonic() - began

    # Assert
    assert took < 2.0  # not the 5 s grace, nor the connection's 120 s idle timeout
    client.close()


def test_shutdown_lets_a_request_in_flight_finish() -> None:
    # Prepare
    started, release = threading.Event(), threading.Event()
    server = start_http(_app(started, release), "127.0.0.1", 0)
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    answers: list[bytes] = []

    def ask() -> None:
        client.request("GET", "/slow")
        answers.append(client.getresponse().read())

    asker = threading.Thread(target=ask)
    asker.start()
    assert started.wait(5)

    # Execute
    threading.Timer(0.5, release.set).start()
    server.shutdown()
    asker.join(5)

    # Assert
    assert answers == [b"done"]
    client.close()
