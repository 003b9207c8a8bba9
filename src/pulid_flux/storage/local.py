"""Storage on the local filesystem: ``<root>/<id>/data`` plus ``meta.json`` beside it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..errors import ServiceFault, raises_service_faults
from .base import (
    FILE_ID_RE,
    KIND_UPLOAD,
    Storage,
    StorageError,
    StoredFile,
)


@raises_service_faults("storage")
class LocalStorage(Storage):
    def __init__(self, root: str | os.PathLike, *, max_file_bytes: Optional[int] = None,
                 max_parts: int = 10000):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self.max_parts = max_parts

    def _dir(self, file_id: str) -> Path:
        # The id comes from URLs: refuse anything that could leave the root.
        if not FILE_ID_RE.match(file_id or ""):
            raise StorageError("invalid file id")
        return self.root / file_id

    def _write_meta(self, meta: StoredFile) -> None:
        d = self._dir(meta.id)
        tmp = d / "meta.json.tmp"
        tmp.write_text(json.dumps(asdict(meta)))
        os.replace(tmp, d / "meta.json")

    def _check_size(self, size: int) -> None:
        if self.max_file_bytes is not None and size > self.max_file_bytes:
            raise StorageError(f"file larger than {self.max_file_bytes} bytes")

    def reserve(self, *, content_type, file_name, kind=KIND_UPLOAD, owner="",
                expires_at=None) -> StoredFile:
        meta = StoredFile.new(content_type=content_type, file_name=file_name, kind=kind, owner=owner,
                              expires_at=expires_at)
        self._dir(meta.id).mkdir(parents=True)
        try:
            self._write_meta(meta)
        except BaseException:
            self.delete(meta.id)  # a full disk must not leave half-made entries behind
            raise
        return meta

    def write(self, file_id, data: bytes) -> StoredFile:
        meta = self.stat(file_id)
        if meta is None:
            raise StorageError("unknown file")
        self._check_size(len(data))
        d = self._dir(file_id)
        tmp = d / "data.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, d / "data")
        meta.size = len(data)
        meta.complete = True
        self._write_meta(meta)
        return meta

    def put(self, data, *, content_type, file_name, kind=KIND_UPLOAD, owner="",
            expires_at=None) -> StoredFile:
        self._check_size(len(data))
        meta = self.reserve(content_type=content_type, file_name=file_name, kind=kind, owner=owner,
                            expires_at=expires_at)
        try:
            return self.write(meta.id, data)
        except BaseException:
            self.delete(meta.id)
            raise

    def put_part(self, file_id, part_number, data) -> str:
        if self.stat(file_id) is None:
            raise StorageError("unknown upload")
        if not 1 <= part_number <= self.max_parts:
            raise StorageError(f"part number must be 1..{self.max_parts}")
        parts = self._dir(file_id) / "parts"
        parts.mkdir(exist_ok=True)
        used = sum(p.stat().st_size for p in parts.iterdir() if p.name != f"{part_number}")
        self._check_size(used + len(data))
        (parts / f"{part_number}").write_bytes(data)
        return hashlib.md5(data).hexdigest()

    def complete_multipart(self, file_id, parts) -> StoredFile:
        meta = self.stat(file_id)
        if meta is None:
            raise StorageError("unknown upload")
        d = self._dir(file_id)
        tmp = d / "data.tmp"
        size = 0
        with open(tmp, "wb") as out:
            for number, etag in sorted(parts):
                part = d / "parts" / f"{int(number)}"
                if not part.exists():
                    raise StorageError(f"part {number} was not uploaded")
                data = part.read_bytes()
                if etag and etag.strip('"') != hashlib.md5(data).hexdigest():
                    raise StorageError(f"part {number}: etag mismatch")
                out.write(data)
                size += len(data)
        os.replace(tmp, d / "data")
        shutil.rmtree(d / "parts", ignore_errors=True)
        meta.size = size
        meta.complete = True
        self._write_meta(meta)
        return meta

    def stat(self, file_id) -> Optional[StoredFile]:
        try:
            d = self._dir(file_id)
            return StoredFile(**json.loads((d / "meta.json").read_text()))
        except (StorageError, FileNotFoundError, ValueError):
            return None

    def read(self, file_id) -> Optional[bytes]:
        path = self.local_path(file_id)
        return Path(path).read_bytes() if path else None

    def local_path(self, file_id) -> Optional[str]:
        meta = self.stat(file_id)
        if meta is None or not meta.complete:
            return None
        path = self._dir(file_id) / "data"
        return str(path) if path.exists() else None

    def probe(self, min_free_bytes: int = 0) -> None:
        # A real write, as the disk-full and read-only cases only show on writing.
        probe = self.root / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(self.root).free
        if free < min_free_bytes:
            raise ServiceFault("storage", f"only {free} bytes free in {self.root}", status_code=507)

    def delete(self, file_id) -> None:
        try:
            shutil.rmtree(self._dir(file_id), ignore_errors=True)
        except StorageError:
            pass

    def expire(self, kind, created_before, now=None) -> int:
        now = time.time() if now is None else now
        n = 0
        for d in self.root.iterdir():
            meta = self.stat(d.name)
            if meta is None:
                # A directory whose meta never got written: a crash mid-reserve.
                if d.is_dir() and d.stat().st_mtime < created_before:
                    shutil.rmtree(d, ignore_errors=True)
                continue
            if meta.expired(kind, created_before, now):
                self.delete(meta.id)
                n += 1
        return n
