"""One queue reader for all status streams of this API process.

Each watched request has one ``Watch``: its latest state, queue position, the log lines seen so
far and the newest preview. A single task reads every watched request once per tick (in one
thread hop) and wakes its subscribers, so N streams on one request cost one read per tick, not
N, and M watched requests cost one thread hop per tick, not M. The tick stretches with M so that
the reads stay within ``status_stream_reads_per_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Optional

from ..engine.preview import PREVIEW_LOG_PREFIX
from ..errors import ServiceFault
from ..queue.base import COMPLETED, IN_QUEUE, Job

log = logging.getLogger(__name__)

READS_PER_HOP = 20


def split_previews(entries: list[dict]) -> tuple[list[dict], Optional[str]]:
    """Preview records (only requests with enable_previews have any) leave `logs`; the newest
    one is returned for the stream event's `preview`."""
    logs, preview = [], None
    for entry in entries:
        if entry["message"].startswith(PREVIEW_LOG_PREFIX):
            preview = entry["message"][len(PREVIEW_LOG_PREFIX):]
        else:
            logs.append(entry)
    return logs, preview


class Watch:
    """What the streams of one request share; ``version`` grows with every change."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.job: Optional[Job] = None
        self.position: Optional[int] = None
        self.logs: list[dict] = []  # every non-preview log line so far, in order
        self.preview: Optional[str] = None
        self.preview_seq = 0  # grows with each new preview
        self.version = 0  # 0: not read yet
        self.done = False  # COMPLETED or deleted: read no more
        self.event = asyncio.Event()  # set (and replaced) on each change
        self.subscribers = 0
        self.log_seq = 0

    def apply(self, job: Optional[Job], entries: list[dict], log_seq: int, position: Optional[int]) -> None:
        if job is None:
            changed, self.done = True, True
        else:
            logs, preview = split_previews(entries)
            changed = (bool(entries) or self.job is None or job.state != self.job.state
                       or position != self.position)
            self.logs += logs
            if preview is not None:
                self.preview, self.preview_seq = preview, self.preview_seq + 1
            self.position, self.log_seq = position, log_seq
            self.done = job.state == COMPLETED
        self.job = job
        if changed:
            self.version += 1
            self.event.set()
            self.event = asyncio.Event()


class StatusHub:
    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self._watches: dict[str, Watch] = {}
        self._task: Optional[asyncio.Task] = None

    @contextlib.asynccontextmanager
    async def watch(self, request_id: str) -> AsyncIterator[Watch]:
        w = self._watches.get(request_id)
        if w is None:
            w = self._watches[request_id] = Watch(request_id)
        w.subscribers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        try:
            yield w
        finally:
            w.subscribers -= 1
            if not w.subscribers and self._watches.get(request_id) is w:
                del self._watches[request_id]

    def _read(self, watches: list[Watch]) -> list[tuple]:
        queue, out = self.svc.queue, []
        for w in watches:
            try:
                job = queue.get(w.request_id)
                if job is None:
                    out.append((None, [], w.log_seq, None))
                    continue
                entries, seq = self.svc.log_entries(w.request_id, w.log_seq)
                position = queue.position(job.id) if job.state == IN_QUEUE else None
                out.append((job, entries, seq, position))
            except ServiceFault:  # the queue is down: it logs that once, not once a tick
                out.append(None)
            except Exception:  # noqa: BLE001 - one bad read must not stall the other streams
                log.exception("status read of %s failed", w.request_id)
                out.append(None)
        return out

    async def _run(self) -> None:
        # Ends when nobody watches; the next subscriber starts a new one.
        while self._watches:
            watches = list(self._watches.values())
            # A few requests per thread hop: the reads never hold the interpreter for long at a
            # time, so other requests (/health) are served in between.
            for start in range(0, len(watches), READS_PER_HOP):
                chunk = watches[start:start + READS_PER_HOP]
                for w, read in zip(chunk, await asyncio.to_thread(self._read, chunk)):
                    if read is not None:
                        w.apply(*read)
                    if w.done and self._watches.get(w.request_id) is w:
                        del self._watches[w.request_id]  # its subscribers keep the final state
            settings = self.svc.settings
            await asyncio.sleep(max(settings.status_poll_interval_s,
                                    len(watches) / settings.status_stream_reads_per_s))
