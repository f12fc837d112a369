"""The S3 server the tests run against: hack/s3server (gofakes3 in memory, requests checked for a valid
Signature V4), built once by hack/build-s3server.sh into the tool cache and started on a free loopback port.

Tests reach it the way the workloads reach S3 in a pod: an endpoint URL in the spec and the credentials in
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
"""

from __future__ import annotations

import io
import select
import subprocess
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "hack" / "build-s3server.sh"
ACCESS_KEY = "ragtune-test"
SECRET_KEY = "ragtune-test-secret"


class S3ServerError(Exception):
    """The server could not be built or started; the message says why."""


def build() -> Path:
    try:
        result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise S3ServerError("bash hack/build-s3server.sh took more than 15 minutes") from None
    if result.returncode != 0:
        tail = " ".join(result.stderr.strip().splitlines()[-5:]) or f"exit code {result.returncode}"
        raise S3ServerError(f"bash hack/build-s3server.sh failed: {tail}")
    return Path(result.stdout.strip().splitlines()[-1])


class S3Server:
    def __init__(self, binary: Path, log_path: Path):
        self.binary = binary
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def start(self, timeout: float = 15) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "-addr", "127.0.0.1:0", "-access-key", ACCESS_KEY, "-secret-key", SECRET_KEY],
                stdout=subprocess.PIPE, stderr=log, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.1)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith("ready "):
                    self.endpoint = line.split(None, 1)[1].strip()
                    return
            if self.process.poll() is not None:
                break
        self.stop()
        raise S3ServerError(f"{self.binary} did not report ready within {timeout:.0f}s: "
                            f"{self.log_path.read_text().strip()[-500:] or 'no output'}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    # ------------------------------------------------------------ what tests do with it

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        from minio import Minio

        return Minio(self.endpoint.removeprefix("http://"), access_key=access_key, secret_key=secret_key,
                     secure=False)

    def new_bucket(self) -> str:
        """A bucket no other test uses."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().make_bucket(name)
        return name

    def put(self, bucket: str, objects: dict[str, bytes]) -> None:
        client = self.client()
        for key, data in objects.items():
            client.put_object(bucket, key, io.BytesIO(data), len(data))

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(obj.object_name for obj in self.client().list_objects(bucket, prefix=prefix, recursive=True))

    def read(self, bucket: str, key: str) -> bytes:
        response = self.client().get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()
