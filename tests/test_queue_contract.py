"""One behavioural contract, run against every queue backend (embedded SQLite and Redis).

The Redis backend runs against a real ``redis-server`` started here on a free loopback port.
The last section covers what only the Redis backend has: XAUTOCLAIM take-over, exactly-once
webhook claims, idempotent retries and a restart with AOF persistence.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from loopback import free_port

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

EP = "fal-ai/flux-pulid"
REDIS_BIN = shutil.which("redis-server")


class RedisServer:
    """A throwaway ``redis-server`` on a loopback port (also used by test_scale_out)."""

    def __init__(self, directory: Path, *, aof: bool = False, port: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.aof = aof
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> "RedisServer":
        import redis

        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.aof
                       else ["--appendonly", "no"])
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", *persistence, "--protected-mode", "yes"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    # Loading an AOF answers LOADING errors until done.
                    return self
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((self.dir / "redis.log").read_text()[-2000:])
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


needs_redis = pytest.mark.skipif(REDIS_BIN is None,
                                 reason="redis-server is not installed (apt-get install redis-server)")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if REDIS_BIN is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def make_redis_queue(url: str, **kw):
    from pulid_flux.queue.redis import RedisQueue

    kw.setdefault("visibility_timeout_s", 60.0)  # contract tests use requeue_stale explicitly
    kw.setdefault("retry_s", 5.0)
    return RedisQueue(url, prefix=kw.pop("prefix", f"test-{uuid.uuid4().hex[:8]}:"), **kw)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=needs_redis)])
def backend(request, tmp_path):
    """A factory of queue handles that share one store (like several processes would)."""
    if request.param == "sqlite":
        from pulid_flux.queue.sqlite import SQLiteQueue

        path = tmp_path / "q.sqlite3"
        return lambda: SQLiteQueue(path)
    server = request.getfixturevalue("redis_server")
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    return lambda: make_redis_queue(server.url, prefix=prefix)


@pytest.fixture
def q(backend):
    return backend()


# --- the contract -----------------------------------------------------------------------------

def test_fifo_priorities_and_positions(q):
    a = q.submit(EP, {"n": 1})
    b = q.submit(EP, {"n": 2}, priority=1)  # low
    c = q.submit(EP, {"n": 3})
    d = q.submit(EP, {"n": 4}, priority=1)
    assert a.state == IN_QUEUE and a.attempts == 0 and a.input == {"n": 1}
    assert [q.position(x.id) for x in (a, c, b, d)] == [0, 1, 2, 3]
    first = q.claim("w1", EP)
    assert first.id == a.id and first.state == IN_PROGRESS and first.worker_id == "w1"
    assert first.attempts == 1 and first.started_at is not None
    assert [q.position(x.id) for x in (c, b, d)] == [0, 1, 2]
    assert q.position(a.id) == 0  # not waiting any more
    assert [q.claim("w1", EP).input["n"] for _ in range(3)] == [3, 2, 4]
    assert q.claim("w1", EP) is None


def test_claim_filters_by_endpoint(q):
    other = q.submit("someone/else", {"n": 1})
    mine = q.submit(EP, {"n": 2})
    assert q.claim("w", EP).id == mine.id
    assert q.claim("w", EP) is None
    assert q.claim("w").id == other.id


def test_queue_length_limit(q):
    q.submit(EP, {}, max_queue_length=2)
    q.submit(EP, {}, max_queue_length=2)
    with pytest.raises(QueueFullError):
        q.submit(EP, {}, max_queue_length=2)
    q.claim("w", EP)  # running requests do not count
    q.submit(EP, {}, max_queue_length=2)


def test_active_count_is_per_owner_queued_and_running(q):
    a1 = q.submit(EP, {}, owner="a")
    a2 = q.submit(EP, {}, owner="a")
    q.submit(EP, {}, owner="b")
    assert (q.active_count("a"), q.active_count("b"), q.active_count("c")) == (2, 1, 0)
    running = q.claim("w", EP)
    assert running.id == a1.id and q.active_count("a") == 2  # running requests count
    assert q.complete(a1.id, worker_id="w", status_code=200, result={})
    assert q.active_count("a") == 1  # completed ones do not
    assert q.cancel(a2.id) == "cancelled"
    assert (q.active_count("a"), q.active_count("b")) == (0, 1)


def test_logs_are_incremental(q):
    job = q.submit(EP, {})
    q.add_log(job.id, "one")
    q.add_log(job.id, "two", "WARN")
    logs = q.logs(job.id)
    assert [(r.level, r.message) for r in logs] == [("INFO", "one"), ("WARN", "two")]
    assert logs[0].seq < logs[1].seq and logs[0].timestamp <= logs[1].timestamp
    assert [r.message for r in q.logs(job.id, logs[0].seq)] == ["two"]
    assert q.logs(job.id, logs[1].seq) == []


def test_complete_only_by_holder_and_once(q):
    job = q.submit(EP, {"x": 1}, owner="alice", input_files=["in1"])
    assert q.complete(job.id, worker_id="w1", status_code=200, result={}) is False  # queued
    q.claim("w1", EP)
    assert q.complete(job.id, worker_id="w2", status_code=200, result={}) is False
    assert q.complete(job.id, worker_id="w1", status_code=200, result={"images": [1]},
                      metrics={"inference_time": 0.5}, output_files=["out1"]) is True
    assert q.complete(job.id, worker_id="w1", status_code=200, result={}) is False
    done = q.get(job.id)
    assert done.state == COMPLETED and done.status_code == 200
    assert done.result == {"images": [1]} and done.metrics == {"inference_time": 0.5}
    assert done.output_files == ["out1"] and done.input_files == ["in1"]
    assert done.owner == "alice" and done.error is None and done.completed_at >= done.started_at
    assert done.webhook_state == WEBHOOK_NONE
    stats = q.stats()
    assert stats["completed_ok"] == 1 and stats["submitted"] == 1
    assert stats["inference_count"] == 1 and stats["inference_seconds_sum"] == pytest.approx(0.5)
    assert stats[f"state_{COMPLETED}"] == 1 and stats[f"state_{IN_QUEUE}"] == 0


def test_error_completion_is_counted(q):
    job = q.submit(EP, {})
    q.claim("w", EP)
    assert q.complete(job.id, worker_id=None, status_code=500, result={"detail": "boom"},
                      error="boom", error_type="internal_error")
    got = q.get(job.id)
    assert (got.state, got.status_code, got.error, got.error_type) == (
        COMPLETED, 500, "boom", "internal_error")
    assert q.stats()["completed_error"] == 1


def test_cancel_queued_running_and_completed(q):
    queued = q.submit(EP, {"n": 1})
    running = q.submit(EP, {"n": 2})
    assert q.cancel(queued.id) == "cancelled"
    got = q.get(queued.id)
    assert got.state == COMPLETED and got.status_code == 400
    assert got.error_type == "request_cancelled" and got.result["error_type"] == "request_cancelled"
    assert q.claim("w", EP).id == running.id  # the cancelled one is skipped
    assert q.is_cancel_requested(running.id) is False
    assert q.cancel(running.id) == "requested"
    assert q.is_cancel_requested(running.id) is True
    assert q.get(running.id).state == IN_PROGRESS
    assert "cancellation requested" in [r.message for r in q.logs(running.id)]
    q.complete(running.id, worker_id="w", status_code=400, result={"detail": "cancelled"},
               error="Request was cancelled", error_type="request_cancelled")
    assert q.cancel(running.id) == "completed"
    assert q.cancel(str(uuid.uuid4())) == "not_found"
    assert q.stats()["completed_cancelled"] == 2


def test_release_hands_back_without_counting(q):
    a = q.submit(EP, {"n": 1})
    b = q.submit(EP, {"n": 2})
    q.claim("w1", EP)
    assert q.release(a.id, "w2") is False  # not its holder
    assert q.release(a.id, "w1") is True
    got = q.get(a.id)
    assert got.state == IN_QUEUE and got.attempts == 0 and got.worker_id is None
    assert q.position(a.id) == 0 and q.position(b.id) == 1
    again = q.claim("w2", EP)
    assert again.id == a.id and again.attempts == 1  # ahead of the newer request


def test_heartbeat_keeps_lease_and_stale_requests_requeue_then_fail(q):
    a = q.submit(EP, {"n": 1})
    b = q.submit(EP, {"n": 2})
    q.claim("w1", EP)
    q.claim("w2", EP)
    time.sleep(0.6)
    q.heartbeat("w2")  # w2 is alive, w1 went silent
    assert q.requeue_stale(0.5, max_attempts=2) == [a.id]
    got = q.get(a.id)
    assert got.state == IN_QUEUE and got.worker_id is None and got.attempts == 1
    assert q.get(b.id).state == IN_PROGRESS
    assert "the worker stopped responding; queued again" in [r.message for r in q.logs(a.id)]
    assert q.stats()["requeued"] == 1
    # The old holder cannot complete it any more.
    assert q.complete(a.id, worker_id="w1", status_code=200, result={}) is False
    again = q.claim("w3", EP)
    assert again.id == a.id and again.attempts == 2
    time.sleep(0.6)
    q.heartbeat("w2")
    assert q.requeue_stale(0.5, max_attempts=2) == [a.id]
    failed = q.get(a.id)
    assert failed.state == COMPLETED and failed.status_code == 503
    assert failed.error_type == "runner_disconnected"
    assert q.complete(a.id, worker_id="w3", status_code=200, result={}) is False


def test_release_worker_requeues_what_it_held(q):
    q.register_worker(WorkerInfo(worker_id="w1", pid=1, model="tiny", state="ready"))
    a = q.submit(EP, {"n": 1})
    q.claim("w1", EP)
    assert q.release_worker("w1", max_attempts=2) == [a.id]
    assert q.get(a.id).state == IN_QUEUE
    assert [w.worker_id for w in q.workers()] == []
    assert "the worker process died; queued again" in [r.message for r in q.logs(a.id)]
    q.claim("w2", EP)
    assert q.release_worker("w2", max_attempts=1) == [a.id]
    assert q.get(a.id).error_type == "runner_disconnected"


def test_a_request_capped_at_one_attempt_is_not_run_again(q):
    # x-fal-no-retry: the request's own cap wins over the server's max_attempts
    once = q.submit(EP, {"n": 1}, max_attempts=1)
    normal = q.submit(EP, {"n": 2})
    assert q.get(once.id).max_attempts == 1 and q.get(normal.id).max_attempts is None
    q.claim("w1", EP)
    q.claim("w1", EP)
    assert sorted(q.release_worker("w1", max_attempts=2)) == sorted([once.id, normal.id])
    assert q.get(once.id).error_type == "runner_disconnected"
    assert "giving up after 1 attempts" in q.logs(once.id)[-1].message
    assert q.get(normal.id).state == IN_QUEUE
    q.claim("w2", EP)
    time.sleep(0.6)
    assert q.requeue_stale(0.5, max_attempts=2) == [normal.id]
    assert q.get(normal.id).error_type == "runner_disconnected"


def test_start_deadline_times_out_queued_requests(q):
    late = q.submit(EP, {"n": 1}, start_deadline=time.time() - 1)
    ok = q.submit(EP, {"n": 2}, start_deadline=time.time() + 60)
    assert q.claim("w", EP).id == ok.id
    got = q.get(late.id)
    assert got.state == COMPLETED and got.status_code == 504
    assert got.error_type == "request_timeout"
    assert q.stats()["completed_timeout"] == 1


@pytest.mark.parametrize("lost", ["release_worker", "requeue_stale", "release"])
def test_a_cancelled_request_whose_worker_is_lost_completes_as_cancelled(q, lost):
    job = q.submit(EP, {})
    other = q.submit(EP, {})
    q.claim("w1", EP)
    q.claim("w1", EP)
    assert q.cancel(job.id) == "requested"
    if lost == "release_worker":  # the worker process died (kill -9)
        assert sorted(q.release_worker("w1", max_attempts=3)) == sorted([job.id, other.id])
        why = "the worker process died; cancelled as requested"
    elif lost == "requeue_stale":  # its lease ran out
        time.sleep(0.6)
        assert sorted(q.requeue_stale(0.5, max_attempts=3)) == sorted([job.id, other.id])
        why = "the worker stopped responding; cancelled as requested"
    else:  # it shut down and handed the request back
        assert q.release(job.id, "w1") is True and q.release(other.id, "w1") is True
        why = "worker shut down; cancelled as requested"
    done = q.get(job.id)
    assert (done.state, done.status_code, done.error, done.error_type) == (
        COMPLETED, 400, "Request was cancelled", "request_cancelled")
    assert done.result == {"detail": "Request was cancelled", "error_type": "request_cancelled"}
    assert q.logs(job.id)[-1].message == why
    assert q.complete(job.id, worker_id="w1", status_code=200, result={}) is False
    # Only the request without a cancel runs again, once.
    assert q.claim("w2", EP).id == other.id
    assert q.claim("w2", EP) is None
    assert q.stats()["completed_cancelled"] == 1


@needs_redis
def test_redis_takeover_of_a_cancelled_request_completes_it_as_cancelled(redis_server):
    q = make_redis_queue(redis_server.url, visibility_timeout_s=0.5)
    job = q.submit(EP, {})
    q.claim("dead", EP)
    q.cancel(job.id)
    time.sleep(0.7)
    assert q.claim("alive", EP) is None  # XAUTOCLAIM found it, and did not run it again
    assert q.get(job.id).error_type == "request_cancelled"


def test_webhooks_pending_until_delivered_and_expiry(q):
    hooked = q.submit(EP, {}, webhook_url="https://example.invalid/hook", input_files=["i"])
    plain = q.submit(EP, {})
    for job in (hooked, plain):
        q.claim("w", EP)
        q.complete(job.id, worker_id="w", status_code=200, result={"ok": 1}, output_files=["o"])
    assert q.get(hooked.id).webhook_state == WEBHOOK_PENDING
    assert q.get(plain.id).webhook_state == WEBHOOK_NONE
    assert [j.id for j in q.pending_webhooks(10)] == [hooked.id]
    # Pending webhooks keep their request; the other one expires with its files.
    assert sorted(q.expire(time.time() + 1)) == ["o"]
    assert q.get(plain.id) is None and q.get(hooked.id) is not None
    q.set_webhook_state(hooked.id, WEBHOOK_DELIVERED)
    assert q.pending_webhooks(10) == []
    assert q.get(hooked.id).webhook_state == WEBHOOK_DELIVERED
    assert q.expire(time.time() - 3600) == []  # completed too recently
    assert sorted(q.expire(time.time() + 1)) == ["i", "o"]
    assert q.get(hooked.id) is None


def test_a_request_with_its_own_retention_expires_sooner(q):
    short = q.submit(EP, {}, ttl_s=60, input_files=["s"])
    plain = q.submit(EP, {}, input_files=["p"])
    assert q.get(short.id).ttl_s == 60 and q.get(plain.id).ttl_s is None
    for _ in range(2):
        job = q.claim("w", EP)
        q.complete(job.id, worker_id="w", status_code=200, result={})
    done_at = q.get(short.id).completed_at
    long_ago = done_at - 3600  # the server's own retention has not run out for either
    assert q.expire(long_ago, now=done_at + 59) == []
    assert q.expire(long_ago, now=done_at + 61) == ["s"]
    assert q.get(short.id) is None and q.get(plain.id) is not None
    assert q.expire(long_ago, now=done_at + 10**6) == []  # the plain one waits for completed_before
    q.set_ttl(plain.id, 5)  # shortened after completion
    assert q.get(plain.id).ttl_s == 5
    assert q.expire(long_ago, now=done_at + 4) == []
    assert q.expire(long_ago, now=done_at + 6) == ["p"]


def test_delete_and_deleted_counts_as_cancelled(q):
    job = q.submit(EP, {}, input_files=["a", "b"])
    q.add_log(job.id, "x")
    q.claim("w", EP)
    assert sorted(q.delete(job.id)) == ["a", "b"]
    assert q.get(job.id) is None and q.logs(job.id) == []
    assert q.is_cancel_requested(job.id) is True
    assert q.delete(job.id) == []
    assert q.complete(job.id, worker_id="w", status_code=200, result={}) is False


def test_worker_registry_and_liveness(q):
    q.register_worker(WorkerInfo(worker_id="a", pid=11, model="tiny", device="cpu", state="loading"))
    q.register_worker(WorkerInfo(worker_id="b", pid=12, model="tiny", random_weights=True))
    q.register_worker(WorkerInfo(worker_id="a", pid=11, model="tiny", device="cpu", precision="fp32", state="ready"))
    ws = {w.worker_id: w for w in q.workers()}
    assert set(ws) == {"a", "b"} and ws["a"].state == "ready" and ws["b"].random_weights
    assert ws["a"].precision == "fp32" and ws["b"].precision == ""
    assert ws["a"].pid == 11 and ws["a"].device == "cpu" and ws["a"].heartbeat_at > 0
    time.sleep(0.6)
    q.heartbeat("a")
    assert [w.worker_id for w in q.workers(alive_within_s=0.5)] == ["a"]
    q.remove_worker("a")
    assert [w.worker_id for w in q.workers()] == ["b"]


def test_concurrent_claims_take_each_request_once(backend):
    first = backend()
    ids = {first.submit(EP, {"n": i}).id for i in range(40)}
    taken: list[str] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        q = backend()  # own connection, like a separate process
        while True:
            job = q.claim(f"w{n}", EP)
            if job is None:
                return
            assert q.complete(job.id, worker_id=f"w{n}", status_code=200, result={"n": n})
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == sorted(ids)
    assert first.stats()["completed_ok"] == 40


# --- Redis-only mechanisms ------------------------------------------------------------------------

@needs_redis
def test_redis_visibility_timeout_takeover_without_any_sweeper(redis_server):
    q = make_redis_queue(redis_server.url, visibility_timeout_s=0.5, max_attempts=2)
    job = q.submit(EP, {})
    assert q.claim("dead", EP).id == job.id
    assert q.claim("alive", EP) is None  # not idle long enough yet
    time.sleep(0.7)
    taken = q.claim("alive", EP)  # XAUTOCLAIM of the silent worker's entry
    assert taken.id == job.id and taken.worker_id == "alive" and taken.attempts == 2
    assert q.complete(job.id, worker_id="dead", status_code=200, result={}) is False
    q.heartbeat("alive")
    time.sleep(0.3)
    q.heartbeat("alive")
    time.sleep(0.3)
    assert q.claim("third", EP) is None  # heartbeats keep the entry with its holder
    time.sleep(0.7)
    assert q.claim("third", EP) is None  # attempts exhausted: failed, not run a third time
    failed = q.get(job.id)
    assert failed.state == COMPLETED and failed.error_type == "runner_disconnected"
    assert q.complete(job.id, worker_id="alive", status_code=200, result={}) is False


@needs_redis
def test_redis_claim_retry_and_restarted_worker_with_same_id(redis_server):
    q = make_redis_queue(redis_server.url, visibility_timeout_s=0.5)
    a = q.submit(EP, {"n": 1})
    b = q.submit(EP, {"n": 2})
    args = [q.prefix, "w", "token-1", 0.5, 2, EP, q.instance]
    assert q._claim(args=args) == a.id
    assert q._claim(args=args) == a.id  # a retried call after a lost reply
    assert q.get(a.id).attempts == 1 and q.position(b.id) == 0
    # The process dies; a new one starts with the same worker id. Its heartbeats do not
    # renew what the old process held, so that request is taken over after the timeout.
    restarted = make_redis_queue(redis_server.url, prefix=q.prefix, visibility_timeout_s=0.5)
    assert restarted.claim("w", EP).id == b.id
    for _ in range(4):
        restarted.heartbeat("w")
        time.sleep(0.2)
    assert q.get(b.id).state == IN_PROGRESS
    taken = restarted.claim("other", EP)
    assert taken.id == a.id and taken.attempts == 2


@needs_redis
def test_redis_webhook_delivery_is_claimed_by_one_replica(redis_server):
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    replicas = [make_redis_queue(redis_server.url, prefix=prefix) for _ in range(4)]
    q = replicas[0]
    ids = []
    for _ in range(10):
        job = q.submit(EP, {}, webhook_url="https://example.invalid/hook")
        q.claim("w", EP)
        q.complete(job.id, worker_id="w", status_code=200, result={})
        ids.append(job.id)
    got: list[str] = []
    lock = threading.Lock()

    def poll(r):
        for _ in range(5):
            jobs = r.pending_webhooks(100)
            with lock:
                got.extend(j.id for j in jobs)

    threads = [threading.Thread(target=poll, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(got) == sorted(ids)  # each delivery owned by exactly one replica


@needs_redis
def test_redis_restart_with_aof_loses_nothing(tmp_path):
    server = RedisServer(tmp_path / "aof", aof=True).start()
    try:
        q = make_redis_queue(server.url, visibility_timeout_s=60.0, retry_s=20.0)
        done = q.submit(EP, {"n": 0}, webhook_url="https://example.invalid/h")
        q.claim("w", EP)
        q.complete(done.id, worker_id="w", status_code=200, result={"r": 1}, output_files=["f"])
        running = q.submit(EP, {"n": 1})
        waiting = q.submit(EP, {"n": 2}, priority=1)
        q.claim("w", EP)
        q.add_log(running.id, "before the restart")
        server.kill()  # SIGKILL: only what reached the AOF survives
        server = RedisServer(server.dir, aof=True, port=server.port).start()
        # The same client reconnects by itself.
        assert q.get(done.id).result == {"r": 1}
        assert q.pending_webhooks(10)[0].id == done.id
        assert q.get(running.id).state == IN_PROGRESS
        assert [r.message for r in q.logs(running.id)] == ["before the restart"]
        assert q.position(waiting.id) == 0
        assert q.release_worker("w", max_attempts=2) == [running.id]
        assert q.claim("w2", EP).id == running.id  # the stream entry and group survived
        assert q.claim("w2", EP).id == waiting.id
        assert q.stats()["submitted"] == 3
    finally:
        server.stop()


@needs_redis
def test_redis_outage_fails_fast_with_a_service_fault_and_recovers(tmp_path):
    from pulid_flux.errors import ServiceFault

    server = RedisServer(tmp_path / "outage", aof=True).start()
    try:
        q = make_redis_queue(server.url, visibility_timeout_s=0.5, retry_s=1.5,
                             probe_interval_s=0.5)
        running = q.submit(EP, {"n": 1})
        waiting = q.submit(EP, {"n": 2})
        q.claim("w", EP)
        server.stop()
        started = time.monotonic()
        with pytest.raises(ServiceFault) as first:
            q.get(waiting.id)
        assert time.monotonic() - started < 3  # the retry window, not a hang
        fault = first.value
        assert fault.component == "queue" and fault.status_code == 503
        assert f"Redis at 127.0.0.1:{server.port} is unreachable" in fault.reason
        started = time.monotonic()
        for _ in range(20):  # between probes, calls fail at once
            with pytest.raises(ServiceFault):
                q.stats()
        time.sleep(0.5)
        with pytest.raises(ServiceFault):  # a probe: one attempt, not the retry window
            q.stats()
        assert time.monotonic() - started < 1.0
        time.sleep(1.0)  # the holder's lease runs out meanwhile
        server = RedisServer(server.dir, aof=True, port=server.port).start()
        time.sleep(0.5)  # the next probe is due
        assert q.get(waiting.id).state == IN_QUEUE  # recovered without a new client
        # The holder could not renew its lease during the outage: it gets a lease after it.
        assert q.requeue_stale(0.5, max_attempts=2) == []
        assert q.claim("other", EP).id == waiting.id  # queued work is taken, held work is not
        assert q.get(running.id).worker_id == "w"
        q.heartbeat("w")
        assert q.complete(running.id, worker_id="w", status_code=200, result={"ok": 1})
        assert q.get(running.id).result == {"ok": 1}
    finally:
        server.stop()


@needs_redis
def test_redis_refusing_writes_is_a_service_fault_that_clears_by_itself(redis_server):
    from pulid_flux.errors import ServiceFault

    q = make_redis_queue(redis_server.url)
    q.r.config_set("maxmemory-policy", "noeviction")
    q.r.config_set("maxmemory", "1")  # every write is refused as out of memory
    try:
        with pytest.raises(ServiceFault) as fault:
            q.submit(EP, {"n": 1})
        assert fault.value.component == "queue" and fault.value.status_code == 507
        assert "refuses writes (out of memory" in fault.value.reason
    finally:
        q.r.config_set("maxmemory", "0")
    assert q.get(q.submit(EP, {"n": 2}).id).state == IN_QUEUE  # no outage state was left behind


@contextlib.contextmanager
def reply_lost(q, script: str):
    """The named Lua script runs on the server, but its caller sees a timeout; then the next
    call finds Redis back (the lost reply counted as an outage: the next probe ends it)."""
    from redis.exceptions import TimeoutError as RedisTimeout

    real = getattr(q, script)

    def run_then_lose_the_reply(**kwargs):
        real(**kwargs)
        raise RedisTimeout("reply lost")

    setattr(q, script, run_then_lose_the_reply)
    try:
        yield
    finally:
        setattr(q, script, real)
        time.sleep(q.probe_interval_s)


@needs_redis
def test_redis_lost_replies_of_claim_and_complete_are_answered_on_the_next_try(redis_server):
    from pulid_flux.errors import ServiceFault

    q = make_redis_queue(redis_server.url)
    job = q.submit(EP, {})
    with reply_lost(q, "_claim"), pytest.raises(ServiceFault):
        q.claim("w", EP)
    assert q.claim("w", EP).id == job.id  # the same request, not a second one held forever
    assert q.get(job.id).attempts == 1
    with reply_lost(q, "_complete"), pytest.raises(ServiceFault):
        q.complete(job.id, worker_id="w", status_code=200, result={}, op_id="op-1")
    assert q.complete(job.id, worker_id="w", status_code=200, result={}, op_id="op-1") is True
    assert q.complete(job.id, worker_id="w", status_code=200, result={}, op_id="op-2") is False
