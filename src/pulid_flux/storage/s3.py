"""Storage in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, GCS interop, Ceph RGW).

Object layout under ``s3://BUCKET/PREFIX``:

* ``PREFIX<id>/<file_name>``  the bytes (with their Content-Type), so public URLs end in the name.
* ``PREFIX<id>/meta.json``     the ``StoredFile`` record (written last: a file without it is
                               incomplete or a crash leftover).
* ``PREFIX<id>/parts/<n>``     multipart parts until the upload completes, each with
                               ``parts/<n>.md5`` (its ETag) written once the part is whole.
* ``PREFIX_index/<kind>/<created-ms>-<id>``  empty objects listed in time order, so expiry
                               never lists the whole bucket.

Each file object carries the Content-Type and Content-Disposition decided from its first bytes
(``served_headers``), never the uploader's declared type, since the store serves it directly.

URLs handed to clients are presigned GET URLs (``presign_expiry_s``) or, with
``public_base_url`` (a CDN or a public bucket), ``public_base_url/<key>``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Optional
from urllib.parse import quote, unquote, urlsplit

from .base import (
    FILE_ID_RE,
    KIND_UPLOAD,
    SNIFF_BYTES,
    FileTooLarge,
    FileWriter,
    Storage,
    StorageError,
    StoredFile,
    check_part_list,
    served_headers,
)

# S3 refuses multipart parts below 5 MiB (except the last); smaller uploads are joined here.
S3_MIN_PART_BYTES = 5 * 1024 * 1024
# Bytes a writer holds before it sends them on as one part of an S3 multipart upload.
S3_BUFFER_BYTES = 8 * 1024 * 1024
INDEX_DIR = "_index"
EXPIRING = "_expiring"  # index of files with an expiry time of their own


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix/``)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://BUCKET[/PREFIX] URL: {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, (prefix + "/") if prefix else ""


class _S3Writer(FileWriter):
    """Streams into one object: held in memory up to ``S3_BUFFER_BYTES``, sent on as parts of
    an S3 multipart upload beyond that. ``served_name``: the object is a file to serve (its
    headers come from its first bytes), not a part."""

    def __init__(self, store: "S3Storage", key: str, limit, finish, served_name: Optional[str]):
        super().__init__(limit)
        self.store, self.key, self._finish, self.served_name = store, key, finish, served_name
        self.buffer = bytearray()
        self.upload_id: Optional[str] = None
        self.done: list[dict] = []

    def _object_args(self) -> dict:
        if self.served_name is None:
            return {}
        headers = served_headers(bytes(self.buffer[:SNIFF_BYTES]), self.served_name)
        return {"ContentType": headers["Content-Type"],
                "ContentDisposition": headers["Content-Disposition"]}

    def _write(self, chunk: bytes) -> None:
        self.buffer += chunk
        if len(self.buffer) >= S3_BUFFER_BYTES:
            self._send(S3_BUFFER_BYTES)

    def _send(self, n: int) -> None:
        s3, bucket = self.store.s3, self.store.bucket
        if self.upload_id is None:
            self.upload_id = s3.create_multipart_upload(Bucket=bucket, Key=self.key,
                                                        **self._object_args())["UploadId"]
        number = len(self.done) + 1
        r = s3.upload_part(Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                           PartNumber=number, Body=bytes(self.buffer[:n]))
        self.done.append({"PartNumber": number, "ETag": r["ETag"]})
        del self.buffer[:n]

    def close(self):
        s3, bucket = self.store.s3, self.store.bucket
        if self.upload_id is None:
            s3.put_object(Bucket=bucket, Key=self.key, Body=bytes(self.buffer), **self._object_args())
        else:
            if self.buffer:
                self._send(len(self.buffer))
            s3.complete_multipart_upload(Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                                         MultipartUpload={"Parts": self.done})
        self.buffer = bytearray()
        return self._finish(self)

    def abort(self) -> None:
        self.buffer = bytearray()
        if self.upload_id is not None:
            self.store.s3.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                 UploadId=self.upload_id)


class S3Storage(Storage):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: Optional[str] = None,
                 region: Optional[str] = None, access_key_id: Optional[str] = None,
                 secret_access_key: Optional[str] = None, addressing_style: str = "auto",
                 presign_expiry_s: float = 3600.0, public_base_url: Optional[str] = None,
                 max_file_bytes: Optional[int] = None, max_parts: int = 10000,
                 timeout_s: float = 30.0, max_retries: int = 5, max_pool_connections: int = 32,
                 client=None):
        self.bucket = bucket
        self.prefix = prefix
        self.presign_expiry_s = int(presign_expiry_s)
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.max_file_bytes = max_file_bytes
        self.max_parts = max_parts
        self.endpoint_url = endpoint_url
        if client is None:
            import boto3
            from botocore.config import Config

            # Credentials: explicit ones, else boto3's chain (AWS_* env, profiles, instance roles).
            session = boto3.session.Session(aws_access_key_id=access_key_id,
                                            aws_secret_access_key=secret_access_key,
                                            region_name=region)
            client = session.client(
                "s3", endpoint_url=endpoint_url,
                config=Config(s3={"addressing_style": addressing_style}, signature_version="s3v4",
                              retries={"max_attempts": max_retries, "mode": "standard"},
                              connect_timeout=timeout_s, read_timeout=timeout_s,
                              max_pool_connections=max_pool_connections))
        self.s3 = client

    @classmethod
    def from_url(cls, url: str, **kwargs) -> "S3Storage":
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kwargs)

    # --- keys -----------------------------------------------------------------------------
    def _base(self, file_id: str) -> str:
        # The id comes from URLs: refuse anything that could name another key.
        if not FILE_ID_RE.match(file_id or ""):
            raise StorageError("invalid file id")
        return f"{self.prefix}{file_id}/"

    def _meta_key(self, file_id: str) -> str:
        return self._base(file_id) + "meta.json"

    def _data_key(self, meta: StoredFile) -> str:
        return self._base(meta.id) + meta.file_name

    def _part_key(self, file_id: str, number: int) -> str:
        return self._base(file_id) + f"parts/{number:05d}"

    def _index_keys(self, meta: StoredFile) -> list[str]:
        """Expiry's entries for the file, listed in time order: by creation under its kind, and
        by its own expiry time when it has one."""
        entries = [(meta.kind, meta.created_at)]
        if meta.expires_at is not None:
            entries.append((EXPIRING, meta.expires_at))
        return [f"{self.prefix}{INDEX_DIR}/{index}/{int(t * 1000):013d}-{meta.id}" for index, t in entries]

    def _write_index(self, meta: StoredFile) -> None:
        for key in self._index_keys(meta):
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=b"")

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _missing(exc) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("NoSuchKey", "404", "NotFound", "NoSuchUpload")

    def _write_meta(self, meta: StoredFile) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._meta_key(meta.id),
                           Body=json.dumps(asdict(meta)).encode(), ContentType="application/json")

    def _list(self, prefix: str):
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                      Prefix=prefix):
            yield from page.get("Contents", [])

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys per call
            chunk = keys[i:i + 1000]
            if chunk:
                self.s3.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": k} for k in chunk], "Quiet": True})

    # --- Storage --------------------------------------------------------------------------
    def reserve(self, *, content_type, file_name, kind=KIND_UPLOAD, owner="",
                expires_at=None) -> StoredFile:
        meta = StoredFile.new(content_type=content_type, file_name=file_name, kind=kind, owner=owner,
                              expires_at=expires_at)
        # Index first: a crash after it leaves something expiry can find and remove.
        self._write_index(meta)
        self._write_meta(meta)
        return meta

    def open_write(self, file_id) -> FileWriter:
        meta = self._unfinished(file_id)

        def finish(writer: _S3Writer) -> StoredFile:
            meta.size = writer.size
            meta.complete = True
            self._write_meta(meta)
            return meta

        return _S3Writer(self, self._data_key(meta), self.max_file_bytes, finish, meta.file_name)

    def _part_sizes(self, file_id: str) -> dict[int, tuple[int, Optional[str]]]:
        """Whole parts: number → (size, key of its MD5 record)."""
        objects = {o["Key"].rsplit("/", 1)[-1]: o for o in self._list(self._base(file_id) + "parts/")}
        return {int(name): (o["Size"], self._base(file_id) + f"parts/{name}.md5")
                for name, o in objects.items() if name.isdigit() and f"{name}.md5" in objects}

    def open_part(self, file_id, part_number) -> FileWriter:
        self._unfinished(file_id)
        if not 1 <= part_number <= self.max_parts:
            raise StorageError(f"part number must be 1..{self.max_parts}")
        others = sum(size for n, (size, _) in self._part_sizes(file_id).items() if n != part_number)
        limit = None if self.max_file_bytes is None else max(0, self.max_file_bytes - others)
        key = self._part_key(file_id, part_number)
        # The MD5 is our ETag (a provider's own is not always the MD5: SSE-KMS, multipart).
        self.s3.delete_object(Bucket=self.bucket, Key=key + ".md5")

        def finish(writer: _S3Writer) -> str:
            etag = writer.md5.hexdigest()
            self.s3.put_object(Bucket=self.bucket, Key=key + ".md5", Body=etag.encode())
            return etag

        return _S3Writer(self, key, limit, finish, None)

    def complete_multipart(self, file_id, parts) -> StoredFile:
        meta = self._unfinished(file_id)
        parts = check_part_list(parts, self.max_parts)
        whole = self._part_sizes(file_id)
        sizes = []
        for number, etag in parts:
            if number not in whole:
                raise StorageError(f"part {number} was not uploaded")
            size, md5_key = whole[number]
            md5 = self.s3.get_object(Bucket=self.bucket, Key=md5_key)["Body"].read().decode()
            if etag and etag.strip('"') != md5:
                raise StorageError(f"part {number}: etag mismatch")
            sizes.append(size)
        try:
            self._check_size(sum(sizes))
        except FileTooLarge:
            self.delete(file_id)  # nothing of an upload over the limit is kept
            raise
        key = self._data_key(meta)
        part_keys = [self._part_key(file_id, n) for n, _ in parts]
        if len(parts) > 1 and all(s >= S3_MIN_PART_BYTES for s in sizes[:-1]):
            self._join_in_store(key, part_keys)
        else:
            # Small parts: streamed through a writer, never held whole.
            writer = _S3Writer(self, key, None, lambda w: None, meta.file_name)
            try:
                for part_key in part_keys:
                    body = self.s3.get_object(Bucket=self.bucket, Key=part_key)["Body"]
                    for chunk in body.iter_chunks(1024 * 1024):
                        writer.write(chunk)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        self._delete_keys([o["Key"] for o in self._list(self._base(file_id) + "parts/")])
        meta.size = sum(sizes)
        meta.complete = True
        self._write_meta(meta)
        return meta

    def _join_in_store(self, key: str, part_keys: list[str]) -> None:
        """Joined inside the store: nothing large passes through this process."""
        head = self.s3.get_object(Bucket=self.bucket, Key=part_keys[0],
                                  Range=f"bytes=0-{SNIFF_BYTES - 1}")["Body"].read()
        headers = served_headers(head, key.rsplit("/", 1)[-1])
        up = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key,
                                             ContentType=headers["Content-Type"],
                                             ContentDisposition=headers["Content-Disposition"])
        try:
            done = []
            for i, part_key in enumerate(part_keys, start=1):
                r = self.s3.upload_part_copy(
                    Bucket=self.bucket, Key=key, UploadId=up["UploadId"], PartNumber=i,
                    CopySource={"Bucket": self.bucket, "Key": part_key})
                done.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
            self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=up["UploadId"],
                                              MultipartUpload={"Parts": done})
        except Exception:
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=up["UploadId"])
            raise

    def stat(self, file_id) -> Optional[StoredFile]:
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._meta_key(file_id))["Body"].read()
            return StoredFile(**json.loads(body))
        except StorageError:
            return None
        except Exception as exc:  # noqa: BLE001 - botocore ClientError
            if self._missing(exc):
                return None
            raise

    def read(self, file_id) -> Optional[bytes]:
        meta = self.stat(file_id)
        if meta is None or not meta.complete:
            return None
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._data_key(meta))["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if self._missing(exc):
                return None
            raise

    def local_path(self, file_id) -> Optional[str]:
        return None

    def delete(self, file_id) -> None:
        try:
            base = self._base(file_id)
        except StorageError:
            return
        meta = self.stat(file_id)
        keys = [o["Key"] for o in self._list(base)]
        if meta is not None:
            keys += self._index_keys(meta)
        self._delete_keys(keys)

    def expire(self, kind, created_before, now=None) -> int:
        now = time.time() if now is None else now
        n = 0
        stale_index = []
        for index, cutoff in ((kind, created_before), (EXPIRING, now)):
            for obj in self._list(f"{self.prefix}{INDEX_DIR}/{index}/"):
                name = obj["Key"].rsplit("/", 1)[-1]
                ms, _, file_id = name.partition("-")
                if not ms.isdigit() or int(ms) >= int(cutoff * 1000):
                    break  # keys list in time order
                meta = self.stat(file_id)
                if meta is None:
                    # A crash between the index entry and the meta record (or a deleted file).
                    self.delete(file_id)
                    stale_index.append(obj["Key"])
                    continue
                if meta.expired(kind, created_before, now):
                    self.delete(meta.id)
                    n += 1
        self._delete_keys(stale_index)
        return n

    # --- URLs -------------------------------------------------------------------------------
    def file_url(self, meta: StoredFile) -> str:
        """The URL clients fetch the file from, without going through the API."""
        return self._url(self._data_key(meta))

    def url_for_path(self, path: str) -> Optional[str]:
        """``file_url`` for a ``/files/<id>/<name>`` path (the form results keep), or None."""
        segments = path.split("/")
        if len(segments) != 4 or segments[1] != "files" or not FILE_ID_RE.match(segments[2]):
            return None
        # The object keeps its (safe) Content-Type: no need to read the meta record here.
        return self._url(f"{self.prefix}{segments[2]}/{segments[3]}")

    def _url(self, key: str) -> str:
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key)}"
        return self.s3.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                              ExpiresIn=self.presign_expiry_s)

    def file_id_from_url(self, url: str) -> Optional[str]:
        """The id of the file a URL from ``file_url`` points at, or None."""
        try:
            parts = urlsplit(url)
        except ValueError:
            return None
        path = unquote(parts.path)
        key = None
        if self.public_base_url and url.startswith(self.public_base_url + "/"):
            key = unquote(url[len(self.public_base_url) + 1:].split("?", 1)[0])
        elif parts.netloc.startswith(self.bucket + "."):
            key = path.lstrip("/")  # virtual-hosted style
        elif path.startswith(f"/{self.bucket}/"):
            endpoint = urlsplit(self.endpoint_url).netloc if self.endpoint_url else None
            if endpoint is None or endpoint == parts.netloc:
                key = path[len(self.bucket) + 2:]  # path style
        if key is None or not key.startswith(self.prefix):
            return None
        segments = key[len(self.prefix):].split("/")
        if len(segments) != 2 or not FILE_ID_RE.match(segments[0]) or segments[1] == "meta.json":
            return None
        return segments[0]
