"""A real S3 API on loopback for tests: moto's server behind a SigV4 gate.

Runs in a thread of the test process; processes a test starts reach it over
HTTP like any S3 endpoint (credentials in ``CREDENTIALS``).
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from model_store import S3Store

# # moto's server is a real S3 HTTP API, but it checks neither the signature nor
# the expiry of presigned URLs, nor the access key of signed requests, and its
# If-None-Match check is not atomic between its threads. The gate below does
# what S3 does there, so the tests see S3's behaviour, not moto's gaps.

S3_ACCESS_KEY = "fedmq-test-key"
S3_SECRET_KEY = "fedmq-test-secret"
S3_REGION = "us-east-1"
S3_BUCKET = "fedmq-store-tests"
Denial = tuple[str, str]  # an S3 error code and message


def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _header_value(environ: dict[str, Any], name: str) -> str | None:
    if name == "content-type":
        return environ.get("CONTENT_TYPE") or None
    if name == "content-length":
        return environ.get("CONTENT_LENGTH") or None
    return environ.get("HTTP_" + name.upper().replace("-", "_"))


class SigV4Gate:
    """WSGI middleware: checks presigned URLs (SigV4 query auth) and access keys like S3."""

    def __init__(self, app: Any, secrets: dict[str, str]) -> None:
        self.app = app
        self.secrets = secrets
        self.clock_offset = 0.0
        self._conditional = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if any(name == "X-Amz-Signature" for name, _ in query):
            denied = self._check_presigned(environ, dict(query))
        else:
            denied = self._check_access_key(environ)
        if denied is not None:
            return self._deny(environ, start_response, *denied)
        if "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ:
            with self._conditional:  # S3's conditional writes are atomic; moto's are not
                return list(self.app(environ, start_response))
        return self.app(environ, start_response)

    def _check_access_key(self, environ: dict[str, Any]) -> Denial | None:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        if not authorization:
            return ("AccessDenied", "Anonymous access is not allowed")
        access_key = authorization.partition("Credential=")[2].partition("/")[0]
        if access_key not in self.secrets:
            return ("InvalidAccessKeyId", "The AWS Access Key Id does not exist")
        return None

    def _check_presigned(
        self, environ: dict[str, Any], q: dict[str, str]
    ) -> tuple[str, str] | None:
        try:
            access_key, date, region, service, _ = q["X-Amz-Credential"].split("/")
            signed_at = calendar.timegm(time.strptime(q["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
            expires = int(q["X-Amz-Expires"])
            signed_headers = q["X-Amz-SignedHeaders"].split(";")
        except (KeyError, ValueError):
            return ("AuthorizationQueryParametersError", "Malformed presigned URL")
        if access_key not in self.secrets:
            return ("InvalidAccessKeyId", "The AWS Access Key Id does not exist")
        if time.time() + self.clock_offset > signed_at + expires:
            return ("AccessDenied", "Request has expired")
        pairs = [
            (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
            for k, v in parse_qsl(environ["QUERY_STRING"], keep_blank_values=True)
            if k != "X-Amz-Signature"
        ]
        headers = [(h, _header_value(environ, h)) for h in signed_headers]
        if any(value is None for _, value in headers):
            return ("SignatureDoesNotMatch", "A signed header is missing")
        canonical = "\n".join(
            [
                environ["REQUEST_METHOD"],
                environ["RAW_URI"].partition("?")[0],
                "&".join(f"{k}={v}" for k, v in sorted(pairs)),
                "".join(f"{h}:{' '.join(str(v).split())}\n" for h, v in headers),
                ";".join(signed_headers),
                "UNSIGNED-PAYLOAD",
            ]
        )
        scope = f"{date}/{region}/{service}/aws4_request"
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                q["X-Amz-Date"],
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        key = _signing_key(self.secrets[access_key], date, region, service)
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, q["X-Amz-Signature"]):
            return ("SignatureDoesNotMatch", "The request signature does not match")
        return None

    @staticmethod
    def _deny(environ: dict[str, Any], start_response: Any, code: str, message: str) -> Any:
        # Drain the body so the connection stays usable for the next request.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
        ).encode()
        start_response(
            "403 Forbidden",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
        )
        return [body]


@dataclass
class MotoS3:
    """The loopback S3 endpoint, its gate and its one test bucket."""

    endpoint_url: str
    gate: SigV4Gate
    bucket: str = S3_BUCKET
    _shared: Any = None

    def client(self, **config: Any) -> Any:
        """Return a boto3 S3 client of the test server.

        ``access_key`` and ``endpoint_url`` override the defaults; the rest of
        ``config`` are botocore ``Config`` options. Without overrides the one
        shared client is returned (boto3 clients are thread-safe, and each
        new one costs ~0.3 s of model loading).
        """
        default = not config
        if default and self._shared is not None:
            return self._shared
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.pop("endpoint_url", self.endpoint_url),
            region_name=S3_REGION,
            aws_access_key_id=config.pop("access_key", S3_ACCESS_KEY),
            aws_secret_access_key=S3_SECRET_KEY,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
        )
        if default:
            self._shared = client
        return client

    def store(self, **options: Any) -> S3Store:
        """Return an S3Store under a fresh prefix of the test bucket."""
        return S3Store(self.client(), self.bucket, f"t/{uuid.uuid4().hex}", **options)

    @contextmanager
    def clock_ahead(self, seconds: float) -> Iterator[None]:
        """Let the gate judge expiry as if ``seconds`` had passed."""
        self.gate.clock_offset = seconds
        try:
            yield
        finally:
            self.gate.clock_offset = 0.0


CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
    "AWS_DEFAULT_REGION": S3_REGION,
}
"""The environment a process needs to use the test server through boto3."""


@contextmanager
def s3_server() -> Iterator[MotoS3]:
    """Run moto's S3 server on 127.0.0.1 (free port) behind a SigV4 gate, with one bucket."""
    # The pieces ThreadedMotoServer assembles, so that the gate can wrap the app.
    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):  # type: ignore[misc]
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    gate = SigV4Gate(
        DomainDispatcherApplication(create_backend_app), {S3_ACCESS_KEY: S3_SECRET_KEY}
    )
    server = make_server("127.0.0.1", 0, gate, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    s3 = MotoS3(f"http://127.0.0.1:{server.server_port}", gate)
    s3.client().create_bucket(Bucket=s3.bucket)
    try:
        yield s3
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def list_keys(s3: MotoS3, prefix: str) -> list[str]:
    """Return the keys under ``prefix`` in the test bucket."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]
