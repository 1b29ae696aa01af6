"""Settings of the S3 store: its URL, key prefix, URL lifetimes, and the boto3 client."""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from model_store.errors import StoreError

MAX_TTL_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_REGION = re.compile(r"[a-z0-9-]{1,32}")
_URL_OPTIONS = ("endpoint_url", "region")


def expires_in(ttl_s: float) -> int:
    """Return a presigned URL lifetime in whole seconds, after checking it."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not math.isfinite(ttl_s):
        raise StoreError(f"invalid URL lifetime {ttl_s!r}")
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise StoreError(f"URL lifetime must be 1 s to 7 days, got {ttl_s!r}")
    return math.ceil(ttl_s)


def check_prefix(prefix: str) -> str:
    """Return the prefix without outer slashes; refuse empty, dot or odd segments."""
    if not isinstance(prefix, str):
        raise StoreError(f"invalid S3 key prefix {prefix!r}")
    stripped = prefix.strip("/")
    for segment in stripped.split("/") if stripped else []:
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise StoreError(
                f"invalid S3 key prefix {prefix!r}: use /-separated parts of [A-Za-z0-9._-]"
            )
    return stripped


def parse_url(url: str) -> tuple[str, str, dict[str, str]]:
    """Split ``s3://BUCKET/PREFIX?opts`` into bucket, prefix and checked options."""
    form = "s3://BUCKET/PREFIX?endpoint_url=URL&region=NAME"
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme != "s3":
        raise StoreError(f"not an S3 URL (want {form}): {url!r}")
    if parts.fragment or not BUCKET.fullmatch(parts.netloc):
        raise StoreError(f"want {form} with a 3-63 character [a-z0-9.-] bucket: {url!r}")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise StoreError(f"malformed query in S3 URL {url!r}: {exc}") from None
    options = dict(pairs)
    unknown = sorted({k for k, _ in pairs} - set(_URL_OPTIONS))
    if unknown or len(options) != len(pairs):
        raise StoreError(
            f"S3 URL {url!r}: unknown or repeated options {unknown or 'repeated'}; "
            f"accepted: {', '.join(_URL_OPTIONS)}"
        )
    if "endpoint_url" in options:
        _check_endpoint(options["endpoint_url"], url)
    if "region" in options and not _REGION.fullmatch(options["region"]):
        raise StoreError(f"S3 URL {url!r}: invalid region {options['region']!r}")
    return parts.netloc, check_prefix(unquote(parts.path)), options


def _check_endpoint(endpoint: str, url: str) -> None:
    """Refuse an endpoint that is not a plain ``http(s)://HOST[:PORT][/PATH]``."""
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or "@" in parts.netloc
        or parts.query
        or parts.fragment
    ):
        raise StoreError(f"S3 URL {url!r}: endpoint_url must be http(s)://HOST[:PORT]")


def make_client(endpoint_url: str | None, region: str | None) -> Any:
    """Build an S3 client on its own boto3 session (no module-level default session)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # a lean install: S3 is an extra
        raise StoreError("the S3 store needs boto3: pip install 'fedmq[s3]'") from exc

    session = boto3.session.Session()
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path"},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
    )
    try:
        return session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region or session.region_name or "us-east-1",
            config=config,
        )
    except Exception as exc:  # botocore's ValueError/BotoCoreError on a bad endpoint or region
        raise StoreError(f"cannot build an S3 client for {endpoint_url!r}: {exc}") from exc
