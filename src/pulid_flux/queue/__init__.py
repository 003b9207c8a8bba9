"""Request queues: an interface and its backends.

``open_queue`` picks the backend from a URL: none or ``sqlite:///ABS/PATH`` is the embedded
SQLite queue (default: ``<data_dir>/queue.sqlite3``); ``redis://`` / ``rediss://`` is Redis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from .base import Queue


def open_queue(url: Optional[str], settings) -> Queue:
    url = url or getattr(settings, "queue_url", None)
    if not url or url.startswith("sqlite:"):
        from .sqlite import SQLiteQueue

        path = settings.db_path
        if url:
            parts = urlsplit(url)
            if not (parts.netloc + parts.path):
                raise ValueError(f"sqlite queue URL without a path: {url!r}")
            path = Path(parts.netloc + parts.path)
        return SQLiteQueue(path, busy_timeout_s=settings.db_busy_timeout_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisQueue

        def opt(name, default):
            value = getattr(settings, name, None)
            return default if value is None else value

        return RedisQueue(
            url,
            prefix=opt("redis_key_prefix", "pulid-flux:"),
            visibility_timeout_s=opt("redis_visibility_timeout_s", settings.lease_timeout_s),
            retry_s=opt("redis_retry_s", 2.0),
            socket_timeout_s=opt("redis_socket_timeout_s", 10.0),
            connect_timeout_s=opt("redis_connect_timeout_s", 0.5),
            probe_interval_s=opt("redis_probe_interval_s", 1.0),
            webhook_claim_ttl_s=opt("webhook_claim_ttl_s", 7200.0),
            consumer_prune_s=opt("redis_consumer_prune_s", 3600.0),
            max_attempts=settings.max_attempts,
        )
    raise ValueError(f"unsupported queue URL {url!r} (sqlite:///path, redis://, rediss://)")
