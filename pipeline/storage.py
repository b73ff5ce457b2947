"""Filesystems for every URI the pipeline touches, and the fail-fast reachability checks.

Storage options come from flags or the environment, never from code: s3fs (through botocore) reads
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and
``AWS_PROFILE`` exactly as boto3 and the AWS CLI do, so we only pass what a flag set explicitly.
:class:`StorageOptions` is small and picklable; workers rebuild filesystems from it (fsspec caches them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from pipeline.errors import PipelineError

OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
# S3's naming rules: 3-63 characters of lowercase letters, digits, dots and hyphens, starting and ending
# with a letter or digit (the endpoint answers anything else with an error that reads like "missing")
S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class StorageOptions:
    """Flags that reach the filesystem; ``None`` leaves the choice to the environment."""

    endpoint_url: str | None = None
    anon: bool = False
    profile: str | None = None

    def for_protocol(self, protocol: str) -> dict[str, Any]:
        """fsspec keyword arguments for ``protocol`` (only S3 takes these flags)."""
        if protocol not in ("s3", "s3a"):
            return {}
        kwargs: dict[str, Any] = {}
        if self.anon:
            kwargs["anon"] = True
        if self.profile:
            kwargs["profile"] = self.profile
        if self.endpoint_url:
            kwargs["endpoint_url"] = self.endpoint_url
        return kwargs


def protocol_of(uri: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for a plain path."""
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def is_object_store(uri: str) -> bool:
    """True where a single completed PUT is atomic (S3, GCS, Azure), so no rename is needed."""
    return protocol_of(uri) in OBJECT_STORES


def get_fs(uri: str, options: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (``bucket/key`` for object stores)."""
    return url_to_fs(uri, **options.for_protocol(protocol_of(uri)))


def redact(uri: str) -> str:
    """``uri`` without its query string and fragment where it is a URL (``https://h/v.mp4?X-Amz-
    Signature=...`` → ``https://h/v.mp4``): presigned signatures never reach rows, ids, errors or
    summaries. Plain paths and ``s3://`` URIs come back unchanged (``?`` and ``#`` are name characters
    there)."""
    if protocol_of(uri) not in ("http", "https"):
        return uri
    return uri.split("?", 1)[0].split("#", 1)[0]


def redact_array(uris: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """:func:`redact` of each string, computed column-wise."""
    return pc.replace_substring_regex(uris, _URL_QUERY, r"\1")


_URL_QUERY = r"(?is)^(https?://[^?#]*)[?#].*$"


def join(base: str, *names: str) -> str:
    """``base/name`` for paths and URIs alike."""
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])


def unstrip(uri: str, path: str) -> str:
    """The full URI of ``path`` (as an fsspec listing returns it) on ``uri``'s filesystem."""
    protocol = protocol_of(uri)
    return path if protocol == "file" or "://" in path else f"{protocol}://{path}"


def permission_denied(uri: str, exc: PermissionError, action: str = "read") -> PipelineError:
    """The error for a listing or read of ``uri`` refused by its filesystem, saying what to fix."""
    if is_object_store(uri):
        fix = (
            "Check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or --profile), or pass --anon "
            "for a public bucket"
        )
    else:
        fix = "Check the file's and its folders' permissions for the user running the job"
    return PipelineError(f"permission denied: cannot {action} {redact(uri)} ({exc}). {fix}.")


def check_bucket_name(uri: str, what: str) -> None:
    """Raise :class:`PipelineError` if ``uri`` is an S3 URI whose bucket name S3 would refuse."""
    if protocol_of(uri) not in ("s3", "s3a"):
        return
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if not S3_BUCKET.fullmatch(bucket) or ".." in bucket:
        raise PipelineError(
            f"{what}: invalid bucket name '{bucket}' ({uri}): S3 bucket names are 3-63 characters of "
            "lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit."
        )


def check_reachable(uri: str, options: StorageOptions, what: str) -> None:
    """Raise :class:`PipelineError` unless ``uri``'s bucket name is valid, its endpoint answers and its
    bucket exists. The name is checked first, without any request.

    Uses a separate client with short timeouts and no retries, so a wrong endpoint fails in seconds
    instead of after botocore's full retry schedule. Local paths pass (their absence is reported by the
    caller, which knows whether a missing path is an error).
    """
    protocol = protocol_of(uri)
    if protocol not in ("s3", "s3a"):
        return
    check_bucket_name(uri, what)
    kwargs = options.for_protocol(protocol)
    kwargs["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 15, "retries": {"total_max_attempts": 1}}
    fs, path = url_to_fs(uri, skip_instance_cache=True, **kwargs)
    bucket = path.split("/", 1)[0]
    endpoint = options.endpoint_url or "the endpoint from AWS_ENDPOINT_URL / your AWS config"
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError as exc:
        raise PipelineError(
            f"{what}: bucket '{bucket}' does not exist at {endpoint} ({uri}). "
            "Create the bucket or fix the URI / --endpoint-url."
        ) from exc
    except PermissionError as exc:
        raise PipelineError(
            f"{what}: access denied to bucket '{bucket}' ({exc}). Check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY / --profile, or pass --anon for a public bucket."
        ) from exc
    except Exception as exc:  # botocore's connection errors share no fsspec base class
        raise PipelineError(
            f"{what}: cannot reach the object store at {endpoint} for {uri} "
            f"({type(exc).__name__}: {exc}). Check --endpoint-url / AWS_ENDPOINT_URL and the network."
        ) from exc
