"""The two kinds of failure the service tells apart, shared by the API, the worker and the engine.

``InputError`` is the client's fault: every input check (fetch, decoding, the face step, the engine)
raises it, and it becomes fal's 422 ``{"detail": [{"loc", "msg", "type"}]}``. ``ServiceFault`` is
ours (a full disk, an unreachable queue, a model that cannot load): it becomes a 5xx that names the
component, and it never completes a request as the user's error. Torch-free, so the API imports it.
"""

from __future__ import annotations

import errno
import functools
import inspect
import sqlite3
from typing import Optional, Sequence


class InputError(ValueError):
    """Bad client input; ``loc`` is fal's location, e.g. ``("body", "reference_image_url")``."""

    def __init__(self, msg: str, *, loc: Sequence[str] = ("body",), type_: str = "value_error"):
        super().__init__(msg)
        self.msg = msg
        self.loc = tuple(loc)
        self.type = type_

    def detail(self) -> dict:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


class ServiceFault(RuntimeError):
    """A fault of this service; ``component`` is what failed (``storage``, ``queue``, ``model``, …)."""

    def __init__(self, component: str, reason: str, *, status_code: int = 503,
                 retry_after_s: Optional[int] = None):
        super().__init__(f"{component}: {reason}")
        self.component = component
        self.reason = reason
        self.status_code = status_code
        self.retry_after_s = retry_after_s

    @property
    def error_type(self) -> str:
        return "insufficient_storage" if self.status_code == 507 else "service_unavailable"

    def body(self) -> dict:
        return {"detail": f"{self.component} unavailable: {self.reason}",
                "error_type": self.error_type, "component": self.component}


# OS errors that mean the disk, not the request, is at fault: out of space gets 507 (fal's
# and WebDAV's "Insufficient Storage"); an I/O or read-only error gets 503.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_BROKEN_DISK = {errno.EIO, errno.EROFS}
# SQLite reports the same faults as message texts of OperationalError/DatabaseError.
_SQLITE_NO_SPACE = ("database or disk is full",)
_SQLITE_BROKEN = ("disk i/o error", "attempt to write a readonly database", "unable to open database")


def as_service_fault(exc: BaseException, component: str) -> Optional[ServiceFault]:
    """The ServiceFault ``exc`` stands for, or None when it is not a storage-level fault."""
    if isinstance(exc, ServiceFault):
        return exc
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE | _BROKEN_DISK:
        code = 507 if exc.errno in _NO_SPACE else 503
        return ServiceFault(component, exc.strerror or str(exc), status_code=code)
    if isinstance(exc, sqlite3.DatabaseError):
        text = str(exc).lower()
        if any(t in text for t in _SQLITE_NO_SPACE):
            return ServiceFault(component, str(exc), status_code=507)
        if any(t in text for t in _SQLITE_BROKEN):
            return ServiceFault(component, str(exc))
    return None


def raises_service_faults(component: str):
    """Class decorator: public methods raise ServiceFault(component, …) for disk-level faults,
    so every caller (API routes, worker, background loops) sees one exception type."""

    def wrap(fn):
        @functools.wraps(fn)
        def method(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                fault = as_service_fault(exc, component)
                if fault is None or fault is exc:
                    raise
                raise fault from exc

        return method

    def decorate(cls):
        # Inherited methods too (a base class's put() writes through this class's writers).
        for name in dir(cls):
            value = inspect.getattr_static(cls, name)
            if not name.startswith("_") and inspect.isfunction(value):
                setattr(cls, name, wrap(value))
        return cls

    return decorate
