"""TLS on both network transports, against private brokers with certificates made here.

One CA signs the brokers' certificates (SAN 127.0.0.1 and localhost) and a
client certificate; a second CA, which signs nothing the brokers use, stands
for a client configured with the wrong one. Mosquitto gets three TLS
listeners (plain TLS, one requiring a client certificate, one whose
certificate names another host); RabbitMQ one, on a node shared by the module
because it takes seconds to boot.
"""

from __future__ import annotations

import datetime
import getpass
import ipaddress
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import ConnectionLost, Delivery, Transport, TransportError, connect
from broker.connect import tls_from_query
from broker.errors import TlsError
from tests.broker.conftest import wait_until
from tests.brokers import MQTT_PORT, require, skip_or_fail
from tests.e2e.owned_brokers import OwnedMosquitto, OwnedRabbitMQ
from tests.ports import free_port

# -- a PKI made for the module ----------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: the CA, the brokers' and a client's certificate, and a stranger CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    elsewhere_cert: Path
    """Signed by the CA for ``elsewhere.example`` only: the host-name check must refuse it."""
    elsewhere_key: Path
    client_cert: Path
    client_key: Path
    stranger_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(
    subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _make_ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    common_name: str,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(common_name, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = _make_ca("FedMQ test CA")
    loopback: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    server = _issue(ca, "broker", loopback, ExtendedKeyUsageOID.SERVER_AUTH)
    elsewhere = _issue(
        ca, "elsewhere", [x509.DNSName("elsewhere.example")], ExtendedKeyUsageOID.SERVER_AUTH
    )
    client = _issue(ca, "device-1", [], ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger, _ = _make_ca("Some other CA")
    return Pki(
        ca=_write_cert(ca[0], folder / "ca.pem"),
        server_cert=_write_cert(server[0], folder / "server.pem"),
        server_key=_write_key(server[1], folder / "server.key"),
        elsewhere_cert=_write_cert(elsewhere[0], folder / "elsewhere.pem"),
        elsewhere_key=_write_key(elsewhere[1], folder / "elsewhere.key"),
        client_cert=_write_cert(client[0], folder / "client.pem"),
        client_key=_write_key(client[1], folder / "client.key"),
        stranger_ca=_write_cert(stranger, folder / "stranger.pem"),
    )


# -- private brokers with TLS listeners -------------------------------------------------


@dataclass(frozen=True)
class TlsMosquitto:
    """Ports of the private Mosquitto's listeners."""

    tls: int
    client_cert: int
    """Requires a client certificate signed by the CA."""
    elsewhere: int
    """Serves the certificate for another host."""


_MOSQUITTO_TLS_CONF = """\
per_listener_settings false
allow_anonymous true
user {user}
persistence false
log_dest stdout
log_type error
log_type warning
listener {tls} 127.0.0.1
cafile {pki.ca}
certfile {pki.server_cert}
keyfile {pki.server_key}
listener {client_cert} 127.0.0.1
cafile {pki.ca}
certfile {pki.server_cert}
keyfile {pki.server_key}
require_certificate true
listener {elsewhere} 127.0.0.1
cafile {pki.ca}
certfile {pki.elsewhere_cert}
keyfile {pki.elsewhere_key}
"""


@pytest.fixture(scope="module")
def mosquitto(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMosquitto]:
    try:
        broker = OwnedMosquitto(tmp_path_factory.mktemp("mosquitto"))
    except FileNotFoundError as exc:
        skip_or_fail(str(exc))
        raise
    # OwnedMosquitto listens on broker.port and reads its folder's mosquitto.conf
    # when it starts: replaced here by one whose first listener speaks TLS.
    ports = TlsMosquitto(tls=broker.port, client_cert=free_port(), elsewhere=free_port())
    conf = _MOSQUITTO_TLS_CONF.format(
        user=getpass.getuser(),
        pki=pki,
        tls=ports.tls,
        client_cert=ports.client_cert,
        elsewhere=ports.elsewhere,
    )
    (broker.folder / "mosquitto.conf").write_text(conf)
    try:
        broker.start()
        yield ports
    finally:
        broker.close()


_RABBITMQ_TLS_CONF = """\
listeners.ssl.default = 127.0.0.1:{port}
ssl_options.cacertfile = {pki.ca}
ssl_options.certfile = {pki.server_cert}
ssl_options.keyfile = {pki.server_key}
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
"""


@pytest.fixture(scope="module")
def rabbitmq_tls_port(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    try:
        node = OwnedRabbitMQ(tmp_path_factory.mktemp("rabbitmq"))
    except FileNotFoundError as exc:
        skip_or_fail(str(exc))
        raise
    # The node reads RABBITMQ_CONFIG_FILE, its folder's rabbitmq.conf, when it starts;
    # its plain listener stays (start() waits on it), the TLS one is added here.
    port = free_port()
    (node.folder / "rabbitmq.conf").write_text(_RABBITMQ_TLS_CONF.format(port=port, pki=pki))
    try:
        node.start()
        yield port
    finally:
        node.close()


# -- helpers ------------------------------------------------------------------------------


class Inbox:
    """A handler that acks and records each body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        delivery.ack()
        with self.lock:
            self.bodies.append(delivery.body)


def _round_trip(transport: Transport) -> None:
    topic = f"test/tls-{uuid.uuid4().hex[:8]}"
    inbox = Inbox()
    try:
        transport.subscribe(topic, inbox)
        transport.publish(topic, b"sealed")
        assert wait_until(lambda: inbox.bodies == [b"sealed"])
    finally:
        transport.close()


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- MQTT ---------------------------------------------------------------------------------


def test_mqtts_round_trips_with_the_brokers_ca(mosquitto: TlsMosquitto, pki: Pki) -> None:
    _round_trip(connect(f"mqtts://127.0.0.1:{mosquitto.tls}?ca={pki.ca}"))


def test_mqtts_with_another_ca_is_refused_at_once_in_one_line(
    mosquitto: TlsMosquitto, pki: Pki
) -> None:
    url = f"mqtts://device:s3cret@127.0.0.1:{mosquitto.tls}?ca={pki.stranger_ca}"
    start = time.monotonic()

    with pytest.raises(TlsError) as caught:
        connect(url, client_id=f"tls-{uuid.uuid4().hex[:6]}")

    message = _one_line(caught)
    assert "does not verify" in message and f"127.0.0.1:{mosquitto.tls}" in message
    assert "s3cret" not in message
    assert time.monotonic() - start < 3  # not connect_timeout's 5 s of retries


def test_mqtts_checks_the_host_name(mosquitto: TlsMosquitto, pki: Pki) -> None:
    with pytest.raises(TlsError) as caught:
        connect(f"mqtts://127.0.0.1:{mosquitto.elsewhere}?ca={pki.ca}")

    assert "mismatch" in _one_line(caught)


def test_plain_mqtt_to_the_tls_port_fails(mosquitto: TlsMosquitto) -> None:
    with pytest.raises(ConnectionLost, match="mqtts://"):
        connect(f"mqtt://127.0.0.1:{mosquitto.tls}?connect_timeout=1")


def test_a_client_certificate_opens_a_listener_that_requires_one(
    mosquitto: TlsMosquitto, pki: Pki
) -> None:
    base = f"mqtts://127.0.0.1:{mosquitto.client_cert}?ca={pki.ca}"

    _round_trip(connect(f"{base}&cert={pki.client_cert}&key={pki.client_key}"))
    # Under TLS 1.3 the refusal comes after the handshake, as an alert on the first read.
    with pytest.raises(TlsError, match="refused the TLS session") as caught:
        connect(f"{base}&connect_timeout=2")
    _one_line(caught)


def test_mqtts_to_a_plain_port_says_what_may_be_wrong(pki: Pki) -> None:
    require(MQTT_PORT, "Mosquitto")

    with pytest.raises(ConnectionLost, match="TLS listener"):
        connect(f"mqtts://127.0.0.1:{MQTT_PORT}?ca={pki.ca}&connect_timeout=1")


# -- AMQP ---------------------------------------------------------------------------------


def test_amqps_round_trips_with_the_brokers_ca(rabbitmq_tls_port: int, pki: Pki) -> None:
    url = f"amqps://guest:guest@127.0.0.1:{rabbitmq_tls_port}/%2F?ca={pki.ca}"

    _round_trip(connect(url, client_id="tls-test"))


def test_amqps_with_another_ca_is_refused_at_once_in_one_line(
    rabbitmq_tls_port: int, pki: Pki
) -> None:
    url = f"amqps://guest:guest@127.0.0.1:{rabbitmq_tls_port}/%2F?ca={pki.stranger_ca}"
    start = time.monotonic()

    with pytest.raises(TlsError) as caught:
        connect(url)

    message = _one_line(caught)
    assert "does not verify" in message and f"127.0.0.1:{rabbitmq_tls_port}" in message
    assert "guest:guest" not in message
    assert time.monotonic() - start < 3


# -- URL options, no broker needed ----------------------------------------------------


def test_a_tls_context_verifies_the_broker_and_its_host_name(pki: Pki) -> None:
    query = {"ca": str(pki.ca), "prefetch": "5"}

    context = tls_from_query("amqps", query, "amqps://h")

    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert query == {"prefetch": "5"}  # the TLS keys are taken out


@pytest.mark.parametrize(
    ("url", "error", "match"),
    [
        ("mqtt://127.0.0.1:1?ca=/tmp/ca.pem", TransportError, "need a TLS URL"),
        ("mqtts://127.0.0.1:1?ca=/nonexistent/ca.pem", TransportError, "ca=/nonexistent"),
        ("mqtts://127.0.0.1:1?key=/tmp/k.pem", TransportError, "key= needs cert="),
        ("mqtts://127.0.0.1:1?insecure=1", TransportError, "unknown mqtt:// option"),
        ("amqp://u:pw@127.0.0.1:1/%2F?ca=/tmp/ca.pem", TransportError, "need a TLS URL"),
        ("amqps://u:pw@127.0.0.1:1/%2F?ssl_options={}", TransportError, "ca=, cert= and key="),
        ("amqps://u:pw@127.0.0.1:1/%2F?insecure=1", ConnectionLost, "Unknown URL parameter"),
    ],
)
def test_bad_tls_urls_are_refused_before_connecting(
    url: str, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match) as caught:
        connect(url)

    assert ":pw@" not in str(caught.value)


def test_a_pem_file_that_is_not_one_is_refused_by_name(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate\n")

    with pytest.raises(TransportError, match=f"cannot load ca={bogus}"):
        connect(f"mqtts://127.0.0.1:1?ca={bogus}")
