"""Per-key fairness: one API key cannot take the queue, the status streams or the storage from
the others. The limits are settings (config.py); they apply only with API keys, since without
keys every caller is the same user and the global limits are the ones that matter.

Counts come from the queue (queued + running, any backend) and the storage (bytes per owner);
open status streams are counted per API process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import Callable, Optional

from fastapi.responses import JSONResponse

from ..config import Settings
from .schemas import error_detail

ERROR_TYPE = "rate_limited"


def too_many(detail: str, settings: Settings) -> JSONResponse:
    """fal's error shape, 429, with ``Retry-After`` (clients retry 429 with backoff)."""
    return JSONResponse(
        {"detail": detail, "error_type": ERROR_TYPE}, status_code=429,
        headers={"retry-after": str(settings.limit_retry_after_s), "x-fal-error-type": ERROR_TYPE},
    )


def request_cost(width: int, height: int, steps: int, num_images: int, true_cfg: float) -> int:
    """Work of one request in pixel-steps: true CFG runs a second (negative) pass per step."""
    passes = 2 if true_cfg > 1 else 1
    return width * height * steps * passes * num_images


def cost_errors(width: int, height: int, steps: int, num_images: int, true_cfg: float,
                settings: Settings) -> list[dict]:
    """A request over the cost cap is a 422, not a 429: the same input never fits, so a retry
    (which fal clients do on 429) could not help. The entry names every field that adds to it."""
    cost = request_cost(width, height, steps, num_images, true_cfg)
    if cost <= settings.max_request_cost:
        return []
    msg = (f"The request is too large: {width}x{height} pixels × {steps} steps × "
           f"{2 if true_cfg > 1 else 1} passes (true_cfg > 1 doubles them) × {num_images} images = "
           f"{cost}, over this server's limit of {settings.max_request_cost}; reduce image_size, "
           "num_inference_steps, num_images or true_cfg")
    return [error_detail("image_size", msg, "request_too_costly",
                         ctx={"cost": cost, "limit": settings.max_request_cost,
                              "fields": ["image_size", "num_inference_steps", "num_images", "true_cfg"]})]


class OwnerLimits:
    """In-process state for the per-key limits: a lock per key around count-then-submit (so a
    burst from one key cannot all pass the count together), and the open streams per key."""

    def __init__(self, settings: Settings, enabled: bool) -> None:
        self.settings = settings
        self.enabled = enabled
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._streams: dict[str, int] = defaultdict(int)

    def submit_lock(self, owner: str):
        return self._locks[owner] if self.enabled else contextlib.nullcontext()

    def active_refusal(self, active: int) -> Optional[JSONResponse]:
        """The 429 for a key with ``active`` requests queued or running, or None."""
        limit = self.settings.max_active_requests_per_key
        if self.enabled and active >= limit:
            return too_many(f"This key already has {active} requests queued or running (limit "
                            f"{limit}); wait for some to finish", self.settings)
        return None

    async def storage_full(self, storage, owner: str) -> Optional[JSONResponse]:
        """The 429 for a key at its storage limit, asked before anything new is stored for it
        (upload, submit); a file under way may take it over by at most that file."""
        limit = self.settings.max_stored_bytes_per_key
        if not self.enabled:
            return None
        stored = await asyncio.to_thread(storage.owner_bytes, owner)
        if stored < limit:
            return None
        return too_many(f"This key stores {stored} bytes (limit {limit}); wait for files to expire "
                        "or ask for shorter retention", self.settings)

    def open_stream(self, owner: str) -> Optional[Callable[[], None]]:
        """Takes one of the key's stream slots; returns its release function (call it once, when
        the stream ends), or None when the key has all its streams open already."""
        if not self.enabled:
            return lambda: None
        if self._streams[owner] >= self.settings.max_status_streams_per_key:
            return None
        self._streams[owner] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._streams[owner] -= 1
                if not self._streams[owner]:
                    del self._streams[owner]

        return release
