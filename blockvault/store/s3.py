"""S3 backend (boto3): AWS S3, Ceph RGW, MinIO, Swift's s3api.

Only calls every one of those answers are used: HeadBucket, CreateBucket, PutObject,
GetObject (with ``Range``), HeadObject, DeleteObject, ListObjectsV2. No feature probing
(Swift's s3api answers unsupported sub-resources with a bucket listing). ``put_new`` adds
``If-None-Match: *`` to PutObject, which AWS S3 applies atomically and Swift's s3api passes
on to Swift, where it is not atomic against overlapping writers (see
:meth:`S3Container.put_new`).

A full store is :class:`StoreFull`: the codes of ``_FULL_CODES`` (RGW's and MinIO's
quotas, MinIO's full disks, an upload too large) and any 507 or 413.

botocore's own retries are reduced to a single attempt: the one
:class:`~blockvault.store.retry.RetryingBackend` owns retries and their time budget.
Credentials not given fall back to the standard AWS chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``~/.aws/credentials``, instance roles...).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any, BinaryIO

import boto3
import botocore.exceptions as bce
from botocore.config import Config

from blockvault.store.base import (
    Backend,
    Container,
    ObjectInfo,
    ObjectNotFound,
    StoreError,
    StoreFull,
    StorePermanentError,
    StoreUnavailable,
    file_md5,
)

# matched with fullmatch: "$" also passes a final newline ("abc\n")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404", "NoSuchBucket"}
_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
    "AccountProblem",
    "403",
    "401",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "InternalError",
    "ServiceUnavailable",
    "ServerBusy",
    "BadDigest",  # body corrupted in transit: a re-send cures it
    "XAmzContentSHA256Mismatch",
}
#: "no room": checked before the access codes, as RGW answers QuotaExceeded with 403
_FULL_CODES = {
    "QuotaExceeded",  # Ceph RGW: user or bucket quota (403)
    "XMinioAdminBucketQuotaExceeded",  # MinIO: bucket quota (400)
    "XMinioStorageFull",  # MinIO: drives past their free-space threshold (507)
    "InsufficientStorage",  # 507 under its generic name
    "EntityTooLarge",  # AWS: above the single-PUT limit; Swift's s3api: a Swift quota (413)
}
_FULL_STATUSES = {413, 507}

#: user metadata naming the put_new call that wrote an object (read back to confirm it)
_CREATE_ID_KEY = "blockvault-create-id"

_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    bce.EndpointConnectionError,
    bce.ConnectionError,  # ConnectionClosedError, ConnectTimeoutError, ProxyConnectionError
    bce.HTTPClientError,  # ReadTimeoutError, ResponseStreamingError
    bce.IncompleteReadError,
    ConnectionError,
    TimeoutError,
)


def bucket_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid S3 bucket name (the DNS-compatible rules), or ``None``."""
    if not 3 <= len(name) <= 63:
        return f"S3 bucket names must be 3-63 characters long (got {len(name)})"
    if not _BUCKET_RE.fullmatch(name):
        return (
            "S3 bucket names may contain only lowercase letters, digits, '.' and '-', "
            "and must start and end with a letter or digit"
        )
    if ".." in name or ".-" in name or "-." in name:
        return "S3 bucket names must not contain '..', '.-' or '-.'"
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return "S3 bucket names must not be formatted as an IP address"
    return None


def _error_code(exc: bce.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {}) or {}
    meta = exc.response.get("ResponseMetadata", {}) or {}
    return str(err.get("Code", "")), int(meta.get("HTTPStatusCode") or 0)


def _map_error(exc: BaseException, what: str, name: str = "", container: str = "") -> StoreError:
    """Translate a botocore exception into the store contract's errors (``name`` and
    ``container``: what was being written, for :class:`StoreFull`)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bce.ClientError):
        code, status = _error_code(exc)
        msg = (exc.response.get("Error", {}) or {}).get("Message") or ""
        detail = f"{code or status}{': ' + msg if msg else ''}"
        if code in _FULL_CODES or status in _FULL_STATUSES:
            return StoreFull(f"s3: {detail}", name, container)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return StoreUnavailable(f"s3: {what}: {detail}")
        if code in _AUTH_CODES or status in (401, 403):
            return StorePermanentError(
                f"s3: {what}: authentication/access denied ({detail}); "
                "check s3_access_key/s3_secret_key and the bucket's policy"
            )
        return StorePermanentError(f"s3: {what}: {detail}")
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return StorePermanentError(
            f"s3: {what}: no credentials: set s3_access_key/s3_secret_key or the AWS "
            "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(exc, _TRANSPORT_ERRORS):
        return StoreUnavailable(f"s3: {what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, bce.ParamValidationError):
        return StorePermanentError(f"s3: {what}: {exc}")
    if isinstance(exc, bce.BotoCoreError):
        return StoreUnavailable(f"s3: {what}: {type(exc).__name__}: {exc}")
    raise exc


def _mtime(fields: dict[str, Any], name: str) -> float:
    """``LastModified`` of a HeadObject answer or a listing entry (botocore parses it into
    an aware datetime) as seconds since the epoch."""
    value = fields.get("LastModified")
    if not isinstance(value, datetime.datetime):
        # a store that omits it will not start sending it on a retry
        raise StorePermanentError(
            f"s3: {name}: the store gave no valid LastModified ({value!r})"
        )
    if value.tzinfo is None:  # the protocol's times are UTC
        value = value.replace(tzinfo=datetime.UTC)
    return value.timestamp()


class S3Container(Container):
    #: keys per ListObjectsV2 page (1000 is the S3 maximum)
    list_page_size = 1000

    def __init__(self, backend: S3Backend, name: str) -> None:
        self.name = name
        self._backend = backend

    def _call(self, what: str, fn: str, **kwargs: Any) -> Any:
        try:
            return getattr(self._backend.client, fn)(Bucket=self.name, **kwargs)
        except Exception as exc:
            raise _map_error(
                exc, f"{what} (bucket {self.name})", kwargs.get("Key", ""), self.name
            ) from exc

    @staticmethod
    def _missing(exc: StoreError) -> bool:
        cause = exc.__cause__
        if isinstance(cause, bce.ClientError):
            code, status = _error_code(cause)
            return code in ("NoSuchKey", "NotFound", "404") or status == 404
        return False

    def put(self, name: str, data: bytes) -> None:
        data = bytes(data)
        self._put(name, data, len(data), hashlib.md5(data, usedforsecurity=False))

    def put_file(self, name: str, f: BinaryIO, size: int) -> None:
        # botocore streams a file body (and reads it once more for the SigV4 payload hash)
        self._put(name, f, size, file_md5(f, size))

    def put_new(self, name: str, data: bytes) -> bool:
        """HEAD, then PutObject with ``IfNoneMatch="*"``, then HEAD again: ``True`` only if
        the object carries this call's create id.

        - An object found by the first HEAD: ``False`` without writing. This is also all
          that protects an existing object on a store that ignores ``If-None-Match`` on PUT
          (implementations older than S3's conditional writes may): there an object created
          between our HEAD and our PUT is replaced. Such a store cannot be told apart by its
          answers short of writing a probe object twice, which this backend does not do.
        - 412 PreconditionFailed: ``False``; nothing of this call is stored.
        - 409 ConditionalRequestConflict (AWS: another conditional write of this name was
          in flight, and ours was refused): HEAD again: an object there is the other
          writer's, so ``False``; none means the other write did not complete and it is
          not known who will win, so :class:`StoreUnavailable`, which the retry layer
          answers with a new attempt (a single one here would only move the question).
        - Success: the read-back. On AWS S3 (atomic conditional writes, per its
          documentation; not testable here) it always shows our id unless someone
          overwrote the object unconditionally in between (``False`` then, rightly: the
          object is not ours). On Swift's s3api the condition is checked when the PUT
          starts, not when it commits, exactly as :meth:`SwiftContainer.put_new` explains:
          not atomic against overlapping writers; the read-back makes most overlaps end
          with one ``True``, not all (tested against the SAIO). Whatever is stored is
          always the object of a caller that got ``True``.
        """
        data = bytes(data)
        if self._head(name) is not None:
            return False
        create_id = uuid.uuid4().hex
        try:
            self._put(
                name,
                data,
                len(data),
                hashlib.md5(data, usedforsecurity=False),
                IfNoneMatch="*",
                Metadata={_CREATE_ID_KEY: create_id},
            )
        except StoreError as exc:
            cause = exc.__cause__
            if not isinstance(cause, bce.ClientError):
                raise
            code, status = _error_code(cause)
            if code == "PreconditionFailed" or status == 412:
                return False
            if code == "ConditionalRequestConflict":
                if self._head(name) is not None:
                    return False
                raise StoreUnavailable(
                    f"s3: PUT {name} (bucket {self.name}): a concurrent conditional write of "
                    "the same name did not complete"
                ) from exc
            raise
        resp = self._head(name)
        if resp is None:
            # deleted at once by someone else: not known created; a retry finds out
            raise StoreUnavailable(
                f"s3: PUT {name} (bucket {self.name}): the object was gone right after it "
                "was created"
            )
        return (resp.get("Metadata") or {}).get(_CREATE_ID_KEY) == create_id

    def _put(
        self, name: str, body: bytes | BinaryIO, size: int, md5: Any, **extra: Any
    ) -> None:
        resp = self._call(
            f"PUT {name}",
            "put_object",
            Key=name,
            Body=body,
            ContentLength=size,
            ContentMD5=base64.b64encode(md5.digest()).decode("ascii"),
            ContentType="application/octet-stream",
            **extra,
        )
        etag = (resp.get("ETag") or "").strip('"')
        # an SSE-KMS/SSE-C ETag is not the MD5; those stores verified Content-MD5 already
        if etag and re.fullmatch(r"[0-9a-f]{32}", etag) and etag != md5.hexdigest():
            raise StoreUnavailable(
                f"s3: PUT {name}: ETag {etag} does not match the uploaded data's MD5"
            )

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be non-negative")
        if length == 0:
            if self.head(name) is None:
                raise ObjectNotFound(name, self.name)
            return b""
        kwargs: dict[str, Any] = {"Key": name}
        if length is not None:
            kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            kwargs["Range"] = f"bytes={offset}-"
        try:
            resp = self._call(f"GET {name}", "get_object", **kwargs)
            body = resp["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except StoreError as exc:
            if self._missing(exc):
                raise ObjectNotFound(name, self.name) from None
            cause = exc.__cause__
            if isinstance(cause, bce.ClientError):
                code, status = _error_code(cause)
                if code == "InvalidRange" or status == 416:
                    return b""  # the object exists but the range starts past its end
            raise
        except Exception as exc:
            raise _map_error(exc, f"GET {name} (bucket {self.name})") from exc

    def head(self, name: str) -> int | None:
        resp = self._head(name)
        return None if resp is None else int(resp.get("ContentLength", 0))

    def stat(self, name: str) -> ObjectInfo | None:
        resp = self._head(name)
        if resp is None:
            return None
        return ObjectInfo(name, int(resp.get("ContentLength", 0)), _mtime(resp, name))

    def _head(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call(f"HEAD {name}", "head_object", Key=name)
        except StoreError as exc:
            if self._missing(exc):
                return None
            raise

    def delete(self, name: str) -> None:
        try:
            self._call(f"DELETE {name}", "delete_object", Key=name)
        except StoreError as exc:
            if not self._missing(exc):
                raise

    def list(self, prefix: str = "") -> Iterator[str]:
        for info in self.list_info(prefix):
            yield info.name

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"MaxKeys": self.list_page_size}
            if prefix:
                kwargs["Prefix"] = prefix
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", "list_objects_v2", **kwargs)
            for item in resp.get("Contents", []) or []:
                key = item["Key"]
                yield ObjectInfo(key, int(item.get("Size", 0)), _mtime(item, key))
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")
            if not token:  # a store that truncates without a token: don't loop forever
                raise StoreUnavailable(
                    f"s3: list (bucket {self.name}): truncated listing without a continuation token"
                )


class S3Backend(Backend):
    kind = "s3"

    def __init__(
        self,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        addressing_style: str = "path",
        pool_size: int = 8,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if addressing_style not in ("path", "virtual", "auto"):
            raise ValueError(
                f"s3_addressing_style must be 'path' or 'virtual', not {addressing_style!r}"
            )
        if bool(access_key) != bool(secret_key):
            raise StorePermanentError(
                "s3: set both s3_access_key and s3_secret_key, or neither (to use the AWS "
                "environment)"
            )
        self.endpoint_url = endpoint_url or None
        self.region = region or "us-east-1"
        self.addressing_style = addressing_style
        self._config = Config(
            region_name=self.region,
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            max_pool_connections=max(1, pool_size),
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # only checksum when an operation requires it: s3api, older RGW and MinIO
            # reject or ignore the newer default CRC trailers
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            region_name=self.region,
        )
        # a boto3 client is thread-safe (sessions are not): build it once, here
        self.client = session.client("s3", endpoint_url=self.endpoint_url, config=self._config)
        self._created: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the keys
        return f"S3Backend(endpoint_url={self.endpoint_url!r}, region={self.region!r})"

    def validate_container_name(self, container: str) -> str | None:
        return bucket_name_problem(container)

    def open(self, container: str, create: bool = True) -> Container:
        reason = self.validate_container_name(container)
        if reason:
            raise StorePermanentError(f"invalid bucket name {container!r}: {reason}")
        with self._lock:
            known = container in self._created
        if not known:
            self._ensure_bucket(container, create)
            with self._lock:
                self._created.add(container)
        return S3Container(self, container)

    def _ensure_bucket(self, bucket: str, create: bool) -> None:
        what = f"open bucket {bucket}"
        try:
            self.client.head_bucket(Bucket=bucket)
            return
        except bce.ClientError as exc:
            code, status = _error_code(exc)
            if not (status == 404 or code in ("NoSuchBucket", "NotFound", "404")):
                raise _map_error(exc, what) from exc
        except Exception as exc:
            raise _map_error(exc, what) from exc
        if not create:
            raise StorePermanentError(f"s3: bucket {bucket} does not exist")
        kwargs: dict[str, Any] = {"Bucket": bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except bce.ClientError as exc:
            code, _status = _error_code(exc)
            if code == "BucketAlreadyOwnedByYou":
                return  # created concurrently by us
            if code == "BucketAlreadyExists":
                raise StorePermanentError(
                    f"s3: bucket {bucket} already exists and belongs to another account"
                ) from exc
            raise _map_error(exc, f"create bucket {bucket}") from exc
        except Exception as exc:
            raise _map_error(exc, f"create bucket {bucket}") from exc

    def close(self) -> None:
        self.client.close()
