"""Local file storage: ids, uploads, multipart, limits, expiry, path safety."""

from __future__ import annotations

import hashlib
import time

import pytest

from pulid_flux.storage.base import (
    KIND_OUTPUT,
    KIND_UPLOAD,
    StorageError,
    expand_file_refs,
    file_ref,
    safe_file_name,
)
from pulid_flux.storage.local import LocalStorage


@pytest.fixture
def st(tmp_path):
    return LocalStorage(tmp_path / "files", max_file_bytes=1000)


def test_put_read_stat_delete(st):
    meta = st.put(b"hello", content_type="text/plain", file_name="../../etc/passwd")
    assert meta.file_name == "passwd" and meta.size == 5
    assert meta.path == f"/files/{meta.id}/passwd"
    assert len(meta.id) >= 24
    assert st.read(meta.id) == b"hello"
    assert st.stat(meta.id).content_type == "text/plain"
    st.delete(meta.id)
    assert st.read(meta.id) is None and st.stat(meta.id) is None


def test_ids_cannot_escape_the_root(st):
    assert st.stat("../../etc") is None
    assert st.read("..") is None
    with pytest.raises(StorageError):
        st.write("../x", b"1")


def test_reserve_then_write(st):
    meta = st.reserve(content_type="image/png", file_name="a.png")
    assert st.read(meta.id) is None  # not readable before the bytes arrive
    st.write(meta.id, b"png")
    assert st.read(meta.id) == b"png"


def test_size_limit(st):
    with pytest.raises(StorageError):
        st.put(b"x" * 1001, content_type="a/b", file_name="big")
    meta = st.reserve(content_type="a/b", file_name="m")
    st.put_part(meta.id, 1, b"x" * 600)
    with pytest.raises(StorageError):
        st.put_part(meta.id, 2, b"x" * 600)


def test_multipart_in_any_order_with_etags(st):
    meta = st.reserve(content_type="a/b", file_name="m.bin")
    e2 = st.put_part(meta.id, 2, b"world")
    e1 = st.put_part(meta.id, 1, b"hello ")
    assert e1 == hashlib.md5(b"hello ").hexdigest()
    done = st.complete_multipart(meta.id, [(2, e2), (1, f'"{e1}"')])
    assert done.size == 11 and st.read(meta.id) == b"hello world"
    meta2 = st.reserve(content_type="a/b", file_name="m.bin")
    st.put_part(meta2.id, 1, b"abc")
    with pytest.raises(StorageError):
        st.complete_multipart(meta2.id, [(1, "wrong")])
    with pytest.raises(StorageError):
        st.complete_multipart(meta2.id, [(1, ""), (2, "")])


def test_expire_by_kind(st):
    up = st.put(b"1", content_type="a/b", file_name="u", kind=KIND_UPLOAD)
    out = st.put(b"2", content_type="a/b", file_name="o", kind=KIND_OUTPUT)
    assert st.expire(KIND_UPLOAD, time.time() - 60) == 0
    assert st.expire(KIND_UPLOAD, time.time() + 1) == 1
    assert st.read(up.id) is None and st.read(out.id) == b"2"


def test_file_refs_expand_to_absolute_urls(st):
    meta = st.put(b"1", content_type="image/jpeg", file_name="x.jpg")
    doc = {"images": [{"url": file_ref(meta)}], "other": "data:image/png;base64,AA"}
    out = expand_file_refs(doc, "https://h:1/")
    assert out["images"][0]["url"] == f"https://h:1/files/{meta.id}/x.jpg"
    assert out["other"] == doc["other"]


def test_safe_file_name():
    assert safe_file_name("a b/c?.png") == "c_.png"
    assert safe_file_name("") == "file.bin"
    assert safe_file_name("..") == "file.bin"
