"""/ready: the database answers, the broker accepts connections, a worker said it is alive."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from aggregator_service import Database
from aggregator_service.api.app import create_app
from broker import MemoryTransport
from broker.probe import BrokerProbe, addresses
from model_store import LocalStore
from tests.brokers import require
from tests.identities import aggregator, round_service
from tests.ports import free_port
from tests.tcp_proxy import TcpProxy

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _heard_from_a_worker(service: Any, transport: MemoryTransport) -> None:
    """Wait for the worker's first beat (it is sent from a thread of its own)."""
    deadline = time.monotonic() + 10
    while not service.workers_heard():
        assert time.monotonic() < deadline, "no worker beat arrived"
        transport.join(timeout=10)
        time.sleep(0.01)


def _app(service: Any, probe: Any = None) -> Any:
    app = create_app({"TESTING": True, "ADMIN_TOKEN": "t"}, service=service)
    if probe is not None:
        app.extensions["fedmq.broker_probe"] = probe
    return app.test_client()


def test_ready_once_a_worker_has_said_it_is_alive(tmp_path: Path) -> None:
    transport, db = MemoryTransport(), Database("sqlite://")
    store = LocalStore(tmp_path)
    service = round_service(transport, store, db)
    service.start()
    client = _app(service)

    before = client.get("/ready")
    worker = aggregator(transport, store)
    worker.start()
    _heard_from_a_worker(service, transport)
    after = client.get("/api/v1/ready")

    assert before.status_code == 503
    assert before.json["checks"]["workers"] == {
        "ok": False,
        "detail": "none heard from in the last 45 s",
    }
    assert after.status_code == 200 and after.json["ready"] is True
    assert list(service.workers_heard()) == ["worker-under-test"]
    worker.stop()
    transport.close()


def test_not_ready_while_the_broker_is_gone(stack: Any) -> None:
    port = free_port()  # nobody listens on it
    client = _app(stack.service, BrokerProbe(f"mqtt://127.0.0.1:{port}", timeout_s=0.5))
    _heard_from_a_worker(stack.service, stack.transport)

    response = client.get("/ready")

    assert response.status_code == 503
    checks = response.json["checks"]
    assert checks["broker"] == {"ok": False, "detail": "refuses or does not answer"}
    assert checks["database"]["ok"] is True and checks["workers"]["ok"] is True


def test_not_ready_while_the_database_is_unreachable(tmp_path: Path) -> None:
    """PostgreSQL behind a proxy the test closes: the service's database goes away."""
    require(5432, "PostgreSQL")
    proxy = TcpProxy(5432)
    schema = f"fedmq_ready_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    db = Database(
        f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/test"
        f"?options=-csearch_path%3D{schema}&connect_timeout=2"
    )
    transport = MemoryTransport()
    try:
        store = LocalStore(tmp_path)
        service = round_service(transport, store, db)
        service.start()
        worker = aggregator(transport, store)
        worker.start()
        _heard_from_a_worker(service, transport)
        client = _app(service)
        up = client.get("/ready")
        proxy.close()
        proxy.cut()
        down = client.get("/ready")
        worker.stop()
    finally:
        transport.close()
        db.close()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

    assert up.status_code == 200, up.json
    assert down.status_code == 503
    assert down.json["checks"]["database"] == {"ok": False, "detail": "does not answer"}


def test_the_probe_reads_every_node_of_a_cluster_url() -> None:
    assert addresses("memory://") == []
    assert addresses("mqtt://127.0.0.1:1883") == [("127.0.0.1", 1883)]
    assert addresses("amqp://u:p@h1,h2:5673/vhost") == [("h1", 5672), ("h2", 5673)]
    assert addresses("amqps://[::1]/") == [("::1", 5671)]
