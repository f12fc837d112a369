"""What the workloads share about s3:// locations."""

from __future__ import annotations


def s3_folder(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of s3://bucket/path, the path taken as a folder: s3://b/docs lists docs/…, never
    docs-old/…."""
    bucket, _, path = uri.removeprefix("s3://").partition("/")
    path = path.strip("/")
    return bucket, f"{path}/" if path else ""
