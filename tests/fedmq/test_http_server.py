"""fedmq.http_server.HttpServer: the production WSGI server the service runs, and how it stops."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time

import pytest
from flask import Flask

from aggregator_service import ServiceError
from fedmq.http_server import HttpServer
from fedmq.wiring import start_http

BIG = 20 << 20  # a model download's size


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

    @app.get("/big")
    def big() -> bytes:
        return b"w" * BIG

    return app


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    # Errors only: waitress warns of a queued task ("Task queue depth is 1") on a busy machine.
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_shutdown_closes_idle_keep_alive_connections_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
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
    assert not [t for t in threading.enumerate() if t.name.startswith(("waitress", "fedmq-http"))]
    assert _errors_logged(caplog) == []
    client.close()


def test_shutdown_lets_a_request_in_flight_finish(caplog: pytest.LogCaptureFixture) -> None:
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

    # Assert: answered, and nothing written to a closed wake-up pipe on the way.
    assert answers == [b"done"]
    assert _errors_logged(caplog) == []
    client.close()


def test_shutdown_lets_a_large_response_in_flight_arrive_whole() -> None:
    # Prepare: a client that has the response's first bytes and reads the rest slowly.
    server = start_http(_app(threading.Event(), threading.Event()), "127.0.0.1", 0)
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    client.request("GET", "/big")
    response = client.getresponse()
    first = response.read(1 << 16)
    stopper = threading.Thread(target=server.shutdown)

    # Execute
    stopper.start()
    time.sleep(0.3)
    rest = response.read()
    stopper.join(10)

    # Assert
    assert len(first) + len(rest) == BIG
    client.close()


def test_a_client_still_sending_its_headers_does_not_hold_the_shutdown() -> None:
    # Prepare: a request line and one header, never the blank line that ends them.
    server = start_http(_app(threading.Event(), threading.Event()), "127.0.0.1", 0)
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"GET /quick HTTP/1.1\r\nHost: fedmq\r\n")
    time.sleep(0.2)

    # Execute
    began = time.monotonic()
    server.shutdown()
    took = time.monotonic() - began

    # Assert
    assert took < 2.0  # not the 5 s grace a request in progress gets
    slow.close()


def test_a_port_in_use_is_refused_in_one_line_and_nothing_serves() -> None:
    # Prepare
    first = start_http(_app(threading.Event(), threading.Event()), "127.0.0.1", 0)

    # Execute / Assert
    with pytest.raises(ServiceError, match=f"cannot listen on 127.0.0.1:{first.port}: .*in use"):
        HttpServer(_app(threading.Event(), threading.Event()), "127.0.0.1", first.port)
    first.shutdown()


def test_a_server_bound_but_never_started_shuts_down() -> None:
    # Prepare
    server = HttpServer(_app(threading.Event(), threading.Event()), "127.0.0.1", 0)

    # Execute: as the server command does when its coordinator fails to start, and again.
    server.shutdown()
    server.shutdown()

    # Assert: the port is free again.
    with socket.create_server(("127.0.0.1", server.port)):
        pass
