"""The embedded queue: one SQLite file (WAL mode) shared by the server and local workers.

Every state change is one short ``BEGIN IMMEDIATE`` transaction, so several processes can
claim and complete requests without a broker, and everything survives a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ..errors import ServiceFault, raises_service_faults
from .base import (
    CANCELLED_MESSAGE,
    CANCELLED_RESULT,
    CANCELLED_STATUS,
    CANCELLED_TYPE,
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    WEBHOOK_NONE,
    WEBHOOK_PENDING,
    Job,
    LogRecord,
    Queue,
    QueueFullError,
    WorkerInfo,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    state TEXT NOT NULL,
    input TEXT NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    start_deadline REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER,
    ttl_s REAL,
    worker_id TEXT,
    heartbeat_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    webhook_url TEXT,
    webhook_state TEXT NOT NULL DEFAULT 'none',
    ephemeral INTEGER NOT NULL DEFAULT 0,
    status_code INTEGER,
    result TEXT,
    error TEXT,
    error_type TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    input_files TEXT NOT NULL DEFAULT '[]',
    output_files TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS requests_waiting ON requests (state, priority, seq);
CREATE INDEX IF NOT EXISTS requests_webhook ON requests (webhook_state);
CREATE INDEX IF NOT EXISTS requests_owner ON requests (owner, state);
CREATE TABLE IF NOT EXISTS logs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_request ON logs (request_id, seq);
CREATE TABLE IF NOT EXISTS workers (
    worker_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    random_weights INTEGER NOT NULL DEFAULT 0,
    device TEXT NOT NULL DEFAULT '',
    precision TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'starting',
    error TEXT NOT NULL DEFAULT '',
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS stats (
    key TEXT PRIMARY KEY,
    value REAL NOT NULL DEFAULT 0
);
"""

# Columns added after the first release, for ALTER TABLE on older databases.
ADDED_COLUMNS = {
    "requests": {"max_attempts": "INTEGER", "ttl_s": "REAL"},
    "workers": {"precision": "TEXT NOT NULL DEFAULT ''", "error": "TEXT NOT NULL DEFAULT ''"},
}

_COLUMNS = (
    "id, endpoint, state, input, owner, priority, created_at, started_at, completed_at, "
    "attempts, max_attempts, ttl_s, worker_id, cancel_requested, webhook_url, webhook_state, "
    "ephemeral, status_code, result, error, error_type, metrics, input_files, output_files"
)


def _row_to_job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        endpoint=row["endpoint"],
        state=row["state"],
        input=json.loads(row["input"]),
        owner=row["owner"],
        priority=row["priority"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        ttl_s=row["ttl_s"],
        worker_id=row["worker_id"],
        cancel_requested=bool(row["cancel_requested"]),
        webhook_url=row["webhook_url"],
        webhook_state=row["webhook_state"],
        ephemeral=bool(row["ephemeral"]),
        status_code=row["status_code"],
        result=json.loads(row["result"]) if row["result"] is not None else None,
        error=row["error"],
        error_type=row["error_type"],
        metrics=json.loads(row["metrics"] or "{}"),
        input_files=json.loads(row["input_files"] or "[]"),
        output_files=json.loads(row["output_files"] or "[]"),
    )


@raises_service_faults("queue")
class SQLiteQueue(Queue):
    def __init__(self, path: str | os.PathLike, *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        # executescript manages its own transaction; IF NOT EXISTS makes it idempotent.
        self._db().executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A data dir made by an older version gets the columns added since (nullable or defaulted)."""
        db = self._db()
        for table, columns in ADDED_COLUMNS.items():
            have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
            for name, sql_type in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")

    # One connection per thread: sqlite3 connections are not shared across threads.
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                try:
                    self.db.execute("COMMIT")
                    return False
                except sqlite3.Error:
                    self._rollback()
                    raise
            self._rollback()
            return False

        def _rollback(self) -> None:
            # A full disk can fail COMMIT, or roll the transaction back on its own: the
            # connection must leave it either way, or every later BEGIN fails too.
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass

    def _tx(self) -> "SQLiteQueue._Tx":
        return self._Tx(self._db())

    def probe(self, min_free_bytes: int = 0) -> None:
        with self._tx() as db:  # a real write: a full disk shows only then
            db.execute("INSERT INTO stats (key, value) VALUES ('probed_at', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (time.time(),))
        free = shutil.disk_usage(self.path.parent).free
        if free < min_free_bytes:
            raise ServiceFault("queue", f"only {free} bytes free in {self.path.parent}",
                               status_code=507)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @staticmethod
    def _log(db, request_id: str, message: str, level: str = "INFO") -> None:
        db.execute(
            "INSERT INTO logs (request_id, ts, level, message) VALUES (?, ?, ?, ?)",
            (request_id, time.time(), level, message),
        )

    @staticmethod
    def _bump(db, key: str, amount: float = 1.0) -> None:
        db.execute(
            "INSERT INTO stats (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
            (key, amount),
        )

    @staticmethod
    def _finish(db, request_id, *, status_code, result, error, error_type, metrics=None,
                output_files=None, outcome: str) -> None:
        db.execute(
            "UPDATE requests SET state=?, completed_at=?, status_code=?, result=?, error=?, "
            "error_type=?, metrics=COALESCE(?, metrics), output_files=COALESCE(?, output_files), "
            "webhook_state=CASE WHEN webhook_url IS NOT NULL THEN ? ELSE ? END WHERE id=?",
            (
                COMPLETED,
                time.time(),
                status_code,
                json.dumps(result) if result is not None else None,
                error,
                error_type,
                json.dumps(metrics) if metrics is not None else None,
                json.dumps(output_files) if output_files is not None else None,
                WEBHOOK_PENDING,
                WEBHOOK_NONE,
                request_id,
            ),
        )
        SQLiteQueue._bump(db, f"completed_{outcome}")

    @staticmethod
    def _finish_cancelled(db, request_id: str, why: str) -> None:
        SQLiteQueue._finish(
            db, request_id, status_code=CANCELLED_STATUS, result=CANCELLED_RESULT,
            error=CANCELLED_MESSAGE, error_type=CANCELLED_TYPE, outcome="cancelled",
        )
        SQLiteQueue._log(db, request_id, why, "WARN")

    # --- API side -------------------------------------------------------------------------
    def submit(self, endpoint, input, *, owner="", priority=0, webhook_url=None, ephemeral=False,
               start_deadline=None, input_files=None, max_queue_length=None,
               max_attempts=None, ttl_s=None) -> Job:
        request_id = str(uuid.uuid4())
        now = time.time()
        with self._tx() as db:
            if max_queue_length is not None:
                (waiting,) = db.execute(
                    "SELECT COUNT(*) FROM requests WHERE state=?", (IN_QUEUE,)
                ).fetchone()
                if waiting >= max_queue_length:
                    raise QueueFullError(f"the queue is full ({waiting} waiting)")
            db.execute(
                "INSERT INTO requests (id, endpoint, state, input, owner, priority, created_at, "
                "start_deadline, webhook_url, ephemeral, input_files, max_attempts, ttl_s) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request_id, endpoint, IN_QUEUE, json.dumps(input), owner, priority, now,
                    start_deadline, webhook_url, int(ephemeral), json.dumps(input_files or []),
                    max_attempts, ttl_s,
                ),
            )
            self._bump(db, "submitted")
        return self.get(request_id)  # type: ignore[return-value]

    def get(self, request_id):
        row = self._db().execute(
            f"SELECT {_COLUMNS} FROM requests WHERE id=?", (request_id,)
        ).fetchone()
        return _row_to_job(row) if row else None

    def position(self, request_id) -> int:
        row = self._db().execute(
            "SELECT priority, seq FROM requests WHERE id=? AND state=?", (request_id, IN_QUEUE)
        ).fetchone()
        if row is None:
            return 0
        (ahead,) = self._db().execute(
            "SELECT COUNT(*) FROM requests WHERE state=? AND "
            "(priority < ? OR (priority = ? AND seq < ?))",
            (IN_QUEUE, row["priority"], row["priority"], row["seq"]),
        ).fetchone()
        return int(ahead)

    def active_count(self, owner) -> int:
        (n,) = self._db().execute(
            "SELECT COUNT(*) FROM requests WHERE owner=? AND state IN (?, ?)", (owner, IN_QUEUE, IN_PROGRESS)
        ).fetchone()
        return int(n)

    def logs(self, request_id, after_seq=0):
        rows = self._db().execute(
            "SELECT seq, ts, level, message FROM logs WHERE request_id=? AND seq>? ORDER BY seq",
            (request_id, after_seq),
        ).fetchall()
        return [LogRecord(r["seq"], r["ts"], r["level"], r["message"]) for r in rows]

    def add_log(self, request_id, message, level="INFO"):
        with self._tx() as db:
            self._log(db, request_id, message, level)

    def cancel(self, request_id) -> str:
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM requests WHERE id=?", (request_id,)
            ).fetchone()
            if row is None:
                return "not_found"
            if row["state"] == COMPLETED:
                return "completed"
            if row["state"] == IN_QUEUE:
                self._finish_cancelled(db, request_id, "cancelled while queued")
                return "cancelled"
            db.execute("UPDATE requests SET cancel_requested=1 WHERE id=?", (request_id,))
            self._log(db, request_id, "cancellation requested", "WARN")
            return "requested"

    def delete(self, request_id) -> list[str]:
        with self._tx() as db:
            row = db.execute(
                "SELECT input_files, output_files FROM requests WHERE id=?", (request_id,)
            ).fetchone()
            if row is None:
                return []
            db.execute("DELETE FROM requests WHERE id=?", (request_id,))
            db.execute("DELETE FROM logs WHERE request_id=?", (request_id,))
        return json.loads(row["input_files"]) + json.loads(row["output_files"])

    def expire(self, completed_before, now=None) -> list[str]:
        # Undelivered webhooks keep their request alive until delivery ends.
        rows = self._db().execute(
            "SELECT id FROM requests WHERE state=? AND webhook_state!=? AND (completed_at<? "
            "OR completed_at+ttl_s<?)",
            (COMPLETED, WEBHOOK_PENDING, completed_before, time.time() if now is None else now),
        ).fetchall()
        files: list[str] = []
        for r in rows:
            files += self.delete(r["id"])
        return files

    def pending_webhooks(self, limit=100):
        rows = self._db().execute(
            f"SELECT {_COLUMNS} FROM requests WHERE webhook_state=? AND state=? "
            "ORDER BY completed_at LIMIT ?",
            (WEBHOOK_PENDING, COMPLETED, limit),
        ).fetchall()
        return [_row_to_job(r) for r in rows]

    def set_ttl(self, request_id, ttl_s):
        with self._tx() as db:
            db.execute("UPDATE requests SET ttl_s=? WHERE id=?", (float(ttl_s), request_id))

    def set_webhook_state(self, request_id, state):
        with self._tx() as db:
            db.execute("UPDATE requests SET webhook_state=? WHERE id=?", (state, request_id))

    def stats(self) -> dict[str, float]:
        db = self._db()
        out = {r["key"]: r["value"] for r in db.execute("SELECT key, value FROM stats")}
        for state in (IN_QUEUE, IN_PROGRESS, COMPLETED):
            (n,) = db.execute("SELECT COUNT(*) FROM requests WHERE state=?", (state,)).fetchone()
            out[f"state_{state}"] = n
        return out

    # --- worker side ----------------------------------------------------------------------
    def _expire_start_deadlines(self, db) -> None:
        rows = db.execute(
            "SELECT id FROM requests WHERE state=? AND start_deadline IS NOT NULL "
            "AND start_deadline<?",
            (IN_QUEUE, time.time()),
        ).fetchall()
        for r in rows:
            self._finish(
                db, r["id"], status_code=504,
                result={"detail": "Request timed out", "error_type": "request_timeout"},
                error="Request timed out before it started", error_type="request_timeout",
                outcome="timeout",
            )

    def claim(self, worker_id, endpoint=None):
        now = time.time()
        with self._tx() as db:
            self._expire_start_deadlines(db)
            if endpoint:
                row = db.execute(
                    "SELECT id FROM requests WHERE state=? AND endpoint=? "
                    "ORDER BY priority, seq LIMIT 1",
                    (IN_QUEUE, endpoint),
                ).fetchone()
            else:
                row = db.execute(
                    "SELECT id FROM requests WHERE state=? ORDER BY priority, seq LIMIT 1",
                    (IN_QUEUE,),
                ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE requests SET state=?, worker_id=?, started_at=?, heartbeat_at=?, "
                "attempts=attempts+1 WHERE id=?",
                (IN_PROGRESS, worker_id, now, now, row["id"]),
            )
        return self.get(row["id"])

    def heartbeat(self, worker_id):
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE requests SET heartbeat_at=? WHERE worker_id=? AND state=?",
                (now, worker_id, IN_PROGRESS),
            )
            db.execute("UPDATE workers SET heartbeat_at=? WHERE worker_id=?", (now, worker_id))

    def is_cancel_requested(self, request_id) -> bool:
        row = self._db().execute(
            "SELECT cancel_requested FROM requests WHERE id=?", (request_id,)
        ).fetchone()
        # A request deleted meanwhile counts as cancelled: nobody wants its result.
        return row is None or bool(row["cancel_requested"])

    def complete(self, request_id, *, worker_id, status_code, result, error=None,
                 error_type=None, metrics=None, output_files=None, op_id=None) -> bool:
        # op_id is not needed here: a transaction that fails to commit leaves nothing done.
        with self._tx() as db:
            row = db.execute(
                "SELECT state, worker_id FROM requests WHERE id=?", (request_id,)
            ).fetchone()
            if row is None or row["state"] != IN_PROGRESS:
                return False
            if worker_id is not None and row["worker_id"] != worker_id:
                return False
            outcome = "ok" if error is None else (
                "cancelled" if error_type == "request_cancelled" else "error"
            )
            self._finish(
                db, request_id, status_code=status_code, result=result, error=error,
                error_type=error_type, metrics=metrics, output_files=output_files,
                outcome=outcome,
            )
            if metrics and "inference_time" in metrics:
                self._bump(db, "inference_seconds_sum", float(metrics["inference_time"]))
                self._bump(db, "inference_count")
        return True

    def _release(self, db, rows, max_attempts: int, reason: str) -> list[str]:
        ids = []
        for r in rows:
            if r["cancel_requested"]:
                self._finish_cancelled(db, r["id"], f"{reason}; cancelled as requested")
            elif r["attempts"] >= min(max_attempts, r["max_attempts"] or max_attempts):
                self._finish(
                    db, r["id"], status_code=503,
                    result={"detail": f"Generation failed: {reason}",
                            "error_type": "runner_disconnected"},
                    error=f"Generation failed: {reason}", error_type="runner_disconnected",
                    outcome="error",
                )
                self._log(db, r["id"], f"{reason}; giving up after {r['attempts']} attempts",
                          "ERROR")
            else:
                db.execute(
                    "UPDATE requests SET state=?, worker_id=NULL, started_at=NULL, "
                    "heartbeat_at=NULL WHERE id=?",
                    (IN_QUEUE, r["id"]),
                )
                self._log(db, r["id"], f"{reason}; queued again", "WARN")
                self._bump(db, "requeued")
            ids.append(r["id"])
        return ids

    def release(self, request_id, worker_id) -> bool:
        with self._tx() as db:
            row = db.execute(
                "SELECT cancel_requested FROM requests WHERE id=? AND state=? AND worker_id=?",
                (request_id, IN_PROGRESS, worker_id),
            ).fetchone()
            if row is not None and row["cancel_requested"]:
                self._finish_cancelled(db, request_id, "worker shut down; cancelled as requested")
                return True
            cur = db.execute(
                "UPDATE requests SET state=?, worker_id=NULL, started_at=NULL, heartbeat_at=NULL, "
                "attempts=MAX(attempts-1, 0) WHERE id=? AND state=? AND worker_id=?",
                (IN_QUEUE, request_id, IN_PROGRESS, worker_id),
            )
            if cur.rowcount:
                self._log(db, request_id, "worker shut down; queued again", "WARN")
            return bool(cur.rowcount)

    def requeue_stale(self, lease_timeout_s, max_attempts):
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, attempts, max_attempts, cancel_requested FROM requests "
                "WHERE state=? AND heartbeat_at<?",
                (IN_PROGRESS, time.time() - lease_timeout_s),
            ).fetchall()
            self._expire_start_deadlines(db)
            return self._release(db, rows, max_attempts, "the worker stopped responding")

    def release_worker(self, worker_id, max_attempts):
        with self._tx() as db:
            rows = db.execute(
                "SELECT id, attempts, max_attempts, cancel_requested FROM requests "
                "WHERE state=? AND worker_id=?",
                (IN_PROGRESS, worker_id),
            ).fetchall()
            db.execute("DELETE FROM workers WHERE worker_id=?", (worker_id,))
            return self._release(db, rows, max_attempts, "the worker process died")

    def register_worker(self, info: WorkerInfo):
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO workers (worker_id, pid, model, random_weights, device, precision, state, "
                "error, started_at, heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(worker_id) DO UPDATE SET pid=excluded.pid, model=excluded.model, "
                "random_weights=excluded.random_weights, device=excluded.device, "
                "precision=excluded.precision, state=excluded.state, error=excluded.error, "
                "heartbeat_at=excluded.heartbeat_at",
                (info.worker_id, info.pid, info.model, int(info.random_weights), info.device,
                 info.precision, info.state, info.error, info.started_at or now, now),
            )

    def remove_worker(self, worker_id):
        with self._tx() as db:
            db.execute("DELETE FROM workers WHERE worker_id=?", (worker_id,))

    def workers(self, alive_within_s=None):
        rows = self._db().execute("SELECT * FROM workers ORDER BY started_at").fetchall()
        now = time.time()
        out = []
        for r in rows:
            if alive_within_s is not None and r["heartbeat_at"] < now - alive_within_s:
                continue
            out.append(WorkerInfo(
                worker_id=r["worker_id"], pid=r["pid"], model=r["model"],
                random_weights=bool(r["random_weights"]), device=r["device"],
                precision=r["precision"], state=r["state"], error=r["error"],
                started_at=r["started_at"], heartbeat_at=r["heartbeat_at"],
            ))
        return out

