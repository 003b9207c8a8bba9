"""The embedded SQLite queue: ordering, states, leases, crash recovery, retention, webhooks."""

from __future__ import annotations

import threading
import time

import pytest

from pulid_flux.queue.base import (
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    WEBHOOK_DELIVERED,
    WEBHOOK_NONE,
    WEBHOOK_PENDING,
    QueueFullError,
    WorkerInfo,
)
from pulid_flux.queue.sqlite import SQLiteQueue

EP = "fal-ai/flux-pulid"


@pytest.fixture
def q(tmp_path):
    return SQLiteQueue(tmp_path / "q.sqlite3")


def test_fifo_with_priorities_and_positions(q):
    a = q.submit(EP, {"n": 1})
    b = q.submit(EP, {"n": 2}, priority=1)  # low
    c = q.submit(EP, {"n": 3})
    assert [q.position(x.id) for x in (a, c, b)] == [0, 1, 2]
    order = [q.claim("w").input["n"] for _ in range(3)]
    assert order == [1, 3, 2]  # low waits behind every normal request
    assert q.claim("w") is None


def test_states_logs_and_completion(q):
    job = q.submit(EP, {"x": 1}, owner="o", input_files=["f1"])
    assert job.state == IN_QUEUE and job.owner == "o" and job.attempts == 0
    claimed = q.claim("w1")
    assert claimed.id == job.id and claimed.state == IN_PROGRESS and claimed.attempts == 1
    q.add_log(job.id, "step 1/2")
    q.add_log(job.id, "step 2/2")
    logs = q.logs(job.id)
    assert [l.message for l in logs] == ["step 1/2", "step 2/2"]
    assert [l.message for l in q.logs(job.id, after_seq=logs[0].seq)] == ["step 2/2"]
    # Another worker cannot complete it.
    assert not q.complete(job.id, worker_id="w2", status_code=200, result={})
    assert q.complete(job.id, worker_id="w1", status_code=200, result={"ok": True},
                      metrics={"inference_time": 0.5}, output_files=["f2"])
    done = q.get(job.id)
    assert done.state == COMPLETED and done.result == {"ok": True} and done.status_code == 200
    assert done.metrics == {"inference_time": 0.5} and done.error is None
    assert done.webhook_state == WEBHOOK_NONE
    stats = q.stats()
    assert stats["completed_ok"] == 1 and stats["inference_count"] == 1
    assert q.delete(job.id) == ["f1", "f2"]
    assert q.get(job.id) is None and q.logs(job.id) == []


def test_cancel_queued_running_completed_missing(q):
    a = q.submit(EP, {})
    b = q.submit(EP, {})
    assert q.claim("w").id == a.id
    assert q.cancel(b.id) == "cancelled"
    cb = q.get(b.id)
    assert cb.state == COMPLETED and cb.error_type == "request_cancelled" and cb.status_code == 400
    assert q.cancel(a.id) == "requested"
    assert q.get(a.id).state == IN_PROGRESS and q.is_cancel_requested(a.id)
    assert q.cancel(b.id) == "completed"
    assert q.cancel("nope") == "not_found"
    assert q.claim("w") is None  # the cancelled queued one never runs


def test_crash_requeues_once_then_fails(q):
    job = q.submit(EP, {})
    q.claim("w1")
    time.sleep(0.05)
    assert q.requeue_stale(lease_timeout_s=0.01, max_attempts=2) == [job.id]
    again = q.get(job.id)
    assert again.state == IN_QUEUE and again.attempts == 1
    assert any("queued again" in l.message for l in q.logs(job.id))
    assert q.claim("w2").attempts == 2
    time.sleep(0.05)
    q.requeue_stale(lease_timeout_s=0.01, max_attempts=2)
    failed = q.get(job.id)
    assert failed.state == COMPLETED and failed.error_type == "runner_disconnected"
    assert failed.status_code == 503


def test_heartbeat_keeps_the_lease(q):
    job = q.submit(EP, {})
    q.claim("w1")
    time.sleep(0.1)
    q.heartbeat("w1")
    assert q.requeue_stale(lease_timeout_s=0.08, max_attempts=2) == []
    assert q.get(job.id).state == IN_PROGRESS


def test_release_worker_and_graceful_release(q):
    a = q.submit(EP, {})
    q.register_worker(WorkerInfo(worker_id="w1", pid=1, model="tiny", state="ready"))
    q.claim("w1")
    assert q.release_worker("w1", max_attempts=2) == [a.id]
    assert q.get(a.id).state == IN_QUEUE
    assert q.workers() == []
    q.claim("w2")
    assert q.release(a.id, "w2")  # a shutdown hands back without using up an attempt
    assert q.get(a.id).attempts == 1


def test_survives_reopen(tmp_path):
    q1 = SQLiteQueue(tmp_path / "q.sqlite3")
    job = q1.submit(EP, {"prompt": "p"}, webhook_url="http://x/hook")
    q1.add_log(job.id, "hello")
    q1.close()
    q2 = SQLiteQueue(tmp_path / "q.sqlite3")
    again = q2.get(job.id)
    assert again.input == {"prompt": "p"} and again.webhook_url == "http://x/hook"
    assert [l.message for l in q2.logs(job.id)] == ["hello"]


def test_webhook_state_and_expiry(q):
    job = q.submit(EP, {}, webhook_url="http://x/hook", input_files=["a"])
    q.claim("w")
    q.complete(job.id, worker_id="w", status_code=200, result={}, output_files=["b"])
    assert [j.id for j in q.pending_webhooks()] == [job.id]
    assert q.get(job.id).webhook_state == WEBHOOK_PENDING
    # Undelivered webhooks hold the request back from expiry.
    assert q.expire(time.time() + 10) == []
    q.set_webhook_state(job.id, WEBHOOK_DELIVERED)
    assert q.pending_webhooks() == []
    assert q.expire(time.time() - 100) == []  # not old enough
    assert sorted(q.expire(time.time() + 10)) == ["a", "b"]
    assert q.get(job.id) is None


def test_queue_length_limit_and_start_deadline(q):
    q.submit(EP, {}, max_queue_length=1)
    with pytest.raises(QueueFullError):
        q.submit(EP, {}, max_queue_length=1)
    late = q.submit(EP, {}, start_deadline=time.time() - 1)
    first = q.claim("w")
    assert first.id != late.id
    timed_out = q.get(late.id)
    assert timed_out.state == COMPLETED and timed_out.status_code == 504
    assert timed_out.error_type == "request_timeout"


def test_concurrent_claims_never_share_a_request(tmp_path):
    path = tmp_path / "q.sqlite3"
    q = SQLiteQueue(path)
    ids = {q.submit(EP, {"i": i}).id for i in range(40)}
    got: list[str] = []
    lock = threading.Lock()

    def work(name):
        mine = SQLiteQueue(path)
        while (job := mine.claim(name)) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)


def test_a_database_of_an_older_version_gets_the_new_columns(tmp_path):
    import sqlite3

    from pulid_flux.queue.sqlite import ADDED_COLUMNS, SCHEMA

    path = tmp_path / "old.sqlite3"
    old_schema = SCHEMA
    for columns in ADDED_COLUMNS.values():
        for name, sql_type in columns.items():
            old_schema = old_schema.replace(f"    {name} {sql_type},\n", "")
    assert "max_attempts" not in old_schema and "error TEXT NOT NULL" not in old_schema
    db = sqlite3.connect(path)
    db.executescript(old_schema)
    db.execute("INSERT INTO requests (id, endpoint, state, input, created_at) "
               "VALUES ('old', 'ep', 'IN_QUEUE', '{}', 0)")
    db.commit()
    db.close()
    q = SQLiteQueue(path)
    assert q.get("old").max_attempts is None
    q.register_worker(WorkerInfo(worker_id="w", pid=1, precision="bf16"))
    assert q.workers()[0].precision == "bf16"
    assert q.claim("w", "ep").id == "old"
    assert q.get(q.submit("ep", {}, max_attempts=1).id).max_attempts == 1
    q.register_worker(WorkerInfo(worker_id="w2", pid=1, state="failed", error="no weights"))
    assert [w.error for w in q.workers() if w.worker_id == "w2"] == ["no weights"]
