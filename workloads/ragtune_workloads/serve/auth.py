"""Bearer API keys read from a file: the mounted Secret of the HybridEndpoint.

The file is re-read when it changes on disk (Kubernetes updates Secret mounts in place), so a rotated key takes
effect without a restart. Keys are compared with `hmac.compare_digest` so response time does not leak how much
of a guessed key was right.
"""

from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path


class ApiKeyError(RuntimeError):
    """The configured key file cannot be used."""


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for anything else."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def keys_match(expected: str, offered: str | None) -> bool:
    if offered is None:
        return False
    return hmac.compare_digest(expected.encode(), offered.encode())


class ApiKey:
    """The key clients must send; `None` path means the endpoint is open."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._key: str | None = None
        if self.path is not None:
            self._load()

    @property
    def required(self) -> bool:
        return self.path is not None

    def _load(self) -> str:
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            if self._key is not None:
                return self._key  # a Secret mount is swapped through a symlink; keep the last key meanwhile
            raise ApiKeyError(f"API key file {self.path} cannot be read: {exc.strerror or exc}") from None
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                key = self.path.read_text().strip()
                if not key:
                    if self._key is not None:
                        return self._key  # caught mid-rewrite: keep the last key until the new one is there
                    raise ApiKeyError(f"API key file {self.path} is empty")
                self._key, self._stamp = key, stamp
            return self._key

    def allows(self, authorization: str | None) -> bool:
        if self.path is None:
            return True
        return keys_match(self._load(), bearer_token(authorization))
