"""File storage interface: uploaded references, fetched inputs and generated images.

A file is addressed by an unguessable id, so its URL (``/files/{id}/{name}``) can be handed to
browsers and fal clients that fetch it without credentials.
"""

from __future__ import annotations

import abc
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Optional

FILE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")

# Kinds decide retention: uploads expire on their own, inputs/outputs go with their request.
KIND_UPLOAD = "upload"
KIND_INPUT = "input"
KIND_OUTPUT = "output"


def new_file_id() -> str:
    return secrets.token_urlsafe(18)  # 144 random bits


def safe_file_name(name: Optional[str], default: str = "file.bin") -> str:
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE_NAME.sub("_", name).strip("._")[:128]
    return name or default


@dataclass
class StoredFile:
    id: str
    file_name: str
    content_type: str
    size: int
    created_at: float
    kind: str = KIND_UPLOAD
    owner: str = ""
    complete: bool = True
    expires_at: Optional[float] = None  # deleted then, if sooner than its kind's retention

    @classmethod
    def new(cls, *, content_type: str, file_name: Optional[str], kind: str, owner: str, size: int = 0,
            complete: bool = False, expires_at: Optional[float] = None) -> "StoredFile":
        """A fresh record with a new unguessable id and a sanitised name."""
        return cls(id=new_file_id(), file_name=safe_file_name(file_name),
                   content_type=content_type or "application/octet-stream", size=size,
                   created_at=time.time(), kind=kind, owner=owner, complete=complete,
                   expires_at=expires_at)

    def expired(self, kind: str, created_before: float, now: float) -> bool:
        """Whether :meth:`Storage.expire` of ``kind`` deletes this file."""
        return self.kind == kind and (self.created_at < created_before
                                      or (self.expires_at is not None and self.expires_at < now))

    @property
    def path(self) -> str:
        """The URL path this server serves the file at."""
        return f"/files/{self.id}/{self.file_name}"


# Results keep file references in this form; the API turns them into absolute URLs for the
# origin the client used (or the configured public URL), so a stored result never goes stale.
FILE_REF_PREFIX = "pulid-file:"


def file_ref(meta: StoredFile) -> str:
    return FILE_REF_PREFIX + meta.path


def expand_file_refs(value, base_url: str):
    """Replaces every file reference inside a JSON value by ``base_url + path``."""
    if isinstance(value, str):
        if value.startswith(FILE_REF_PREFIX):
            return base_url.rstrip("/") + value[len(FILE_REF_PREFIX):]
        return value
    if isinstance(value, list):
        return [expand_file_refs(v, base_url) for v in value]
    if isinstance(value, dict):
        return {k: expand_file_refs(v, base_url) for k, v in value.items()}
    return value


# --- serving: files are data, never pages --------------------------------------------------

# The image types this service accepts and produces, told apart by their first bytes; only
# these are ever served inline, whatever the uploader declared.
def inline_image_type(head: bytes) -> Optional[str]:
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


SNIFF_BYTES = 16
DOWNLOAD_TYPE = "application/octet-stream"


def served_headers(head: bytes, file_name: str) -> dict[str, str]:
    """Content-Type and Content-Disposition a stored file is served with, from its first bytes:
    one of the images above inline, anything else a download. ``file_name`` is already safe."""
    media_type = inline_image_type(head)
    disposition = "inline" if media_type else "attachment"
    return {"Content-Type": media_type or DOWNLOAD_TYPE,
            "Content-Disposition": f'{disposition}; filename="{file_name}"'}


_TOKEN = r"[A-Za-z0-9!#$&^_.+-]{1,127}"
_CONTENT_TYPE = re.compile(rf'{_TOKEN}/{_TOKEN}(\s*;\s*{_TOKEN}=({_TOKEN}|"[ !#-\[\]-~]*"))*')
MAX_CONTENT_TYPE_CHARS = 255


def content_type_problem(value: str) -> Optional[str]:
    """Why a declared content type is refused (control characters, not ``type/subtype``), or None."""
    if len(value) > MAX_CONTENT_TYPE_CHARS:
        return f"at most {MAX_CONTENT_TYPE_CHARS} characters"
    if not _CONTENT_TYPE.fullmatch(value):
        return "must be a media type such as image/png (no control characters)"
    return None


# --- errors ------------------------------------------------------------------------------------

class StorageError(ValueError):
    pass


class UnknownFile(StorageError):
    """No such file or upload (or one the caller may not know of)."""


class FileFinished(StorageError):
    """The upload is complete (or the file was never an upload): files are immutable."""


class FileTooLarge(StorageError):
    pass


def check_part_list(parts: list[tuple[int, str]], max_parts: int) -> list[tuple[int, str]]:
    """The parts of a multipart completion in ascending order (the order they are joined in;
    fal's Python client lists parallel parts as they finish), each listed once: a part listed
    twice would be stored twice."""
    ordered = sorted(parts)
    if not ordered:
        raise StorageError("no parts")
    previous = 0
    for number, _ in ordered:
        if not previous < number <= max_parts:
            raise StorageError(f"part numbers must be unique and 1..{max_parts}")
        previous = number
    return ordered


class FileWriter(abc.ABC):
    """Receives one file's (or part's) bytes in chunks, so no upload is ever held in memory;
    nothing is visible before :meth:`close`, and :meth:`abort` leaves nothing behind."""

    def __init__(self, limit: Optional[int]):
        self.limit = limit
        self.size = 0
        self.md5 = hashlib.md5()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.limit is not None and self.size > self.limit:
            raise FileTooLarge(f"file larger than {self.limit} bytes")
        self.md5.update(chunk)
        self._write(chunk)

    @abc.abstractmethod
    def _write(self, chunk: bytes) -> None: ...

    @abc.abstractmethod
    def close(self):
        """Makes the bytes visible; returns the file's record (or a part's ETag)."""

    @abc.abstractmethod
    def abort(self) -> None: ...


class Storage(abc.ABC):
    max_file_bytes: Optional[int] = None
    max_parts: int = 10000

    def _check_size(self, size: int) -> None:
        if self.max_file_bytes is not None and size > self.max_file_bytes:
            raise FileTooLarge(f"file larger than {self.max_file_bytes} bytes")

    def _unfinished(self, file_id: str) -> StoredFile:
        """The record of an upload that may still receive bytes."""
        meta = self.stat(file_id)
        if meta is None:
            raise UnknownFile("unknown upload")
        if meta.complete:
            raise FileFinished("the file is complete; files are immutable")
        return meta

    def put(self, data: bytes, *, content_type: str, file_name: str, kind: str = KIND_UPLOAD,
            owner: str = "", expires_at: Optional[float] = None) -> StoredFile:
        self._check_size(len(data))
        meta = self.reserve(content_type=content_type, file_name=file_name, kind=kind, owner=owner,
                            expires_at=expires_at)
        return self.write(meta.id, data)

    def write(self, file_id: str, data: bytes) -> StoredFile:
        """The whole file at once (small files; uploads go through :meth:`open_write`)."""
        return self._write_all(self.open_write(file_id), data)

    def put_part(self, file_id: str, part_number: int, data: bytes) -> str:
        """Stores one multipart part; returns its ETag."""
        return self._write_all(self.open_part(file_id, part_number), data)

    @staticmethod
    def _write_all(writer: FileWriter, data: bytes):
        try:
            writer.write(data)
            return writer.close()
        except BaseException:
            writer.abort()
            raise

    @abc.abstractmethod
    def reserve(self, *, content_type: str, file_name: str, kind: str = KIND_UPLOAD,
                owner: str = "", expires_at: Optional[float] = None) -> StoredFile:
        """A file id whose bytes arrive later (signed PUT, multipart)."""

    @abc.abstractmethod
    def open_write(self, file_id: str) -> FileWriter:
        """A writer for the bytes of a reserved, unfinished file; its ``close`` completes it."""

    @abc.abstractmethod
    def open_part(self, file_id: str, part_number: int) -> FileWriter:
        """A writer for one part of an unfinished multipart upload; ``close`` returns its ETag.
        The parts together stay within ``max_file_bytes``."""

    @abc.abstractmethod
    def complete_multipart(self, file_id: str, parts: list[tuple[int, str]]) -> StoredFile:
        """Joins the listed parts (unique, ascending); over ``max_file_bytes`` the whole upload
        is deleted and FileTooLarge raised."""

    @abc.abstractmethod
    def stat(self, file_id: str) -> Optional[StoredFile]: ...

    @abc.abstractmethod
    def read(self, file_id: str) -> Optional[bytes]: ...

    @abc.abstractmethod
    def local_path(self, file_id: str) -> Optional[str]:
        """A filesystem path to stream the bytes from, when the backend has one."""

    @abc.abstractmethod
    def delete(self, file_id: str) -> None: ...

    @abc.abstractmethod
    def expire(self, kind: str, created_before: float, now: Optional[float] = None) -> int:
        """Deletes the files of ``kind`` created before ``created_before``, and those whose own
        ``expires_at`` passed by ``now`` (default: the current time); returns how many."""
