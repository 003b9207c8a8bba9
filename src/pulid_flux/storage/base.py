"""File storage interface: uploaded references, fetched inputs and generated images.

A file is addressed by an unguessable id, so its URL (``/files/{id}/{name}``) can be handed to
browsers and fal clients that fetch it without credentials.
"""

from __future__ import annotations

import abc
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


class StorageError(ValueError):
    pass


class Storage(abc.ABC):
    @abc.abstractmethod
    def put(self, data: bytes, *, content_type: str, file_name: str, kind: str = KIND_UPLOAD,
            owner: str = "", expires_at: Optional[float] = None) -> StoredFile: ...

    @abc.abstractmethod
    def reserve(self, *, content_type: str, file_name: str, kind: str = KIND_UPLOAD,
                owner: str = "", expires_at: Optional[float] = None) -> StoredFile:
        """A file id whose bytes arrive later (signed PUT, multipart)."""

    @abc.abstractmethod
    def write(self, file_id: str, data: bytes) -> StoredFile: ...

    @abc.abstractmethod
    def put_part(self, file_id: str, part_number: int, data: bytes) -> str:
        """Stores one multipart part; returns its ETag."""

    @abc.abstractmethod
    def complete_multipart(self, file_id: str, parts: list[tuple[int, str]]) -> StoredFile: ...

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

    def probe(self, min_free_bytes: int = 0) -> None:
        """Raises ServiceFault when the store cannot take writes now (/health asks this)."""
