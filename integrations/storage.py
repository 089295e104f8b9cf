"""Object storage for call transcripts and recordings: a local folder (the default) or an S3-compatible
bucket. Objects are whole byte strings under slash-separated keys; listing is by key prefix, and
``older_than`` gives the retention sweep what to delete.

Pick a backend with ``build_storage(url, data_dir)``:

- no URL (``None`` or ``""``): the folder ``data_dir/storage``
- ``file:///srv/voicebook/storage``: that folder (an absolute path; percent-escapes are decoded)
- ``s3://bucket`` or ``s3://bucket/some/prefix``: that bucket, every key under the prefix. Query
  parameters, all optional: ``endpoint_url`` (an S3-compatible service such as MinIO, R2 or B2; keys are
  then addressed path-style), ``region``, ``sse`` (server-side encryption: ``AES256`` or ``aws:kms``).
  Example: ``s3://calls/voicebook?endpoint_url=https://minio.internal:9000&region=eu-west-1``.
  Credentials never go in the URL: boto3 finds them as usual (``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), unless ``access_key``/``secret_key`` are given.

Keys are checked before any I/O: ASCII letters, digits and ``. _ - /`` only, no empty, ``.`` or ``..``
segment, no leading or trailing slash, at most ``MAX_KEY_LENGTH`` characters. A bad key raises
``ValueError``; it is a bug in the caller, not a storage failure.

An S3 client sends only to its allowlist (:mod:`integrations.egress`): by default the ``endpoint_url``'s
host, or AWS's S3 hosts for the bucket and region (:func:`aws_s3_hosts`); any other request, S3's own
redirects to another region included, is refused before it is sent (a permanent ``StorageError``).

Failures raise ``StorageError`` with ``permanent`` set when retrying cannot help (access denied, no such
bucket, a file where a folder should be); a missing object on ``get`` raises ``ObjectNotFound``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import functools
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
)

from integrations.egress import Allowlist, EgressRefused, guard_botocore
from integrations.metrics import provider_request

if TYPE_CHECKING:
    from types_boto3_s3.client import S3Client

T = TypeVar("T")

MAX_KEY_LENGTH = 512
"""Far below S3's 1,024 bytes, so a bucket prefix still fits, and below common file-name limits."""

_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_PREFIX_CHARS = re.compile(r"[A-Za-z0-9._/-]*")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SSE_ALGORITHMS = frozenset({"AES256", "aws:kms", "aws:kms:dsse"})


class StorageError(RuntimeError):
    """The storage could not do what was asked. ``permanent`` is True when retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool, key: str | None = None) -> None:
        super().__init__(message if key is None else f"{message} (key={key})")
        self.permanent = permanent
        self.key = key


class ObjectNotFound(StorageError):
    """``get`` of a key that holds no object."""

    def __init__(self, key: str, where: str) -> None:
        super().__init__(f"no object in {where}", permanent=True, key=key)


@dataclass(frozen=True, slots=True)
class StoredObject:
    key: str
    size: int
    stored_at: datetime
    """When the object was last written, in UTC (a file's mtime; S3's LastModified, the server's clock)."""
    etag: str | None = None
    """S3's entity tag, without quotes; None for a local file."""
    sha256: str | None = None
    """Hex digest of the content, known right after ``put``; None in listings."""


class ObjectStorage(Protocol):
    async def put(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        """Write the object whole, replacing any object under the key. Readers never see half of it."""
        ...

    async def get(self, key: str) -> bytes:
        """The object's content; ``ObjectNotFound`` when there is none."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the object. False when there was none (deleting twice is fine)."""
        ...

    def list(self, prefix: str = "") -> AsyncIterator[StoredObject]:
        """Objects whose key starts with ``prefix`` (a plain string prefix, as in S3), in key order."""
        ...

    async def older_than(self, prefix: str, cutoff: datetime) -> builtins.list[StoredObject]:
        """Objects under ``prefix`` stored before ``cutoff`` (an aware datetime): the retention sweep's list."""
        ...

    def describe(self) -> str:
        """Where objects go, for logs. Never contains a secret."""
        ...

    async def close(self) -> None: ...


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError("a storage key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"storage key is {len(key)} characters; at most {MAX_KEY_LENGTH} are allowed")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(
                f"bad storage key {key!r}: use letters, digits and . _ - between single slashes,"
                " with no . or .. segment and no leading or trailing slash"
            )
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: like a key, but it may be empty, end with a slash or end in a partial segment."""
    if prefix == "":
        return prefix
    if len(prefix) > MAX_KEY_LENGTH or not _PREFIX_CHARS.fullmatch(prefix):
        raise ValueError(f"bad storage prefix {prefix!r}: use letters, digits and . _ - /")
    *folders, _partial = prefix.split("/")
    if folders:
        validate_key("/".join(folders))
    return prefix


def _aware_cutoff(cutoff: datetime) -> datetime:
    if cutoff.tzinfo is None or cutoff.utcoffset() is None:
        raise ValueError("the cutoff must be an aware datetime (UTC)")
    return cutoff


async def _collect_older(storage: ObjectStorage, prefix: str, cutoff: datetime) -> builtins.list[StoredObject]:
    _aware_cutoff(cutoff)
    return [stored async for stored in storage.list(prefix) if stored.stored_at < cutoff]


# --- a local folder --------------------------------------------------------------------------------------

_PERMANENT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
     errno.ELOOP}
)  # fmt: skip
_TEMP_SUFFIX = "~tmp"
"""Temporary files end in ``~``-something, which no key can, so listings never show a half-written file."""


class LocalFolderStorage:
    """Objects as files under ``root``: key ``calls/CA1/transcript.json`` is ``root/calls/CA1/transcript.json``.

    Writes go to a temporary file in the same folder, are flushed to disk and then renamed over the target,
    so a crash leaves the old object or the new one, never a mix. Files are 0600 and the folders created
    here 0700: transcripts are personal data. ``content_type`` is not kept (the key's suffix says it).
    Deleting the last object in a folder removes the emptied folders up to ``root``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def describe(self) -> str:
        return f"local folder {self.root}"

    async def put(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        validate_key(key)
        return await asyncio.to_thread(self._put, key, bytes(data))

    async def get(self, key: str) -> bytes:
        validate_key(key)
        return await asyncio.to_thread(self._get, key)

    async def delete(self, key: str) -> bool:
        validate_key(key)
        return await asyncio.to_thread(self._delete, key)

    async def list(self, prefix: str = "") -> AsyncIterator[StoredObject]:
        validate_prefix(prefix)
        for stored in await asyncio.to_thread(self._list, prefix):
            yield stored

    async def older_than(self, prefix: str, cutoff: datetime) -> builtins.list[StoredObject]:
        return await _collect_older(self, prefix, cutoff)

    async def close(self) -> None:
        return None

    def _path(self, key: str) -> Path:
        """The file for a valid key, refusing one that a symlink inside the folder would lead outside it."""
        root = self.root.resolve()
        path = root.joinpath(*key.split("/"))
        if not path.resolve().is_relative_to(root):
            raise ValueError(f"storage key {key!r} leads outside {self.root}")
        return path

    def _error(self, error: OSError, action: str, key: str | None) -> StorageError:
        permanent = error.errno in _PERMANENT_ERRNOS
        return StorageError(f"could not {action} in {self.describe()}: {error}", permanent=permanent, key=key)

    def _make_folders(self, folder: Path) -> None:
        missing: builtins.list[Path] = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                if not path.is_dir():
                    raise
                continue
            os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask

    def _put(self, key: str, data: bytes) -> StoredObject:
        path = self._path(key)
        try:
            # A concurrent delete may remove a folder that has just been made (it prunes empty folders):
            # make it again and retry.
            for attempt in range(3):
                self._make_folders(path.parent)
                try:
                    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            try:
                with os.fdopen(fd, "wb") as file:  # mkstemp made it 0600
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            _fsync_folder(path.parent)
            status = path.stat()
        except OSError as error:
            raise self._error(error, "write", key) from error
        return StoredObject(
            key, status.st_size, datetime.fromtimestamp(status.st_mtime, UTC), sha256=hashlib.sha256(data).hexdigest()
        )

    def _get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key, self.describe()) from None
        except OSError as error:
            raise self._error(error, "read", key) from error

    def _delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            if path.is_dir():
                return False
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as error:
            raise self._error(error, "delete", key) from error
        root = self.root.resolve()
        folder = path.parent
        while folder != root and folder.is_relative_to(root):
            try:
                folder.rmdir()  # only succeeds when empty, so a folder another object lives in stays
            except OSError:
                break
            folder = folder.parent
        return True

    def _list(self, prefix: str) -> builtins.list[StoredObject]:
        root = self.root.resolve()
        folder, _, _partial = prefix.rpartition("/")
        start = root.joinpath(*folder.split("/")) if folder else root
        found: builtins.list[StoredObject] = []
        try:
            for relative, status in _walk_files(start, root):
                key = relative.as_posix()
                if key.startswith(prefix) and _is_key(key):
                    found.append(StoredObject(key, status.st_size, datetime.fromtimestamp(status.st_mtime, UTC)))
        except OSError as error:
            raise self._error(error, "list", None) from error
        found.sort(key=lambda stored: stored.key)
        return found


def _walk_files(start: Path, root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Regular files under ``start`` (symlinks are not followed), with paths relative to ``root``."""
    try:
        entries = builtins.list(os.scandir(start))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_files(Path(entry.path), root)
        elif entry.is_file(follow_symlinks=False):
            try:
                status = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted while we looked
                continue
            yield Path(entry.path).relative_to(root), status


def _is_key(key: str) -> bool:
    try:
        validate_key(key)
    except ValueError:
        return False
    return True


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX; Windows has no directory handles to sync)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- an S3-compatible bucket ----------------------------------------------------------------------------

_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout", "InternalError",
     "ServiceUnavailable", "RequestTimeTooSkewed"}
)  # fmt: skip
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})


class S3Storage:
    """Objects in an S3 bucket (or an S3-compatible service at ``endpoint_url``), each key under ``prefix``.

    boto3 blocks, so every request runs in a worker thread; the client is thread-safe and made once.
    botocore retries throttling, 5xx and connection errors itself (standard mode, ``max_attempts`` tries
    in all) before an error reaches us. ``page_size`` is the MaxKeys of each ListObjectsV2 request.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "",
        sse: str | None = None,
        page_size: int = 1000,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
        egress: Allowlist | None = None,
    ) -> None:
        if not _BUCKET.fullmatch(bucket):
            raise ValueError(f"bad bucket name {bucket!r}: 3 to 63 lower-case letters, digits, dots and hyphens")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither (to use boto3's usual sources)")
        if sse is not None and sse not in SSE_ALGORITHMS:
            raise ValueError(f"unknown server-side encryption {sse!r}; use one of {sorted(SSE_ALGORITHMS)}")
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url
        self.sse = sse
        self.page_size = page_size
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
        )
        if endpoint_url:
            # Services other than AWS: path-style addressing (no bucket in the host name) and checksums only
            # where S3 demands them, since several reject the CRC headers newer botocore sends by default.
            config = config.merge(
                Config(
                    s3={"addressing_style": "path"},
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
            )
        session = boto3.session.Session(
            aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
        )
        self.client: S3Client = session.client("s3", endpoint_url=endpoint_url, config=config)
        """The boto3 client, for event hooks (metrics, tests); requests go through the methods above."""
        self.egress = egress or Allowlist.of(
            [endpoint_url] if endpoint_url else aws_s3_hosts(bucket, self.client.meta.region_name)
        )
        """Where the client may send (module doc); the region is the client's, however boto3 found it."""
        guard_botocore(self.client, self.egress)

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        region = self.client.meta.region_name
        return f"s3 bucket {self.bucket}{'/' + self.prefix if self.prefix else ''}{where} (region {region})"

    async def put(self, key: str, data: bytes, *, content_type: str) -> StoredObject:
        validate_key(key)
        data = bytes(data)

        def put() -> StoredObject:
            extra: dict[str, Any] = {"ServerSideEncryption": self.sse} if self.sse else {}
            response = self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentType=content_type, **extra
            )
            return StoredObject(
                key,
                len(data),
                _response_date(response["ResponseMetadata"].get("HTTPHeaders", {})),
                etag=response.get("ETag", "").strip('"') or None,
                sha256=hashlib.sha256(data).hexdigest(),
            )

        return await self._call("write", key, put)

    async def get(self, key: str) -> bytes:
        validate_key(key)

        def get() -> bytes:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
            try:
                return body.read()
            finally:
                body.close()

        return await self._call("read", key, get)

    async def delete(self, key: str) -> bool:
        """S3 deletes silently whether or not the object exists, so a HEAD asks first; with two deletes
        racing, both may answer True."""
        validate_key(key)

        def delete() -> bool:
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in _NOT_FOUND_CODES:
                    return False
                raise
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
            return True

        return await self._call("delete", key, delete)

    async def list(self, prefix: str = "") -> AsyncIterator[StoredObject]:
        validate_prefix(prefix)
        token: str | None = None
        while True:
            page, token = await self._call("list", None, functools.partial(self._list_page, prefix, token))
            for stored in page:
                yield stored
            if token is None:
                return

    def _list_page(self, prefix: str, token: str | None) -> tuple[builtins.list[StoredObject], str | None]:
        extra: dict[str, Any] = {"ContinuationToken": token} if token else {}
        response = self.client.list_objects_v2(
            Bucket=self.bucket, Prefix=self.prefix + prefix, MaxKeys=self.page_size, **extra
        )
        page = [
            StoredObject(
                item["Key"].removeprefix(self.prefix),
                item.get("Size", 0),
                item["LastModified"].astimezone(UTC),
                etag=item.get("ETag", "").strip('"') or None,
            )
            for item in response.get("Contents", [])
            if "Key" in item and "LastModified" in item
        ]
        return page, response.get("NextContinuationToken") if response.get("IsTruncated") else None

    async def older_than(self, prefix: str, cutoff: datetime) -> builtins.list[StoredObject]:
        return await _collect_older(self, prefix, cutoff)

    async def close(self) -> None:
        self.client.close()

    async def _call(self, action: str, key: str | None, request: Callable[[], T]) -> T:
        try:
            with provider_request("storage", action):  # S3 only: the local folder is not a provider
                result = await asyncio.to_thread(request)
        except ClientError as error:
            details = error.response.get("Error", {})
            code = str(details.get("Code", ""))
            if key is not None and action == "read" and code in _NOT_FOUND_CODES:
                raise ObjectNotFound(key, self.describe()) from None
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            transient = status >= 500 or status == 429 or code in _TRANSIENT_CODES
            raise StorageError(
                f"{self.describe()} refused to {action}: {code or status} {details.get('Message', '')}".rstrip(),
                permanent=not transient,
                key=key,
            ) from error
        except EgressRefused as error:
            raise StorageError(f"{self.describe()}: {error}", permanent=True, key=key) from error
        except BotoCoreError as error:
            transient = isinstance(
                error, ConnectionError | HTTPClientError | IncompleteReadError | CredentialRetrievalError
            )
            raise StorageError(
                f"could not {action} in {self.describe()}: {error}", permanent=not transient, key=key
            ) from error
        return result


def aws_s3_hosts(bucket: str, region: str) -> tuple[str, str, str, str]:
    """The hosts botocore addresses ``bucket`` at on AWS in ``region``: virtual-hosted and path style, at
    the regional endpoint and at the global one (us-east-1's, and the one botocore starts from before
    S3 names a bucket's region)."""
    return (
        f"{bucket}.s3.{region}.amazonaws.com",
        f"s3.{region}.amazonaws.com",
        f"{bucket}.s3.amazonaws.com",
        "s3.amazonaws.com",
    )


def _response_date(headers: dict[str, str]) -> datetime:
    """The server's time of a response (its Date header), to match the LastModified a listing will show."""
    try:
        return parsedate_to_datetime(headers["date"]).astimezone(UTC)
    except (KeyError, TypeError, ValueError):
        return datetime.now(UTC)


# --- choosing one ---------------------------------------------------------------------------------------

_S3_PARAMETERS = frozenset({"endpoint_url", "region", "sse"})


def build_storage(
    url: str | None, data_dir: Path, *, access_key: str | None = None, secret_key: str | None = None
) -> ObjectStorage:
    """The storage a URL names (the formats are in the module's docstring). Raises ValueError naming
    what is wrong with the URL."""
    if not url:
        return LocalFolderStorage(Path(data_dir) / "storage")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ValueError(f"storage URL {url!r}: write a folder as file:///absolute/path")
        path = Path(unquote(parts.path))
        if not parts.path.startswith("/") or not path.is_absolute():
            raise ValueError(f"storage URL {url!r}: the folder must be an absolute path (file:///...)")
        return LocalFolderStorage(path)
    if scheme == "s3":
        if "@" in parts.netloc:
            raise ValueError(
                "storage URL: credentials do not go in the URL; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if parts.fragment:
            raise ValueError(f"storage URL {url!r}: a fragment (#...) means nothing here")
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(query) - _S3_PARAMETERS)
        if unknown:
            raise ValueError(
                f"storage URL {url!r}: unknown parameter {', '.join(unknown)}; known: {sorted(_S3_PARAMETERS)}"
            )
        single: dict[str, str] = {}
        for name, values in query.items():
            if len(values) != 1 or not values[0]:
                raise ValueError(f"storage URL {url!r}: give {name} once, with a value")
            single[name] = values[0]
        endpoint_url = single.get("endpoint_url")
        if endpoint_url is not None:
            endpoint = urlsplit(endpoint_url)
            if endpoint.scheme not in ("http", "https") or not endpoint.netloc:
                raise ValueError(f"storage URL {url!r}: endpoint_url must be an http:// or https:// URL")
        if not parts.netloc:
            raise ValueError(f"storage URL {url!r}: name the bucket (s3://bucket/prefix)")
        return S3Storage(
            parts.netloc,
            endpoint_url=endpoint_url,
            region=single.get("region"),
            sse=single.get("sse"),
            prefix=unquote(parts.path),
            access_key=access_key,
            secret_key=secret_key,
        )
    raise ValueError(f"storage URL {url!r}: unknown scheme {parts.scheme!r}; use file:// or s3://")
