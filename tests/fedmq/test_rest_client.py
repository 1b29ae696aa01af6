"""The commands' REST client: every failure in one line, ids escaped, refused keys removed."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from aggregator_service import ServiceError
from fedmq.cli import main
from fedmq.rest import RestClient, api_path


@dataclass
class FakeService:
    """An HTTP server answering every request with one status and body; it records the paths."""

    url: str = ""
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    paths: list[str] = field(default_factory=list)


@pytest.fixture
def service() -> Iterator[FakeService]:
    fake = FakeService()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            fake.paths.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(fake.status)
            self.send_header("Content-Type", fake.content_type)
            self.send_header("Content-Length", str(len(fake.body)))
            self.end_headers()
            self.wfile.write(fake.body)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMQ_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDMQ_ADMIN_TOKEN", "admin")


@pytest.mark.parametrize("server", ["nothttp", "http://[::1", "127.0.0.1:8080", "http://h:99999"])
def test_a_server_that_is_no_http_url_is_one_line(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main(["ls", "--server", server])

    # Assert
    err = capsys.readouterr().err.splitlines()
    assert (code, len(err)) == (1, 1), err
    assert err[0] == (
        "fedmq: --server ($FEDMQ_SERVER_URL) must be an http(s) URL such as "
        f"http://127.0.0.1:8080, got {server!r}"
    )


@pytest.mark.parametrize(
    "body", [b"<html>proxy login</html>", b"[1, 2]", b"[" * 100_000], ids=["html", "list", "deep"]
)
def test_an_answer_that_is_not_a_json_object_is_one_line(service: FakeService, body: bytes) -> None:
    # Prepare
    service.body = body

    # Execute / Assert
    with pytest.raises(ServiceError, match=r"/api/v1/experiments did not answer with FedMQ's JSON"):
        RestClient(service.url).json("GET", "/api/v1/experiments")


def test_a_device_list_that_is_not_fedmqs_is_one_line(
    service: FakeService, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    service.body = b'{"devices": [1, 2]}'

    # Execute
    code = main(["devices", "list", "--server", service.url])

    # Assert
    err = capsys.readouterr().err.splitlines()
    assert (code, len(err)) == (1, 1), err
    assert "did not answer with FedMQ's JSON" in err[0]


def test_experiment_ids_are_escaped_as_one_path_segment(
    service: FakeService, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: an answer status can print
    service.body = (
        b'{"id": "x?y", "name": "n", "config": {"strategy": {"name": "fedavg"}}, "state": "done",'
        b' "current_round": 0, "rounds_requested": 0, "model_version": 0, "rounds": []}'
    )

    # Execute
    main(["status", "x?y/z", "--server", service.url])

    # Assert
    assert service.paths == [
        "/api/v1/experiments/x%3Fy%2Fz",
        "/api/v1/experiments/x%3Fy%2Fz/rounds",
    ]
    assert api_path("a b", "c") == "/a%20b/c"


@pytest.mark.parametrize(
    ("status", "argv"),
    [
        (400, ["enroll", "--device-id", "bad/id"]),
        (401, ["enroll"]),
        (409, ["enroll", "--device-id", "taken"]),
        (404, ["rotate", "nosuch"]),
    ],
)
def test_a_key_file_made_for_a_refused_request_is_removed(
    service: FakeService, status: int, argv: list[str], tmp_path: Path
) -> None:
    # Prepare
    service.status, service.body = status, b'{"error": {"message": "no"}}'
    key = tmp_path / "k.key"

    # Execute
    code = main(["devices", *argv, "--key-file", str(key), "--server", service.url])

    # Assert: a retry with the same file is not told that it exists
    assert code == 1
    assert not key.exists()


def test_a_key_file_is_kept_when_the_service_takes_it(service: FakeService, tmp_path: Path) -> None:
    # Prepare
    service.body = b'{"device_id": "d1"}'
    key = tmp_path / "k.key"

    # Execute
    code = main(["devices", "enroll", "--key-file", str(key), "--server", service.url])

    # Assert
    assert code == 0 and key.exists()


def test_model_pull_into_a_folder_is_one_line_before_the_download(
    service: FakeService, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main(["model", "pull", "e1", "--out", str(tmp_path), "--server", service.url])

    # Assert
    err = capsys.readouterr().err.splitlines()
    assert (code, err) == (2, [f"fedmq: --out {tmp_path} is a folder; name the file to write"])
    assert service.paths == []
