"""The request queue interface shared by the HTTP server and the workers.

A backend keeps every accepted request, its logs and its result, so that both sides may
restart independently. Only three states exist, as in fal's protocol; failures and
cancellations are COMPLETED with ``error``/``error_type``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Optional

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"

PRIORITIES = {"normal": 0, "low": 1}

# Webhook delivery states.
WEBHOOK_NONE = "none"
WEBHOOK_PENDING = "pending"
WEBHOOK_DELIVERED = "delivered"
WEBHOOK_FAILED = "failed"


# A cancelled request completes with this (fal's shape). The rule every backend follows:
# a request whose cancel was requested never runs again; when its worker is lost (crash, lease
# expiry, shutdown hand-back) it completes as cancelled instead of being re-queued.
CANCELLED_STATUS = 400
CANCELLED_MESSAGE = "Request was cancelled"
CANCELLED_TYPE = "request_cancelled"
CANCELLED_RESULT = {"detail": CANCELLED_MESSAGE, "error_type": CANCELLED_TYPE}


class QueueFullError(RuntimeError):
    pass


@dataclass
class Job:
    id: str
    endpoint: str
    state: str
    input: dict[str, Any]
    owner: str = ""
    priority: int = 0
    created_at: float = 0.0
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    attempts: int = 0
    max_attempts: Optional[int] = None  # a cap below the server's setting (x-fal-no-retry: 1)
    ttl_s: Optional[float] = None  # kept this long after completion, if sooner than the server's
    worker_id: Optional[str] = None
    cancel_requested: bool = False
    webhook_url: Optional[str] = None
    webhook_state: str = WEBHOOK_NONE
    ephemeral: bool = False
    status_code: Optional[int] = None  # of the result, once COMPLETED
    result: Optional[Any] = None  # output JSON, or the error body
    error: Optional[str] = None
    error_type: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    input_files: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)


@dataclass
class LogRecord:
    seq: int
    timestamp: float
    level: str
    message: str


@dataclass
class WorkerInfo:
    worker_id: str
    pid: int
    model: str = ""
    random_weights: bool = False
    device: str = ""
    precision: str = ""  # e.g. "bf16", "fp8 weights, bf16 compute"
    state: str = "starting"  # loading | ready | busy | failed (its model cannot load)
    error: str = ""  # why the model does not load (state loading after a failure, or failed)
    started_at: float = 0.0
    heartbeat_at: float = 0.0


class Queue(abc.ABC):
    """All methods are synchronous and safe to call from several threads and processes."""

    # --- API side -------------------------------------------------------------------------
    @abc.abstractmethod
    def submit(
        self,
        endpoint: str,
        input: dict[str, Any],
        *,
        owner: str = "",
        priority: int = 0,
        webhook_url: Optional[str] = None,
        ephemeral: bool = False,
        start_deadline: Optional[float] = None,
        input_files: Optional[list[str]] = None,
        max_queue_length: Optional[int] = None,
        max_attempts: Optional[int] = None,
        ttl_s: Optional[float] = None,
    ) -> Job: ...

    @abc.abstractmethod
    def get(self, request_id: str) -> Optional[Job]: ...

    @abc.abstractmethod
    def position(self, request_id: str) -> int:
        """0-based number of waiting requests that run before this one."""

    @abc.abstractmethod
    def active_count(self, owner: str) -> int:
        """How many of ``owner``'s requests are queued or running (the API's per-key limit)."""

    @abc.abstractmethod
    def logs(self, request_id: str, after_seq: int = 0) -> list[LogRecord]: ...

    @abc.abstractmethod
    def add_log(self, request_id: str, message: str, level: str = "INFO") -> None: ...

    @abc.abstractmethod
    def cancel(self, request_id: str) -> str:
        """Returns 'cancelled' (was queued), 'requested' (running), 'completed' or 'not_found'."""

    @abc.abstractmethod
    def delete(self, request_id: str) -> list[str]:
        """Removes a request; returns the file ids it referenced."""

    @abc.abstractmethod
    def expire(self, completed_before: float, now: Optional[float] = None) -> list[str]:
        """Deletes requests completed before ``completed_before``, and those whose own ``ttl_s``
        ran out by ``now`` (default: the current time); returns their file ids."""

    @abc.abstractmethod
    def pending_webhooks(self, limit: int = 100) -> list[Job]: ...

    @abc.abstractmethod
    def set_webhook_state(self, request_id: str, state: str) -> None: ...

    @abc.abstractmethod
    def set_ttl(self, request_id: str, ttl_s: float) -> None:
        """A completed request is kept only ``ttl_s`` after its completion from now on (the
        cleanup deletes it then, as soon as its webhook is no longer pending)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, float]: ...

    # --- worker side ----------------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, worker_id: str, endpoint: Optional[str] = None) -> Optional[Job]: ...

    @abc.abstractmethod
    def heartbeat(self, worker_id: str) -> None:
        """Renews the lease of every request the worker holds and its worker record."""

    @abc.abstractmethod
    def is_cancel_requested(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def complete(
        self,
        request_id: str,
        *,
        worker_id: Optional[str],
        status_code: int,
        result: Any,
        error: Optional[str] = None,
        error_type: Optional[str] = None,
        metrics: Optional[dict[str, Any]] = None,
        output_files: Optional[list[str]] = None,
        op_id: Optional[str] = None,
    ) -> bool:
        """False when the worker no longer holds the request (it was re-queued meanwhile).
        Every try of one completion passes the same ``op_id``: a retry whose first try did
        complete (its reply was lost) then gets True too."""

    @abc.abstractmethod
    def release(self, request_id: str, worker_id: str) -> bool:
        """A worker shutting down hands a request back; the attempt does not count. A request
        whose cancel was requested completes as cancelled instead."""

    @abc.abstractmethod
    def requeue_stale(self, lease_timeout_s: float, max_attempts: int) -> list[str]:
        """Re-queues (or fails, after max_attempts or the request's own cap; or completes as
        cancelled, if its cancel was requested) requests whose worker's lease ran out."""

    @abc.abstractmethod
    def release_worker(self, worker_id: str, max_attempts: int) -> list[str]:
        """The worker died: re-queue (or fail, after max_attempts; or complete as cancelled)
        what it held."""

    @abc.abstractmethod
    def register_worker(self, info: WorkerInfo) -> None: ...

    @abc.abstractmethod
    def remove_worker(self, worker_id: str) -> None: ...

    @abc.abstractmethod
    def workers(self, alive_within_s: Optional[float] = None) -> list[WorkerInfo]: ...

    def probe(self, min_free_bytes: int = 0) -> None:
        """Raises ServiceFault when the queue cannot take writes now (/health asks this)."""

    def close(self) -> None:
        pass
