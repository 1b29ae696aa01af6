"""The S3 backend of the model store (boto3, imported only when a client is built)."""

from __future__ import annotations

from model_store.s3.store import DEFAULT_TTL_S, UPLOAD_CONTENT_TYPE, S3Store

__all__ = ["DEFAULT_TTL_S", "UPLOAD_CONTENT_TYPE", "S3Store"]
