"""One behavioural contract for every storage backend: local files and S3 (moto in server mode).

The S3 backend talks HTTP to a real S3-compatible server started here on a free loopback
port, exactly as it would talk to MinIO or AWS.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid

import httpx
import pytest
from loopback import free_port

from pulid_flux.storage.base import (
    KIND_INPUT,
    KIND_OUTPUT,
    KIND_UPLOAD,
    FileFinished,
    FileTooLarge,
    StorageError,
    UnknownFile,
)

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


class MotoS3:
    """moto's S3 in server mode on a loopback port (also used by test_scale_out)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 call otherwise
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        self.server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.endpoint, timeout=2)
                return self
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(self) -> str:
        name = f"bucket-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def moto_s3():
    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def make_storage(request, tmp_path):
    def make(**kw):
        if request.param == "local":
            from pulid_flux.storage.local import LocalStorage

            return LocalStorage(tmp_path / "files", **kw)
        from pulid_flux.storage.s3 import S3Storage

        s3 = request.getfixturevalue("moto_s3")
        return S3Storage.from_url(f"s3://{s3.make_bucket()}/some/prefix",
                                  endpoint_url=s3.endpoint, region="us-east-1",
                                  access_key_id="testing", secret_access_key="testing", **kw)

    make.kind = request.param
    return make


@pytest.fixture
def st(make_storage):
    return make_storage(max_file_bytes=1000)


def test_put_read_stat_delete(st):
    meta = st.put(b"hello", content_type="text/plain", file_name="../../etc/passwd",
                  kind=KIND_OUTPUT, owner="alice")
    assert meta.file_name == "passwd" and meta.size == 5 and meta.complete
    assert meta.path == f"/files/{meta.id}/passwd"
    got = st.stat(meta.id)
    assert (got.content_type, got.kind, got.owner, got.size) == ("text/plain", KIND_OUTPUT, "alice", 5)
    assert st.read(meta.id) == b"hello"
    st.delete(meta.id)
    assert st.stat(meta.id) is None and st.read(meta.id) is None
    st.delete(meta.id)  # deleting twice is fine


def test_invalid_ids_are_refused(st):
    for bad in ("../x", "a/b", "", "short", "x" * 65):
        assert st.stat(bad) is None and st.read(bad) is None
        st.delete(bad)
        with pytest.raises(StorageError):
            st.write(bad, b"x")


def test_reserve_then_write(st):
    meta = st.reserve(content_type="image/png", file_name="a.png")
    assert not meta.complete and st.read(meta.id) is None
    assert st.stat(meta.id).complete is False
    done = st.write(meta.id, b"\x89PNG")
    assert done.complete and done.size == 4 and st.read(meta.id) == b"\x89PNG"
    with pytest.raises(StorageError):
        st.write("A" * 24, b"unknown id")


def test_size_limit(st):
    with pytest.raises(StorageError):
        st.put(b"x" * 1001, content_type="a/b", file_name="big")
    meta = st.reserve(content_type="a/b", file_name="big")
    with pytest.raises(StorageError):
        st.write(meta.id, b"x" * 1001)
    st.put_part(meta.id, 1, b"x" * 600)
    with pytest.raises(StorageError):
        st.put_part(meta.id, 2, b"x" * 600)  # 1200 in all
    st.put_part(meta.id, 1, b"x" * 300)  # replacing a part frees its size
    st.put_part(meta.id, 2, b"x" * 600)


def test_multipart_in_any_order_with_etags(make_storage):
    st = make_storage(max_parts=5)
    meta = st.reserve(content_type="application/octet-stream", file_name="big.bin")
    chunks = [os.urandom(1000 + i) for i in range(3)]
    etags = {}
    for n in (3, 1, 2):
        etags[n] = st.put_part(meta.id, n, chunks[n - 1])
        assert etags[n] == hashlib.md5(chunks[n - 1]).hexdigest()
    with pytest.raises(StorageError):
        st.put_part(meta.id, 6, b"x")  # beyond max_parts
    with pytest.raises(StorageError):
        st.complete_multipart(meta.id, [(1, etags[1]), (2, "bad"), (3, etags[3])])
    with pytest.raises(StorageError):
        st.complete_multipart(meta.id, [(1, etags[1]), (4, "")])  # never uploaded
    for listed in ([(1, etags[1]), (2, etags[2]), (1, etags[1])],  # each part once
                   [(0, ""), (1, etags[1])], []):
        with pytest.raises(StorageError):
            st.complete_multipart(meta.id, listed)
    # Listed in any order (parallel parts finish so), joined in ascending order.
    done = st.complete_multipart(meta.id, [(2, f'"{etags[2]}"'), (1, etags[1]), (3, etags[3])])
    assert done.complete and done.size == sum(map(len, chunks))
    assert st.read(meta.id) == b"".join(chunks)
    with pytest.raises(UnknownFile):
        st.put_part("B" * 24, 1, b"unknown upload")
    # Finished files are immutable, whichever way a write comes.
    for write in (lambda: st.put_part(meta.id, 1, b"again"), lambda: st.write(meta.id, b"again"),
                  lambda: st.complete_multipart(meta.id, [(1, etags[1])])):
        with pytest.raises(FileFinished):
            write()
    assert st.read(meta.id) == b"".join(chunks)


def test_streamed_writes_hold_the_limit_and_leave_nothing_on_abort(make_storage):
    st = make_storage(max_file_bytes=3000)
    meta = st.reserve(content_type="text/html", file_name="page.html")
    writer = st.open_write(meta.id)
    writer.write(b"<html>" + b"x" * 1000)
    with pytest.raises(FileTooLarge):
        writer.write(b"y" * 2500)
    writer.abort()
    assert st.read(meta.id) is None and not st.stat(meta.id).complete
    writer = st.open_write(meta.id)
    for _ in range(3):
        writer.write(b"z" * 1000)
    assert writer.close().size == 3000 and st.read(meta.id) == b"z" * 3000


def test_multipart_over_the_limit_keeps_nothing(make_storage):
    st = make_storage(max_file_bytes=3000)
    meta = st.reserve(content_type="a/b", file_name="big.bin")
    parts = [(n, st.put_part(meta.id, n, b"p" * 1000)) for n in (1, 2, 3)]
    with pytest.raises(FileTooLarge):
        st.put_part(meta.id, 4, b"p")  # the parts together stay within the limit
    assert st.complete_multipart(meta.id, parts).size == 3000
    # Parts uploaded at once can each pass; the completion catches the total.
    other = st.reserve(content_type="a/b", file_name="big.bin")
    st.max_file_bytes = 10_000
    parts = [(n, st.put_part(other.id, n, b"q" * 2000)) for n in (1, 2)]
    st.max_file_bytes = 3000
    with pytest.raises(FileTooLarge):
        st.complete_multipart(other.id, parts)
    assert st.stat(other.id) is None


def test_s3_streams_large_writes_as_multipart_uploads(moto_s3):
    """Beyond one buffer a write goes out in parts; an abort leaves no object and no upload."""
    from pulid_flux.storage.s3 import S3_BUFFER_BYTES, S3Storage

    bucket = moto_s3.make_bucket()
    st = S3Storage.from_url(f"s3://{bucket}", endpoint_url=moto_s3.endpoint, region="us-east-1")
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(S3_BUFFER_BYTES + 1024 * 1024)
    meta = st.reserve(content_type="text/html", file_name="big.png")
    writer = st.open_write(meta.id)
    for i in range(0, len(data), 1024 * 1024):
        writer.write(data[i:i + 1024 * 1024])
    assert writer.upload_id is not None  # the first 8 MiB already left this process
    assert writer.close().size == len(data) and st.read(meta.id) == data
    assert httpx.get(st.file_url(meta)).headers["content-type"] == "image/png"

    other = st.reserve(content_type="a/b", file_name="gone.bin")
    writer = st.open_write(other.id)
    writer.write(os.urandom(S3_BUFFER_BYTES + 1))
    writer.abort()
    assert st.read(other.id) is None
    assert not moto_s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_stored_objects_carry_headers_from_their_bytes(moto_s3):
    """The store serves S3 files itself: their type comes from the bytes, not the declaration."""
    from pulid_flux.storage.s3 import S3Storage

    st = S3Storage.from_url(f"s3://{moto_s3.make_bucket()}", endpoint_url=moto_s3.endpoint,
                            region="us-east-1")
    png = b"\x89PNG\r\n\x1a\n" + b"\0" * 40
    page = st.put(b"<script>alert(1)</script>", content_type="text/html", file_name="x.html")
    image = st.put(png, content_type="text/html", file_name="y.png")
    for meta, ctype, disposition in ((page, "application/octet-stream", "attachment"),
                                     (image, "image/png", "inline")):
        r = httpx.get(st.file_url(meta))
        assert r.headers["content-type"] == ctype
        assert r.headers["content-disposition"].startswith(disposition)


def test_expire_by_kind_and_age(st):
    old_upload = st.put(b"1", content_type="a/b", file_name="u", kind=KIND_UPLOAD)
    output = st.put(b"2", content_type="a/b", file_name="o", kind=KIND_OUTPUT)
    reserved = st.reserve(content_type="a/b", file_name="r", kind=KIND_UPLOAD)
    time.sleep(0.05)
    cutoff = time.time()
    new_upload = st.put(b"3", content_type="a/b", file_name="n", kind=KIND_INPUT)
    assert st.expire(KIND_UPLOAD, cutoff) == 2
    assert st.stat(old_upload.id) is None and st.stat(reserved.id) is None
    assert st.read(output.id) == b"2" and st.read(new_upload.id) == b"3"
    assert st.expire(KIND_UPLOAD, cutoff) == 0


def test_files_with_their_own_expiry_go_sooner(st):
    now = time.time()
    soon = st.put(b"1", content_type="a/b", file_name="s", kind=KIND_UPLOAD, expires_at=now + 60)
    reserved = st.reserve(content_type="a/b", file_name="r", kind=KIND_UPLOAD, expires_at=now + 120)
    plain = st.put(b"2", content_type="a/b", file_name="p", kind=KIND_UPLOAD)
    output = st.put(b"3", content_type="a/b", file_name="o", kind=KIND_OUTPUT, expires_at=now + 1)
    assert st.stat(soon.id).expires_at == now + 60
    long_ago = now - 3600  # the kind's own retention has not run out for any of them
    assert st.expire(KIND_UPLOAD, long_ago, now=now + 59) == 0
    assert st.expire(KIND_UPLOAD, long_ago, now=now + 61) == 1
    assert st.stat(soon.id) is None and st.stat(reserved.id) is not None
    assert st.expire(KIND_UPLOAD, long_ago, now=now + 121) == 1
    assert st.stat(reserved.id) is None
    assert st.read(plain.id) == b"2" and st.read(output.id) == b"3"  # other kinds wait for theirs
    assert st.expire(KIND_OUTPUT, long_ago, now=now + 2) == 1
    assert st.expire(KIND_UPLOAD, time.time() + 1) == 1  # the plain one, by age


def test_s3_urls_are_presigned_or_public_and_resolve_back(moto_s3):
    from pulid_flux.storage.s3 import S3Storage

    bucket = moto_s3.make_bucket()
    st = S3Storage.from_url(f"s3://{bucket}/p", endpoint_url=moto_s3.endpoint, region="us-east-1",
                            presign_expiry_s=120)
    meta = st.put(b"\xff\xd8\xff jpeg bytes", content_type="image/jpeg", file_name="out.jpg")
    url = st.file_url(meta)
    assert "X-Amz-Expires=120" in url and "X-Amz-Signature=" in url
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.content == b"\xff\xd8\xff jpeg bytes"
    assert r.headers["content-type"] == "image/jpeg"
    assert st.file_id_from_url(url) == meta.id
    via_path = st.url_for_path(meta.path)
    assert st.file_id_from_url(via_path) == meta.id
    assert httpx.get(via_path, timeout=10).content == b"\xff\xd8\xff jpeg bytes"
    assert st.url_for_path("/files/../x") is None
    assert st.file_id_from_url(f"http://elsewhere.example/{bucket}/p/{meta.id}/out.jpg") is None
    assert st.file_id_from_url(f"{moto_s3.endpoint}/{bucket}/p/{meta.id}/meta.json") is None
    # The objects are where an operator expects them.
    keys = {o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"p/{meta.id}/out.jpg" in keys and f"p/{meta.id}/meta.json" in keys

    public = S3Storage.from_url(f"s3://{bucket}/p", endpoint_url=moto_s3.endpoint,
                                region="us-east-1", public_base_url="https://cdn.example.com/")
    assert public.file_url(meta) == f"https://cdn.example.com/p/{meta.id}/out.jpg"
    assert public.file_id_from_url(f"https://cdn.example.com/p/{meta.id}/out.jpg") == meta.id


def test_s3_large_multipart_is_joined_in_the_store(moto_s3):
    from pulid_flux.storage.s3 import S3Storage

    bucket = moto_s3.make_bucket()
    st = S3Storage.from_url(f"s3://{bucket}", endpoint_url=moto_s3.endpoint, region="us-east-1")
    meta = st.reserve(content_type="application/octet-stream", file_name="big.bin")
    a, b = os.urandom(5 * 1024 * 1024), os.urandom(1234)
    parts = [(1, st.put_part(meta.id, 1, a)), (2, st.put_part(meta.id, 2, b))]
    assert st.complete_multipart(meta.id, parts).size == len(a) + len(b)
    assert st.read(meta.id) == a + b
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert not any("/parts/" in k for k in keys)  # parts are removed once joined


def test_open_storage_and_open_queue_pick_backends(tmp_path, moto_s3):
    from pulid_flux.config import Settings
    from pulid_flux.queue import open_queue
    from pulid_flux.queue.sqlite import SQLiteQueue
    from pulid_flux.storage import open_storage
    from pulid_flux.storage.local import LocalStorage
    from pulid_flux.storage.s3 import S3Storage

    settings = Settings(data_dir=tmp_path / "data")
    assert isinstance(open_storage(None, settings), LocalStorage)
    local = open_storage(f"file://{tmp_path}/elsewhere", settings)
    assert isinstance(local, LocalStorage) and local.root == tmp_path / "elsewhere"
    s3 = open_storage("s3://bucket-x/a/b", settings)
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket-x", "a/b/")
    assert isinstance(open_queue(None, settings), SQLiteQueue)
    q = open_queue(f"sqlite://{tmp_path}/q.db", settings)
    assert isinstance(q, SQLiteQueue) and q.path == tmp_path / "q.db"
    with pytest.raises(ValueError):
        open_storage("ftp://x", settings)
    with pytest.raises(ValueError):
        open_queue("amqp://x", settings)
