"""Storage faults that must fail fast with a message saying what to fix: invalid bucket names (refused
before any request), permission errors (said as such, never as "does not exist"), and URL redaction.

Permission errors are simulated by making the fsspec filesystem's own method raise PermissionError (tests
run as root, where chmod 000 blocks nothing); the real chmod case runs only where it can block."""

from __future__ import annotations

import http.server
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import s3fs

from jobs import caption
from pipeline.errors import PipelineError
from pipeline.frames import FrameDecoder, FrameSampling
from pipeline.sources import expand_items, items_from_json, read_records, video_rows
from pipeline.storage import StorageOptions, check_bucket_name, check_reachable, get_fs, redact

LOCAL = StorageOptions()
UNREACHABLE = StorageOptions(endpoint_url="http://127.0.0.1:9")  # any request would fail "cannot reach"


@pytest.mark.parametrize(
    "bucket", ["My-Bucket", "ab", "a" * 64, "-bucket", "bucket-", "my_bucket", "my..bucket", ""]
)
def test_invalid_bucket_names_fail_before_any_request(bucket: str) -> None:
    with pytest.raises(PipelineError, match=f"--input: invalid bucket name '{bucket}'.*3-63 characters"):
        check_reachable(f"s3://{bucket}/clips/", UNREACHABLE, "--input")


@pytest.mark.parametrize(
    "uri", ["s3://abc/x", "s3://my.bucket-1/x", "s3a://" + "a" * 63, "gs://Any_Name/x", "/p"]
)
def test_valid_bucket_names_and_other_schemes_pass_the_name_check(uri: str) -> None:
    assert check_bucket_name(uri, "--input") is None


def test_an_uppercase_bucket_is_invalid_not_missing_at_a_real_endpoint(
    s3_endpoint: str, s3_bucket: str
) -> None:
    with pytest.raises(PipelineError, match=f"invalid bucket name '{s3_bucket.upper()}'"):
        check_reachable(f"s3://{s3_bucket.upper()}/clips/", StorageOptions(), "--output")
    assert check_reachable(f"s3://{s3_bucket}/clips/", StorageOptions(), "--output") is None


def test_the_job_reports_an_invalid_bucket_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert caption.main(["--input", "s3://Videos/clips/", "--output", str(tmp_path / "out")]) == 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "error" and "invalid bucket name 'Videos'" in out["error"]
    assert not (tmp_path / "out").exists()


def _deny(monkeypatch: pytest.MonkeyPatch, uri: str, options: StorageOptions, method: str) -> None:
    """Make ``method`` of the (cached) filesystem that reads ``uri`` raise PermissionError."""
    fs, _ = get_fs(uri, options)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Access Denied")

    monkeypatch.setattr(fs, method, denied)


@pytest.mark.parametrize("method", ["info", "find"])
def test_a_prefix_that_cannot_be_listed_says_permission_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    (tmp_path / "a.mp4").write_bytes(b"x")
    _deny(monkeypatch, str(tmp_path), LOCAL, method)
    with pytest.raises(
        PipelineError, match=f"permission denied: cannot list {tmp_path} .*permissions"
    ) as info:
        read_records(str(tmp_path), LOCAL)
    assert "does not exist" not in str(info.value)


@pytest.mark.parametrize("method", ["info", "open"])
def test_a_manifest_that_cannot_be_read_says_permission_denied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"video_uri": "a.mp4"}) + "\n")
    _deny(monkeypatch, str(manifest), LOCAL, method)
    with pytest.raises(PipelineError, match=f"permission denied: cannot read {manifest}"):
        read_records(str(manifest), LOCAL)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads through chmod 000")
def test_real_permission_bits_say_permission_denied(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    (locked / "sub").mkdir(parents=True)
    (tmp_path / "m.jsonl").write_text(json.dumps({"video_uri": "a.mp4"}) + "\n")
    locked.chmod(0)
    (tmp_path / "m.jsonl").chmod(0)
    try:
        with pytest.raises(PipelineError, match="permission denied: cannot list"):
            read_records(str(locked / "sub"), LOCAL)
        with pytest.raises(PipelineError, match="permission denied: cannot read"):
            read_records(str(tmp_path / "m.jsonl"), LOCAL)
    finally:
        locked.chmod(0o755)
        (tmp_path / "m.jsonl").chmod(0o644)


@pytest.mark.parametrize(
    ("path", "method", "action"), [("clips/", "find", "list"), ("m.jsonl", "open", "read")]
)
def test_s3_access_denied_names_the_credentials_to_fix(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, path: str, method: str, action: str
) -> None:
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True).pipe(
        {f"{s3_bucket}/clips/a.mp4": b"x", f"{s3_bucket}/m.jsonl": b'{"video_uri": "clips/a.mp4"}\n'}
    )
    uri = f"s3://{s3_bucket}/{path}"
    _deny(monkeypatch, uri, StorageOptions(), method)
    with pytest.raises(
        PipelineError,
        match=f"permission denied: cannot {action} {uri} .*AWS_ACCESS_KEY_ID.*--profile.*--anon",
    ):
        read_records(uri, StorageOptions())


def test_redact_drops_a_url_s_query_but_keeps_names_elsewhere() -> None:
    assert redact("https://h/v.mp4?X-Amz-Signature=abc#t=1") == "https://h/v.mp4"
    assert redact("s3://b/odd?name#1.mp4") == "s3://b/odd?name#1.mp4"
    assert redact("/data/what?.mp4") == "/data/what?.mp4"


class _SignedHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``/a.mp4`` only to a URL carrying its signature, as a presigned URL's host does."""

    body = b""

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        path, _, query = self.path.partition("?")
        if path != "/a.mp4" or "X-Amz-Signature=good" not in query:
            self.send_error(403 if path == "/a.mp4" else 404)
            return
        start, end = 0, len(self.body) - 1
        if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
            start, end = int(match[1]), min(int(match[2] or end), end)
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head:
            self.wfile.write(self.body[start : end + 1])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def signed_host(clip_bytes: dict[str, bytes]) -> Iterator[str]:
    """``http://127.0.0.1:<port>``: a host whose ``/a.mp4`` needs ``X-Amz-Signature=good``."""
    handler = type("Handler", (_SignedHandler,), {"body": clip_bytes["red-left.mp4"]})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_a_signed_url_is_decoded_in_full_but_shown_redacted(signed_host: str, tmp_path: Path) -> None:
    signed = f"{signed_host}/a.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=good"
    (tmp_path / "m.jsonl").write_text(json.dumps({"video_uri": signed}) + "\n")
    items = expand_items(read_records(str(tmp_path / "m.jsonl"), LOCAL), "caption")
    rows = video_rows(items)
    batch = {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]}
    decoded = FrameDecoder(FrameSampling(num_frames=4, fps=None, max_pixels=64 * 64), LOCAL)(batch)
    assert list(decoded["frame_error"]) == [""] and list(decoded["num_frames"]) == [
        4
    ]  # it read the signed URL
    shown = items_from_json(rows[0]["items"])[0]  # what the annotator writes
    assert (shown.id, shown.video_id, shown.video_uri) == (
        f"{signed_host}/a.mp4:caption",
        *[f"{signed_host}/a.mp4"] * 2,
    )
    unsigned = FrameDecoder(FrameSampling(4, None, 64 * 64), LOCAL)({"video_uri": np.array([redact(signed)])})
    assert unsigned["frame_error"][0]  # the same URL without its signature is refused
