"""botocore's errors, imported lazily, and their translation into the StoreError tree."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from model_store.errors import ArtifactNotFound, StoreError, StoreUnavailable

MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
EXISTS = frozenset({"PreconditionFailed", "412"})
BUSY = frozenset({"ConditionalRequestConflict", "409"})
DENIED = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "403",
    }
)


def botocore_errors() -> ModuleType:
    """Return ``botocore.exceptions``, imported on first use (boto3 brings it)."""
    import botocore.exceptions as errors

    module: ModuleType = errors
    return module


def error_code(exc: Any) -> str:
    """Return the error code of a botocore ``ClientError``."""
    return str(exc.response.get("Error", {}).get("Code", ""))


def translate(exc: Exception, action: str, bucket: str) -> StoreError:
    """Return the StoreError for a botocore error, with a message that says what to fix."""
    botocore = botocore_errors()
    if isinstance(exc, botocore.ClientError):
        code = error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "NoSuchBucket":
            return StoreError(f"{action}: bucket {bucket!r} does not exist")
        if code in DENIED or status == 403:
            return StoreError(
                f"{action}: access denied to bucket {bucket!r} ({code}); "
                "check the credentials and the bucket policy"
            )
        if code in MISSING:
            return ArtifactNotFound(f"{action}: not found")
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return StoreUnavailable(f"{action}: S3 answered {status} {code} {message}".rstrip())
        return StoreError(f"{action}: S3 error {code}: {message}")
    if isinstance(exc, botocore.NoCredentialsError | botocore.PartialCredentialsError):
        return StoreError(
            f"{action}: no S3 credentials (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or an AWS profile)"
        )
    if isinstance(exc, botocore.EndpointConnectionError | botocore.ConnectionError):
        return StoreUnavailable(f"{action}: S3 endpoint unreachable: {exc}")
    if isinstance(exc, botocore.ReadTimeoutError | botocore.ConnectionClosedError):
        return StoreUnavailable(f"{action}: S3 endpoint did not answer: {exc}")
    return StoreError(f"{action}: {exc}")
