"""The two kinds of failure the service tells apart, shared by the API, the worker and the engine.

``InputError`` is the client's fault: every input check (fetch, decoding, the face step, the engine)
raises it, and it becomes fal's 422 ``{"detail": [{"loc", "msg", "type"}]}``. ``ServiceFault`` is
ours (a full disk, an unreachable queue, a model that cannot load): it becomes a 5xx that names the
component, and it never completes a request as the user's error. Torch-free, so the API imports it.
"""

from __future__ import annotations

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

    def body(self) -> dict:
        return {"detail": f"{self.component} unavailable: {self.reason}", "component": self.component}
