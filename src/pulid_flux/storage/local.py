"""Storage on the local filesystem: ``<root>/<id>/data`` plus ``meta.json`` beside it."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .base import (
    FILE_ID_RE,
    KIND_UPLOAD,
    FileFinished,
    FileTooLarge,
    FileWriter,
    Storage,
    StorageError,
    StoredFile,
    check_part_list,
)

COPY_CHUNK = 1024 * 1024


def _link_new(tmp: Path, target: Path) -> None:
    """Moves ``tmp`` to ``target`` unless the target exists: of two writers racing to finish
    one file, the second fails instead of replacing the first one's bytes."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileFinished("the file is complete; files are immutable") from None
    finally:
        tmp.unlink(missing_ok=True)


class _LocalWriter(FileWriter):
    def __init__(self, target: Path, limit, finish):
        super().__init__(limit)
        self.tmp = target.with_name(f"{target.name}.{secrets.token_hex(6)}.tmp")
        self._file = open(self.tmp, "wb")
        self._finish = finish

    def _write(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def close(self):
        self._file.close()
        return self._finish(self)

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


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

    def reserve(self, *, content_type, file_name, kind=KIND_UPLOAD, owner="",
                expires_at=None) -> StoredFile:
        meta = StoredFile.new(content_type=content_type, file_name=file_name, kind=kind, owner=owner,
                              expires_at=expires_at)
        self._dir(meta.id).mkdir(parents=True)
        self._write_meta(meta)
        return meta

    def open_write(self, file_id) -> FileWriter:
        meta = self._unfinished(file_id)
        d = self._dir(file_id)

        def finish(writer: _LocalWriter) -> StoredFile:
            _link_new(writer.tmp, d / "data")
            meta.size = writer.size
            meta.complete = True
            self._write_meta(meta)
            return meta

        return _LocalWriter(d / "data", self.max_file_bytes, finish)

    def _part_sizes(self, file_id) -> dict[int, int]:
        parts = self._dir(file_id) / "parts"
        if not parts.is_dir():
            return {}
        return {int(p.name): p.stat().st_size for p in parts.iterdir() if p.name.isdigit()}

    def open_part(self, file_id, part_number) -> FileWriter:
        self._unfinished(file_id)
        if not 1 <= part_number <= self.max_parts:
            raise StorageError(f"part number must be 1..{self.max_parts}")
        parts = self._dir(file_id) / "parts"
        parts.mkdir(exist_ok=True)
        others = sum(size for n, size in self._part_sizes(file_id).items() if n != part_number)
        limit = None if self.max_file_bytes is None else max(0, self.max_file_bytes - others)

        def finish(writer: _LocalWriter) -> str:
            os.replace(writer.tmp, parts / f"{part_number}")
            return writer.md5.hexdigest()

        return _LocalWriter(parts / f"{part_number}", limit, finish)

    def complete_multipart(self, file_id, parts) -> StoredFile:
        meta = self._unfinished(file_id)
        parts = check_part_list(parts, self.max_parts)
        d = self._dir(file_id)
        sizes = self._part_sizes(file_id)
        for number, _ in parts:
            if number not in sizes:
                raise StorageError(f"part {number} was not uploaded")
        try:
            self._check_size(sum(sizes[n] for n, _ in parts))
        except FileTooLarge:
            self.delete(file_id)  # nothing of an upload over the limit is kept
            raise
        writer = _LocalWriter(d / "data", None, lambda w: w)
        try:
            for number, etag in parts:
                md5 = hashlib.md5()
                with open(d / "parts" / f"{number}", "rb") as part:
                    while chunk := part.read(COPY_CHUNK):
                        md5.update(chunk)
                        writer.write(chunk)
                if etag and etag.strip('"') != md5.hexdigest():
                    raise StorageError(f"part {number}: etag mismatch")
            writer.close()
        except BaseException:
            writer.abort()
            raise
        _link_new(writer.tmp, d / "data")
        shutil.rmtree(d / "parts", ignore_errors=True)
        meta.size = writer.size
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
