"""Photos and results in object storage (S3, or an S3-compatible store: MinIO, Ceph, R2...), named s3://bucket/key.

boto3 reads the standard AWS configuration: AWS_ENDPOINT_URL for an S3-compatible store, the usual credential
chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a pod's web identity or instance role), AWS_REGION.
A key that cannot be read is an errors.py error naming it (404 missing, 403 refused, 409 archived, 413 too large,
503 the store did not answer), which the caller writes as that image's outcome.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from classifier.errors import Conflict, Forbidden, NotFound, TooLarge, Unavailable

SCHEME = "s3://"
CONNECTIONS = 32  # the client's connection pool: at least the downloads a process keeps in flight


def is_url(text: str) -> bool:
    return text.startswith(SCHEME)


@dataclass(frozen=True)
class ObjectURL:
    """s3://bucket/key; as an input, the key may be a prefix (every object below it)."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, text: str) -> ObjectURL:
        bucket, _, key = text.removeprefix(SCHEME).partition("/")
        if not is_url(text) or not bucket:
            raise ValueError(f"{text!r} is not s3://bucket/key")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"

    def below(self, name: str) -> ObjectURL:
        """The object called name under this one taken as a folder."""
        return ObjectURL(self.bucket, f"{self.key.rstrip('/')}/{name}" if self.key else name)


@functools.cache
def client() -> Any:
    """One client per process: boto3's clients are thread-safe, and each keeps its own pool of connections."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(max_pool_connections=CONNECTIONS, retries={"mode": "standard"}))


def keys(prefix: ObjectURL, start_after: str = "") -> Iterator[str]:
    """The keys below prefix in key order, a page of 1,000 at a time: a listing of millions never sits in memory."""
    pages = client().get_paginator("list_objects_v2").paginate(
        Bucket=prefix.bucket, Prefix=prefix.key, **({"StartAfter": start_after} if start_after else {}))
    try:
        for page in pages:
            for item in page.get("Contents", ()):
                yield item["Key"]
    except Exception as error:
        raise failure(error, prefix) from None


def objects_below(prefix: ObjectURL) -> Iterator[ObjectURL]:
    """Each object below prefix taken as a folder (s3://b/in holds in/x.jpg, not inbox/x.jpg), or the object itself."""
    folder = prefix.key if not prefix.key or prefix.key.endswith("/") else prefix.key + "/"
    for key in keys(prefix):
        if key == prefix.key or key.startswith(folder):
            yield ObjectURL(prefix.bucket, key)


def read(url: ObjectURL, max_bytes: int | None = None) -> bytes:
    """An object's bytes; an object larger than max_bytes is refused before its body is read."""
    try:
        answer = client().get_object(Bucket=url.bucket, Key=url.key)
        body = answer["Body"]
        if max_bytes is not None and answer["ContentLength"] > max_bytes:
            body.close()
            raise TooLarge(f"{url}: the object is larger than {max_bytes:,} bytes (MAX_UPLOAD_BYTES)")
        with body:
            return body.read()
    except TooLarge:
        raise
    except Exception as error:
        raise failure(error, url) from None


def write(url: ObjectURL, data: bytes, content_type: str = "application/octet-stream") -> None:
    """One PUT: the object appears whole or not at all."""
    try:
        client().put_object(Bucket=url.bucket, Key=url.key, Body=data, ContentType=content_type)
    except Exception as error:
        raise failure(error, url) from None


def failure(error: Exception, url: ObjectURL) -> Exception:
    """A client error as ours, naming the object."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound"):
            return NotFound(f"{url}: no such {'bucket' if code == 'NoSuchBucket' else 'object'}")
        if code in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return Forbidden(f"{url}: the store refused access ({code})")
        if code == "InvalidObjectState":
            return Conflict(f"{url}: the object is archived (InvalidObjectState): restore it first")
        return Unavailable(f"{url}: the object store answered {code or 'an error'}", "storage_unavailable")
    if isinstance(error, BotoCoreError):
        return Unavailable(f"{url}: the object store could not be reached ({type(error).__name__})", "storage_unavailable")
    return error
