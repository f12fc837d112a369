"""What the workloads share about s3:// locations: folder semantics, one client, and failures a user can act on.

The client is the MinIO SDK's, which speaks to AWS S3 and to any S3-compatible server. Credentials come from the
environment the operator fills from a location's credentialsSecret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
optionally AWS_SESSION_TOKEN); without them requests are anonymous. AWS_REGION (or AWS_DEFAULT_REGION) names the
bucket's region; unset, the client asks the server for it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from minio import Minio

log = logging.getLogger(__name__)

AWS_S3_HOST = "s3.amazonaws.com"
CREDENTIAL_ERRORS = {
    "InvalidAccessKeyId": "does not know the access key (AWS_ACCESS_KEY_ID in {field}.credentialsSecret)",
    "SignatureDoesNotMatch": "refused the secret key (AWS_SECRET_ACCESS_KEY in {field}.credentialsSecret): it "
                             "does not match the access key",
    "ExpiredToken": "says the session token (AWS_SESSION_TOKEN) has expired",
    "InvalidToken": "refused the session token (AWS_SESSION_TOKEN)",
    "TokenRefreshRequired": "says the session token (AWS_SESSION_TOKEN) has expired",
}
DENIED = ("AccessDenied", "AllAccessDisabled")
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 300


class S3LocationError(RuntimeError):
    """An s3 location cannot be used. The message names the spec field and the fix; `code` is the S3 error code
    when the server gave one."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


def s3_folder(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of s3://bucket/path, the path taken as a folder: s3://b/docs lists docs/…, never
    docs-old/…."""
    bucket, _, path = uri.removeprefix("s3://").partition("/")
    path = path.strip("/")
    return bucket, f"{path}/" if path else ""


def endpoint_address(endpoint: str | None, field: str = "s3") -> tuple[str, bool]:
    """(host[:port], secure) of an endpoint URL; AWS S3 over https when there is none. A URL without a scheme is
    taken as https, as AWS's own tools do."""
    if not endpoint:
        return AWS_S3_HOST, True
    parsed = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise S3LocationError(f"{field}.endpoint {endpoint!r} is not an http(s) URL; write it as "
                              "https://host[:port] (or http:// for a server without TLS)")
    if parsed.path.strip("/") or parsed.query:
        raise S3LocationError(f"{field}.endpoint {endpoint!r} has a path; S3 endpoints are addressed at the "
                              "host's root: write it as https://host[:port]")
    return parsed.netloc.rpartition("@")[2], parsed.scheme == "https"


def describe_endpoint(endpoint: str | None) -> str:
    return endpoint.rstrip("/") if endpoint else f"AWS S3 ({AWS_S3_HOST})"


def has_credentials() -> bool:
    return bool(os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_SECRET_ACCESS_KEY"))


def region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_client(endpoint: str | None, field: str = "s3") -> Minio:
    """The client for one location's endpoint, with the credentials and region from the environment."""
    try:
        from minio import Minio
    except ImportError:
        raise S3LocationError(f"{field} needs the minio package (the S3 client), which this image lacks; use "
                              "ragtune's finetune or index image, or install minio>=7.2 into yours") from None
    host, secure = endpoint_address(endpoint, field)
    access_key = os.environ.get("AWS_ACCESS_KEY_ID") or None
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY") or None
    if bool(access_key) != bool(secret_key):
        present, missing = (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if access_key
                            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"))
        raise S3LocationError(f"{field}.credentialsSecret gives {present} but not {missing}; the Secret needs "
                              "both keys")
    return Minio(host, access_key=access_key, secret_key=secret_key,
                 session_token=os.environ.get("AWS_SESSION_TOKEN") or None, secure=secure, region=region(),
                 http_client=http_client())


def http_client():
    """The client's own pool, with a connect timeout of seconds instead of its five minutes: a wrong endpoint
    fails the run in about a minute (retries included) rather than holding the Job for half an hour."""
    import certifi
    import urllib3

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=READ_TIMEOUT_SECONDS), maxsize=10,
        cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))


@contextmanager
def explained(field: str, uri: str, endpoint: str | None, needs: str) -> Iterator[None]:
    """Turns the client's failures into S3LocationError naming the field and the fix. `needs` says which
    permissions the operation takes (shown when access is denied)."""
    from minio.error import InvalidResponseError, S3Error, ServerError
    from urllib3.exceptions import HTTPError, MaxRetryError

    where = describe_endpoint(endpoint)
    try:
        yield
    except S3Error as exc:
        raise S3LocationError(s3_error_reason(exc.code, exc.message, field, uri, where, needs), exc.code) from None
    except (InvalidResponseError, ServerError) as exc:
        answer = " ".join(str(exc).split())[:200]
        raise S3LocationError(f"{field}: {where} did not answer as an S3 server ({answer}); check "
                              f"{field}.endpoint") from None
    except HTTPError as exc:
        reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason else exc
        raise S3LocationError(f"{field}: cannot reach {where}: {reason}; check {field}.endpoint and that the "
                              "pod's network reaches it") from None
    except ValueError as exc:  # the client's own checks of names, e.g. a bucket name S3 does not allow
        raise S3LocationError(f"{field}.uri {uri}: {exc}") from None


def s3_error_reason(code: str | None, message: str | None, field: str, uri: str, where: str, needs: str) -> str:
    bucket, _ = s3_folder(uri)
    if code == "NoSuchBucket":
        return (f"{field}.uri {uri}: bucket {bucket!r} does not exist on {where}; create it or correct the bucket "
                "name")
    if code in CREDENTIAL_ERRORS:
        return f"{field}: {where} {CREDENTIAL_ERRORS[code].format(field=field)}; correct the Secret"
    if code in DENIED:
        if not has_credentials():
            return (f"{field}: {where} denied anonymous access to {uri}; set {field}.credentialsSecret to a Secret "
                    "with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        # Without a region the client first asks for the bucket's location, which takes a permission of its own.
        location = "" if region() else " (and s3:GetBucketLocation, or AWS_REGION set)"
        return (f"{field}: {where} denied access to {uri} for access key {os.environ.get('AWS_ACCESS_KEY_ID')}; "
                f"it needs {needs}{location} on bucket {bucket!r}")
    return f"{field}: {uri} on {where}: {code}: {message or 'no message'}"


def relative_key(key: str, prefix: str) -> str | None:
    """The object's path under the folder, or None for keys that cannot be a file there (folder markers, paths
    with empty, '.' or '..' parts, which would land outside the target)."""
    relative = key[len(prefix):]
    parts = relative.split("/")
    if not relative or any(part in ("", ".", "..") for part in parts):
        return None
    return relative


def download_folder(uri: str, endpoint: str | None, target: Path, field: str,
                    wanted: Callable[[str], bool]) -> tuple[int, int]:
    """Copies the objects under the folder `uri` whose relative path `wanted` accepts into `target`, keeping
    their layout. Returns (objects under the folder, objects copied)."""
    client = s3_client(endpoint, field)
    bucket, prefix = s3_folder(uri)
    listed = copied = 0
    with explained(field, uri, endpoint, needs="s3:ListBucket and s3:GetObject"):
        for obj in client.list_objects(bucket, prefix=prefix, recursive=True):
            if obj.is_dir:
                continue
            listed += 1
            relative = relative_key(obj.object_name, prefix)
            if relative is None:
                log.warning("%s: not copying %s: its key has no usable path under %s", field, obj.object_name, uri)
                continue
            if not wanted(relative):
                continue
            download(client, bucket, obj.object_name, target / relative)
            copied += 1
    log.info("%s: copied %d of %d objects under %s", field, copied, listed, uri)
    return listed, copied


def stage_folder(uri: str, endpoint: str | None, target: Path, field: str) -> Path:
    """Every object under the folder `uri`, copied into `target` once: a marker naming the uri is written last, so
    a restarted pod reuses a complete copy and redoes an interrupted one from scratch; processes of one pod that
    need the same files wait for the first one's copy. Returns `target`."""
    marker = target.parent / f".{target.name}.staged"  # beside the copy: its digest covers what was copied only
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == uri:
            return target
        shutil.rmtree(target, ignore_errors=True)
        listed, copied = download_folder(uri, endpoint, target, field, lambda path: True)
        if not copied:
            raise S3LocationError(f"{field}.uri {uri}: no objects under that folder; upload the files there or "
                                  f"correct {field}.uri")
        marker.write_text(uri)
    return target


def stage_model(uri: str, endpoint: str | None, target: Path) -> Path:
    """A base model's folder in S3 (`model.s3`), copied into `target` (`stage_folder`); it must hold the model's
    config.json."""
    stage_folder(uri, endpoint, target, "model.s3")
    if not (target / "config.json").is_file():
        raise S3LocationError(f"model.s3.uri {uri} holds no config.json: point it at the folder with the model's "
                              "config.json and weights")
    return target


def download(client: Minio, bucket: str, key: str, destination: Path) -> None:
    """Written under a hidden name and renamed: a reader never takes half an object for a file."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f".{destination.name}.part")
    response = client.get_object(bucket, key)
    try:
        with partial.open("wb") as out:
            for block in response.stream(1 << 20):
                out.write(block)
    finally:
        response.close()
        response.release_conn()
    partial.replace(destination)


def check_bucket(uri: str, endpoint: str | None, field: str, needs: str) -> None:
    """Fails early when the bucket is missing or the credentials are refused."""
    client = s3_client(endpoint, field)
    bucket, _ = s3_folder(uri)
    with explained(field, uri, endpoint, needs):
        exists = client.bucket_exists(bucket)
    if not exists:
        raise S3LocationError(s3_error_reason("NoSuchBucket", None, field, uri, describe_endpoint(endpoint), needs),
                              "NoSuchBucket")


def upload_files(uri: str, endpoint: str | None, files: list[tuple[Path, str]], field: str) -> None:
    """Uploads each (local file, path under the folder) to the folder `uri`."""
    client = s3_client(endpoint, field)
    bucket, prefix = s3_folder(uri)
    with explained(field, uri, endpoint, needs="s3:PutObject"):
        for local, relative in files:
            client.fput_object(bucket, prefix + relative, str(local))
