"""Object storage: one contract, run against the local folder and against S3.

No S3 runs here, so moto's S3 server (``ThreadedMotoServer``, real HTTP on loopback) stands in for it:
boto3 talks to it exactly as it would to AWS or MinIO, signatures, pagination and error bodies included.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict

import boto3
import pytest
from moto.server import ThreadedMotoServer

from integrations.storage import (
    MAX_KEY_LENGTH,
    LocalFolderStorage,
    ObjectNotFound,
    ObjectStorage,
    S3Storage,
    StorageError,
    build_storage,
)


class Credentials(TypedDict):
    access_key: str
    secret_key: str


CREDENTIALS: Credentials = {"access_key": "testing", "secret_key": "testing"}
REGION = "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def make_bucket(endpoint: str) -> str:
    bucket = f"calls-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    client.close()
    return bucket


@pytest.fixture(params=["local", "s3"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStorage]:
    backend: ObjectStorage
    if request.param == "local":
        backend = LocalFolderStorage(tmp_path / "storage")
    else:
        endpoint: str = request.getfixturevalue("s3_endpoint")
        backend = S3Storage(
            make_bucket(endpoint), endpoint_url=endpoint, region=REGION, prefix="voicebook", page_size=2, **CREDENTIALS
        )
    try:
        yield backend
    finally:
        await backend.close()


async def keys(storage: ObjectStorage, prefix: str = "") -> list[str]:
    return [stored.key async for stored in storage.list(prefix)]


# --- the contract, both backends -------------------------------------------------------------------------


async def test_round_trip(storage: ObjectStorage) -> None:
    data = b'{"call_sid": "CA1", "turns": []}'
    stored = await storage.put("calls/CA1/transcript.json", data, content_type="application/json")
    assert stored.key == "calls/CA1/transcript.json"
    assert stored.size == len(data)
    assert stored.stored_at.tzinfo is not None
    assert abs(stored.stored_at - datetime.now(UTC)) < timedelta(minutes=5)
    assert stored.sha256 is not None and len(stored.sha256) == 64
    assert await storage.get("calls/CA1/transcript.json") == data
    [listed] = [item async for item in storage.list()]
    assert (listed.key, listed.size) == ("calls/CA1/transcript.json", len(data))


async def test_empty_object(storage: ObjectStorage) -> None:
    await storage.put("empty", b"", content_type="application/octet-stream")
    assert await storage.get("empty") == b""


async def test_overwrite_replaces_the_object(storage: ObjectStorage) -> None:
    await storage.put("calls/CA1/recording.jsonl", b"first version, longer", content_type="application/x-ndjson")
    stored = await storage.put("calls/CA1/recording.jsonl", b"second", content_type="application/x-ndjson")
    assert stored.size == 6
    assert await storage.get("calls/CA1/recording.jsonl") == b"second"
    assert await keys(storage) == ["calls/CA1/recording.jsonl"]


async def test_get_of_an_absent_key(storage: ObjectStorage) -> None:
    with pytest.raises(ObjectNotFound) as caught:
        await storage.get("calls/CA404/transcript.json")
    assert caught.value.permanent
    assert caught.value.key == "calls/CA404/transcript.json"


async def test_delete_is_idempotent(storage: ObjectStorage) -> None:
    await storage.put("calls/CA1/transcript.json", b"{}", content_type="application/json")
    await storage.put("calls/CA2/transcript.json", b"{}", content_type="application/json")
    assert await storage.delete("calls/CA1/transcript.json") is True
    assert await storage.delete("calls/CA1/transcript.json") is False
    assert await storage.delete("never/stored") is False
    with pytest.raises(ObjectNotFound):
        await storage.get("calls/CA1/transcript.json")
    assert await keys(storage) == ["calls/CA2/transcript.json"]
    # The object can be written again under a key whose folder the delete pruned.
    await storage.put("calls/CA1/transcript.json", b"again", content_type="application/json")
    assert await storage.get("calls/CA1/transcript.json") == b"again"


async def test_listing_by_prefix_across_pages(storage: ObjectStorage) -> None:
    # The S3 backend lists 2 keys a page, so 5 keys take 3 requests.
    names = [f"calls/2025-01-0{day}/CA{day}.json" for day in (3, 1, 5, 2, 4)]
    for name in names:
        await storage.put(name, name.encode(), content_type="application/json")
    await storage.put("other/x.json", b"x", content_type="application/json")
    assert await keys(storage, "calls/") == sorted(names)
    assert await keys(storage, "calls/2025-01-0") == sorted(names)
    assert await keys(storage, "calls/2025-01-03") == ["calls/2025-01-03/CA3.json"]
    assert await keys(storage, "calls/2025-01-03/") == ["calls/2025-01-03/CA3.json"]
    assert await keys(storage, "calls/2025-02") == []
    assert await keys(storage, "nothing/here/") == []
    assert await keys(storage) == [*sorted(names), "other/x.json"]
    sizes = {stored.key: stored.size async for stored in storage.list("calls/")}
    assert sizes == {name: len(name) for name in names}


async def test_older_than_relative_to_now(storage: ObjectStorage) -> None:
    await storage.put("calls/CA1/transcript.json", b"{}", content_type="application/json")
    await storage.put("calls/CA2/transcript.json", b"{}", content_type="application/json")
    await storage.put("other/keep.json", b"{}", content_type="application/json")
    now = datetime.now(UTC)
    everything = await storage.older_than("calls/", now + timedelta(hours=1))
    assert [stored.key for stored in everything] == ["calls/CA1/transcript.json", "calls/CA2/transcript.json"]
    assert await storage.older_than("calls/", now - timedelta(hours=1)) == []
    with pytest.raises(ValueError, match="aware"):
        await storage.older_than("calls/", datetime(2025, 1, 1))  # naive on purpose


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../outside",
        "calls/../../outside",
        "..",
        ".",
        "calls/./x",
        "calls\\x",
        "calls//x",
        "calls/",
        "with space",
        "caf\u00e9",
        "tab\t",
        "new\nline",
        "x" * (MAX_KEY_LENGTH + 1),
    ],
)
async def test_bad_keys_are_refused(storage: ObjectStorage, key: str) -> None:
    with pytest.raises(ValueError):
        await storage.put(key, b"x", content_type="text/plain")
    with pytest.raises(ValueError):
        await storage.get(key)
    with pytest.raises(ValueError):
        await storage.delete(key)
    assert await keys(storage) == []


@pytest.mark.parametrize("prefix", ["/", "/calls", "../", "calls/../", "a\\b", "calls//"])
async def test_bad_prefixes_are_refused(storage: ObjectStorage, prefix: str) -> None:
    with pytest.raises(ValueError):
        await keys(storage, prefix)
    with pytest.raises(ValueError):
        await storage.older_than(prefix, datetime.now(UTC))


async def test_longest_key_is_accepted(storage: ObjectStorage) -> None:
    key = "/".join(["d" * 100] * 5) + "/" + "k" * (MAX_KEY_LENGTH - 505)
    assert len(key) == MAX_KEY_LENGTH
    await storage.put(key, b"long", content_type="text/plain")
    assert await storage.get(key) == b"long"


# --- the local folder ------------------------------------------------------------------------------------


async def test_local_files_are_private_and_nothing_half_written_is_left(tmp_path: Path) -> None:
    storage = LocalFolderStorage(tmp_path / "storage")
    await storage.put("calls/CA1/transcript.json", b"{}", content_type="application/json")
    root = tmp_path / "storage"
    for folder in (root, root / "calls", root / "calls" / "CA1"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    path = root / "calls" / "CA1" / "transcript.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["transcript.json"]


async def test_local_older_than_uses_file_times(tmp_path: Path) -> None:
    storage = LocalFolderStorage(tmp_path)
    base = datetime(2025, 1, 10, tzinfo=UTC)
    for day in (1, 5, 9):
        await storage.put(f"calls/CA{day}.json", b"{}", content_type="application/json")
        moment = (base - timedelta(days=10 - day)).timestamp()
        os.utime(tmp_path / "calls" / f"CA{day}.json", (moment, moment))
    old = await storage.older_than("calls/", base - timedelta(days=3))
    assert [stored.key for stored in old] == ["calls/CA1.json", "calls/CA5.json"]
    assert old[0].stored_at == base - timedelta(days=9)
    assert await storage.older_than("calls/", base - timedelta(days=9)) == []


async def test_local_listing_skips_temporary_and_foreign_files(tmp_path: Path) -> None:
    storage = LocalFolderStorage(tmp_path)
    await storage.put("calls/CA1.json", b"{}", content_type="application/json")
    (tmp_path / "calls" / ".CA2.json.abc~tmp").write_bytes(b"half")  # a write that crashed midway
    (tmp_path / "calls" / "has space.json").write_bytes(b"")
    (tmp_path / "calls" / "link.json").symlink_to(tmp_path / "calls" / "CA1.json")
    assert await keys(storage) == ["calls/CA1.json"]


async def test_local_key_cannot_escape_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "storage"
    root.mkdir()
    (root / "calls").symlink_to(outside)
    storage = LocalFolderStorage(root)
    with pytest.raises(ValueError, match="outside"):
        await storage.put("calls/CA1.json", b"{}", content_type="application/json")
    with pytest.raises(ValueError, match="outside"):
        await storage.get("calls/CA1.json")
    assert list(outside.iterdir()) == []


async def test_local_delete_prunes_emptied_folders_only(tmp_path: Path) -> None:
    storage = LocalFolderStorage(tmp_path / "storage")
    await storage.put("calls/CA1/transcript.json", b"{}", content_type="application/json")
    await storage.put("calls/CA2/transcript.json", b"{}", content_type="application/json")
    assert await storage.delete("calls/CA1/transcript.json")
    assert sorted(os.listdir(tmp_path / "storage" / "calls")) == ["CA2"]
    assert await storage.delete("calls/CA2/transcript.json")
    assert os.listdir(tmp_path / "storage") == []


async def test_local_file_in_the_way_of_a_folder_is_a_permanent_error(tmp_path: Path) -> None:
    storage = LocalFolderStorage(tmp_path)
    await storage.put("calls", b"a file", content_type="text/plain")
    with pytest.raises(StorageError) as caught:
        await storage.put("calls/CA1.json", b"{}", content_type="application/json")
    assert caught.value.permanent
    assert caught.value.key == "calls/CA1.json"
    with pytest.raises(ObjectNotFound):
        await storage.get("calls/CA1.json")


async def test_local_read_only_folder_is_a_permanent_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes through file permissions")
    storage = LocalFolderStorage(tmp_path)
    await storage.put("calls/CA1.json", b"{}", content_type="application/json")
    os.chmod(tmp_path / "calls", 0o500)
    try:
        with pytest.raises(StorageError) as caught:
            await storage.put("calls/CA2.json", b"{}", content_type="application/json")
        assert caught.value.permanent
    finally:
        os.chmod(tmp_path / "calls", 0o700)


# --- S3 --------------------------------------------------------------------------------------------------


async def test_s3_pages_through_list_objects(s3_endpoint: str) -> None:
    storage = S3Storage(make_bucket(s3_endpoint), endpoint_url=s3_endpoint, region=REGION, page_size=2, **CREDENTIALS)
    requests: list[dict[str, Any]] = []
    storage.client.meta.events.register("before-call.s3.ListObjectsV2", lambda params, **_: requests.append(params))
    for number in range(5):
        await storage.put(f"calls/CA{number}.json", b"{}", content_type="application/json")
    assert await keys(storage, "calls/") == [f"calls/CA{number}.json" for number in range(5)]
    assert len(requests) == 3
    await storage.close()


async def test_s3_keys_live_under_the_prefix_with_their_content_type(s3_endpoint: str) -> None:
    bucket = make_bucket(s3_endpoint)
    storage = S3Storage(
        bucket, endpoint_url=s3_endpoint, region=REGION, prefix="/tenant-1/", sse="AES256", **CREDENTIALS
    )
    await storage.put("calls/CA1.json", b"{}", content_type="application/json")
    head = storage.client.head_object(Bucket=bucket, Key="tenant-1/calls/CA1.json")
    assert head["ContentType"] == "application/json"
    assert head["ServerSideEncryption"] == "AES256"
    storage.client.put_object(Bucket=bucket, Key="elsewhere/CA9.json", Body=b"{}")
    assert await keys(storage) == ["calls/CA1.json"]
    assert "tenant-1/" in storage.describe()
    await storage.close()


async def test_s3_missing_bucket_is_permanent(s3_endpoint: str) -> None:
    storage = S3Storage("no-such-bucket-here", endpoint_url=s3_endpoint, region=REGION, **CREDENTIALS)
    with pytest.raises(StorageError) as caught:
        await storage.put("calls/CA1.json", b"{}", content_type="application/json")
    assert caught.value.permanent
    assert "NoSuchBucket" in str(caught.value)
    with pytest.raises(StorageError) as listing:
        await keys(storage)
    assert listing.value.permanent
    assert not isinstance(listing.value, ObjectNotFound)
    await storage.close()


async def test_s3_unreachable_endpoint_is_transient() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    storage = S3Storage(
        "calls",
        endpoint_url=f"http://127.0.0.1:{port}",
        region=REGION,
        connect_timeout=0.5,
        read_timeout=0.5,
        max_attempts=1,
        **CREDENTIALS,
    )
    for attempt in (
        storage.put("calls/CA1.json", b"{}", content_type="application/json"),
        storage.get("calls/CA1.json"),
        storage.delete("calls/CA1.json"),
        keys(storage),
    ):
        with pytest.raises(StorageError) as caught:
            await attempt
        assert not caught.value.permanent
        assert f"127.0.0.1:{port}" in str(caught.value)
    await storage.close()


class RefusingS3(BaseHTTPRequestHandler):
    """Answers every request with one S3 error, as a throttled or locked-down service would."""

    status = 503
    code = "SlowDown"

    def _refuse(self) -> None:
        body = f"<Error><Code>{self.code}</Code><Message>no</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_DELETE = _refuse

    def do_HEAD(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.mark.parametrize(
    ("status", "code", "permanent"),
    [(503, "SlowDown", False), (500, "InternalError", False), (403, "AccessDenied", True)],
)
async def test_s3_service_errors_are_classified(status: int, code: str, permanent: bool) -> None:
    handler = type("Refusing", (RefusingS3,), {"status": status, "code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    storage = S3Storage(
        "calls",
        endpoint_url=f"http://127.0.0.1:{server.server_address[1]}",
        region=REGION,
        max_attempts=1,
        **CREDENTIALS,
    )
    try:
        with pytest.raises(StorageError) as caught:
            await storage.put("calls/CA1.json", b"{}", content_type="application/json")
        assert caught.value.permanent is permanent
        assert code in str(caught.value)
        with pytest.raises(StorageError) as deleting:
            await storage.delete("calls/CA1.json")
        assert deleting.value.permanent is permanent
    finally:
        await storage.close()
        server.shutdown()
        server.server_close()
        thread.join()


def test_s3_describe_names_no_secret() -> None:
    storage = S3Storage(
        "calls", endpoint_url="http://127.0.0.1:9", region="eu-west-1", access_key="AKIDSECRET", secret_key="s3cr3t"
    )
    description = storage.describe()
    assert "calls" in description and "eu-west-1" in description and "127.0.0.1:9" in description
    assert "AKIDSECRET" not in description and "s3cr3t" not in description
    storage.client.close()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"bucket": "Bad_Bucket"}, "bucket"),
        ({"bucket": "ok-bucket", "access_key": "only-one"}, "both"),
        ({"bucket": "ok-bucket", "sse": "rot13"}, "encryption"),
        ({"bucket": "ok-bucket", "page_size": 0}, "page_size"),
        ({"bucket": "ok-bucket", "prefix": "a/../b"}, "key"),
    ],
)
def test_s3_bad_settings_are_refused(arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S3Storage(**arguments)


# --- build_storage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [None, ""])
def test_default_is_a_folder_in_the_data_dir(url: str | None, tmp_path: Path) -> None:
    storage = build_storage(url, tmp_path)
    assert isinstance(storage, LocalFolderStorage)
    assert storage.root == tmp_path / "storage"


def test_file_url(tmp_path: Path) -> None:
    storage = build_storage(f"file://{tmp_path}/my%20calls", Path("unused"))
    assert isinstance(storage, LocalFolderStorage)
    assert storage.root == tmp_path / "my calls"
    assert str(tmp_path) in storage.describe()


def test_s3_url(tmp_path: Path) -> None:
    storage = build_storage(
        "s3://call-archive/voicebook/prod?endpoint_url=http://127.0.0.1:9000&region=eu-west-1&sse=aws:kms", tmp_path
    )
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.sse) == ("call-archive", "voicebook/prod/", "aws:kms")
    assert storage.endpoint_url == "http://127.0.0.1:9000"
    assert storage.client.meta.region_name == "eu-west-1"
    storage.client.close()


async def test_s3_url_takes_credentials_from_the_environment(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    bucket = make_bucket(s3_endpoint)
    storage = build_storage(f"s3://{bucket}/archive?endpoint_url={s3_endpoint}&region={REGION}", tmp_path)
    await storage.put("calls/CA1.json", b"{}", content_type="application/json")
    assert await storage.get("calls/CA1.json") == b"{}"
    assert [stored.key for stored in await storage.older_than("", datetime.now(UTC) + timedelta(days=1))] == [
        "calls/CA1.json"
    ]
    await storage.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/path", "unknown scheme 'ftp'"),
        ("gs://bucket", "unknown scheme 'gs'"),
        ("/srv/storage", "unknown scheme ''"),
        ("file:relative/path", "absolute"),
        ("file://otherhost/srv", "file:///"),
        ("file:///srv?x=1", "file:///"),
        ("s3://", "bucket"),
        ("s3://key:secret@bucket", "credentials"),
        ("s3://bucket?colour=blue", "unknown parameter colour"),
        ("s3://bucket?region=a&region=b", "once"),
        ("s3://bucket?region=", "once"),
        ("s3://bucket?endpoint_url=minio:9000", "http"),
        ("s3://bucket?sse=rot13", "encryption"),
        ("s3://bucket/../x", "key"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        build_storage(url, tmp_path)
    assert "secret" not in str(caught.value)
