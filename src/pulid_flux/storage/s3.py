"""Storage in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, GCS interop, Ceph RGW).

Object layout under ``s3://BUCKET/PREFIX``:

* ``PREFIX<id>/<file_name>``  the bytes (with their Content-Type), so public URLs end in the name.
* ``PREFIX<id>/meta.json``     the ``StoredFile`` record (written last: a file without it is
                               incomplete or a crash leftover).
* ``PREFIX<id>/parts/<n>``     multipart parts until the upload completes.
* ``PREFIX_index/<kind>/<created-ms>-<id>``  empty objects listed in time order, so expiry
                               never lists the whole bucket.

URLs handed to clients are presigned GET URLs (``presign_expiry_s``) or, with
``public_base_url`` (a CDN or a public bucket), ``public_base_url/<key>``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from typing import Optional
from urllib.parse import quote, unquote, urlsplit

from .base import (
    FILE_ID_RE,
    KIND_UPLOAD,
    Storage,
    StorageError,
    StoredFile,
)

# S3 refuses multipart parts below 5 MiB (except the last); smaller uploads are joined here.
S3_MIN_PART_BYTES = 5 * 1024 * 1024
INDEX_DIR = "_index"
EXPIRING = "_expiring"  # index of files with an expiry time of their own


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix/``)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://BUCKET[/PREFIX] URL: {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, (prefix + "/") if prefix else ""


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

    def _check_size(self, size: int) -> None:
        if self.max_file_bytes is not None and size > self.max_file_bytes:
            raise StorageError(f"file larger than {self.max_file_bytes} bytes")

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

    def write(self, file_id, data: bytes) -> StoredFile:
        meta = self.stat(file_id)
        if meta is None:
            raise StorageError("unknown file")
        self._check_size(len(data))
        self.s3.put_object(Bucket=self.bucket, Key=self._data_key(meta), Body=data,
                           ContentType=meta.content_type)
        meta.size = len(data)
        meta.complete = True
        self._write_meta(meta)
        return meta

    def put(self, data, *, content_type, file_name, kind=KIND_UPLOAD, owner="",
            expires_at=None) -> StoredFile:
        self._check_size(len(data))
        meta = StoredFile.new(content_type=content_type, file_name=file_name, kind=kind, owner=owner,
                              size=len(data), complete=True, expires_at=expires_at)
        self._write_index(meta)
        self.s3.put_object(Bucket=self.bucket, Key=self._data_key(meta), Body=data,
                           ContentType=meta.content_type)
        self._write_meta(meta)
        return meta

    def put_part(self, file_id, part_number, data) -> str:
        if self.stat(file_id) is None:
            raise StorageError("unknown upload")
        if not 1 <= part_number <= self.max_parts:
            raise StorageError(f"part number must be 1..{self.max_parts}")
        own = self._part_key(file_id, part_number)
        used = sum(o["Size"] for o in self._list(self._base(file_id) + "parts/") if o["Key"] != own)
        self._check_size(used + len(data))
        etag = hashlib.md5(data).hexdigest()
        # The MD5 is kept as metadata: a provider's ETag is not always the MD5 (SSE-KMS).
        self.s3.put_object(Bucket=self.bucket, Key=own, Body=data, Metadata={"md5": etag})
        return etag

    def complete_multipart(self, file_id, parts) -> StoredFile:
        meta = self.stat(file_id)
        if meta is None:
            raise StorageError("unknown upload")
        ordered = sorted((int(n), str(e or "")) for n, e in parts)
        sizes = []
        for number, etag in ordered:
            try:
                head = self.s3.head_object(Bucket=self.bucket, Key=self._part_key(file_id, number))
            except Exception as exc:  # noqa: BLE001 - botocore ClientError
                if self._missing(exc):
                    raise StorageError(f"part {number} was not uploaded") from None
                raise
            if etag and etag.strip('"') != head.get("Metadata", {}).get("md5"):
                raise StorageError(f"part {number}: etag mismatch")
            sizes.append(head["ContentLength"])
        if not ordered:
            raise StorageError("no parts")
        key = self._data_key(meta)
        if all(s >= S3_MIN_PART_BYTES for s in sizes[:-1]) and len(ordered) > 1:
            # Joined inside the store: nothing large passes through this process.
            up = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                 ContentType=meta.content_type)
            try:
                done = []
                for i, (number, _) in enumerate(ordered, start=1):
                    r = self.s3.upload_part_copy(
                        Bucket=self.bucket, Key=key, UploadId=up["UploadId"], PartNumber=i,
                        CopySource={"Bucket": self.bucket, "Key": self._part_key(file_id, number)})
                    done.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
                self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key,
                                                  UploadId=up["UploadId"],
                                                  MultipartUpload={"Parts": done})
            except Exception:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=up["UploadId"])
                raise
        else:
            body = b"".join(
                self.s3.get_object(Bucket=self.bucket, Key=self._part_key(file_id, n))["Body"].read()
                for n, _ in ordered)
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=body,
                               ContentType=meta.content_type)
        self._delete_keys([o["Key"] for o in self._list(self._base(file_id) + "parts/")])
        meta.size = sum(sizes)
        meta.complete = True
        self._write_meta(meta)
        return meta

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

    def files(self):
        for obj in self._list(self.prefix):
            file_id, _, name = obj["Key"][len(self.prefix):].partition("/")
            if name == "meta.json":
                meta = self.stat(file_id)
                if meta is not None:
                    yield meta

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
        return self._url(self._data_key(meta), meta.content_type)

    def url_for_path(self, path: str) -> Optional[str]:
        """``file_url`` for a ``/files/<id>/<name>`` path (the form results keep), or None."""
        segments = path.split("/")
        if len(segments) != 4 or segments[1] != "files" or not FILE_ID_RE.match(segments[2]):
            return None
        # The object keeps its Content-Type: no need to read the meta record here.
        return self._url(f"{self.prefix}{segments[2]}/{segments[3]}", None)

    def _url(self, key: str, content_type: Optional[str]) -> str:
        if self.public_base_url:
            return f"{self.public_base_url}/{quote(key)}"
        params = {"Bucket": self.bucket, "Key": key}
        if content_type:
            params["ResponseContentType"] = content_type
        return self.s3.generate_presigned_url("get_object", Params=params,
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
