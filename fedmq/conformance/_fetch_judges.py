"""Judging how the device fetched: the signed URL, the sha256, transient and final failures.

Each function reads the artifact server's request log and the answers the
device sent, and returns one ``CheckResult``.
"""

from __future__ import annotations

from collections.abc import Sequence

from broker import ModelRef
from broker.errors import ChecksumMismatch, FetchError
from fedmq.conformance._blobs import BlobServer, Fetch
from fedmq.conformance._report import Check, CheckResult
from fedmq.conformance._standin import TaskRun

CHECKSUM_MISMATCH = ChecksumMismatch.code
FETCH_FAILED = FetchError.code


def judge_download_checksum(baseline: TaskRun, tampered: TaskRun, blobs: BlobServer) -> CheckResult:
    """Judge the baseline model's download, and the refusal of a model that fails its sha256."""
    check = Check.DOWNLOAD_CHECKSUM
    fetched = blobs.fetches(baseline.task.model)
    if not fetched:
        return CheckResult.failing(
            check,
            "never requested the task's weights: GET model.uri (a phone may GET its "
            "<platform>/weights.ptd instead, which holds the same weights)",
        )
    if not any(f.status == 200 for f in fetched):
        return CheckResult.failing(
            check,
            f"the weights URLs answered {_statuses(fetched)}: GET them exactly as given, "
            "query included",
        )
    if not tampered.answers:
        return CheckResult.failing(
            check,
            "no answer to a task whose model fails its sha256 "
            f"(expected error_reply {CHECKSUM_MISMATCH!r})",
        )
    if tampered.updates():
        return CheckResult.failing(check, "trained on model bytes that fail the task's sha256")
    if tampered.error_codes()[:1] != [CHECKSUM_MISMATCH]:
        return CheckResult.failing(
            check,
            f"answered a model failing its sha256 with {tampered.describe_answers()}, "
            f"expected error_reply {CHECKSUM_MISMATCH!r}",
        )
    return CheckResult.passing(
        check, "fetched the model by its signed URL; refused model bytes failing sha256"
    )


def judge_tampered_artifact(
    run: TaskRun, tampered: Sequence[ModelRef], blobs: BlobServer
) -> CheckResult:
    """Judge the answer to a task whose artifacts' bytes all fail their references' sha256."""
    check = Check.TAMPERED_ARTIFACT
    fetched = [ref for ref in tampered if blobs.fetches(ref)]
    if not run.answers:
        return CheckResult.failing(
            check,
            "no answer to a task with tampered artifacts (expected error_reply checksum_mismatch)",
        )
    if run.updates():
        if not fetched:
            return CheckResult.unchecked(
                check,
                "the device fetched none of the task's artifacts, so refusing one was not tested",
            )
        return CheckResult.failing(
            check, f"trained with {len(fetched)} artifact(s) whose bytes fail their sha256"
        )
    if run.error_codes()[:1] != [CHECKSUM_MISMATCH]:
        return CheckResult.failing(
            check, f"answered {run.describe_answers()}, expected error_reply {CHECKSUM_MISMATCH!r}"
        )
    return CheckResult.passing(
        check, f"refused with checksum_mismatch after fetching {len(fetched)} tampered artifact(s)"
    )


def judge_retries(
    transient: TaskRun,
    transient_ref: ModelRef,
    expired: TaskRun,
    expired_ref: ModelRef,
    blobs: BlobServer,
) -> CheckResult:
    """Judge a download that failed twice for a transient reason, and one refused for good (403)."""
    check = Check.RETRIES
    tries = blobs.fetches(transient_ref)
    refused = blobs.fetches(expired_ref)
    if not tries or not refused:
        return CheckResult.unchecked(
            check, "the device did not download the model, so it met no failure (see download)"
        )
    if not transient.updates():
        return CheckResult.failing(
            check,
            f"after the model URL answered {_statuses(tries)}, the device sent "
            f"{transient.describe_answers()}; a 5xx or a dropped connection is transient: retry",
        )
    if len(refused) > 1:
        return CheckResult.failing(
            check, f"requested an expired URL {len(refused)} times; a 403 is final, do not retry it"
        )
    if expired.error_codes()[:1] != [FETCH_FAILED]:
        return CheckResult.failing(
            check,
            f"answered a task whose URL has expired (403) with {expired.describe_answers()}, "
            f"expected error_reply {FETCH_FAILED!r}",
        )
    return CheckResult.passing(
        check,
        f"recovered after {_statuses(tries)}; answered an expired URL with fetch_failed, no retry",
    )


def _statuses(fetches: Sequence[Fetch]) -> str:
    """Return the statuses answered, as ``503, dropped, 200``."""
    if not fetches:
        return "no request"
    return ", ".join(str(f.status) if f.status else "dropped" for f in fetches)
