"""The distributed queue: Redis streams with one consumer group, shared by API replicas and workers.

Layout (every key starts with ``prefix``):

* ``job:<id>``      hash: the request (same fields as ``Job``), its stream entry and lease.
* ``logs:<id>``     list: log lines; a line's ``seq`` is its 1-based index.
* ``stream:<prio>|<endpoint>``  stream per priority and endpoint, consumer group ``workers``.
  A worker takes new entries with XREADGROUP and takes over entries whose holder stopped
  renewing them with XAUTOCLAIM (the visibility timeout); heartbeats renew held entries with
  XCLAIM. An entry is acknowledged and deleted when its request completes.
* ``waiting`` / ``running`` / ``completed`` / ``deadlines`` / ``webhooks``  sorted sets that
  index requests for queue positions, lease sweeps, expiry and webhook delivery.
* ``held:<worker>`` set of requests a worker holds; ``workers`` + ``workers:hb`` the registry.

Every state change is one Lua script, so it is atomic across replicas: a request is held by at
most one worker at a time, and only its current holder can complete it. Lease times come from
Redis's clock (``TIME``), so hosts with skewed clocks agree on who is alive.

Scripts are idempotent where a retried call after a lost reply could do harm: submit (the id is
chosen before the call), claim (a per-call token), complete (a per-call token).

Not supported: Redis Cluster (scripts touch keys they compute); use one primary (with replicas
or Sentinel for failover), with AOF persistence for durability.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from typing import Optional
from urllib.parse import urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import ServiceFault

from .base import (
    CANCELLED_MESSAGE,
    CANCELLED_STATUS,
    CANCELLED_TYPE,
    COMPLETED,
    IN_PROGRESS,
    IN_QUEUE,
    WEBHOOK_PENDING,
    Job,
    LogRecord,
    Queue,
    QueueFullError,
    WorkerInfo,
)

log = logging.getLogger("pulid_flux.queue")

# Consumer that holds entries handed back to the queue; they are claimable at once.
PARK_CONSUMER = "pulid-flux-requeued"

_COMMON = r"""
local P = ARGV[1]
local GROUP = 'workers'
local PARK = '""" + PARK_CONSUMER + r"""'
local PARK_IDLE_MS = 1000000000000
local CANCELLED_STATUS = """ + str(CANCELLED_STATUS) + r"""
local CANCELLED_MESSAGE = """ + json.dumps(CANCELLED_MESSAGE) + r"""
local CANCELLED_TYPE = """ + json.dumps(CANCELLED_TYPE) + r"""
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function ts(x) return string.format('%.6f', x) end
local function log(jid, level, msg, t)
  redis.call('RPUSH', P .. 'logs:' .. jid, cjson.encode({ts(t), level, msg}))
end
local function bump(key, amount)
  redis.call('HINCRBYFLOAT', P .. 'stats', key, amount or 1)
end
local function drop_entry(jk)
  local s = redis.call('HGET', jk, 'stream')
  local e = redis.call('HGET', jk, 'entry')
  if s and e and e ~= '' then
    redis.call('XACK', s, GROUP, e)
    redis.call('XDEL', s, e)
  end
end
local function finish(jid, f, outcome, t)
  local jk = P .. 'job:' .. jid
  local holder = redis.call('HGET', jk, 'worker_id')
  local wh = redis.call('HGET', jk, 'webhook_url')
  f['state'] = 'COMPLETED'
  f['completed_at'] = ts(t)
  if wh and wh ~= '' then f['webhook_state'] = 'pending' else f['webhook_state'] = 'none' end
  for k, v in pairs(f) do redis.call('HSET', jk, k, tostring(v)) end
  redis.call('ZREM', P .. 'waiting', jid)
  redis.call('ZREM', P .. 'running', jid)
  redis.call('ZREM', P .. 'deadlines', jid)
  redis.call('ZADD', P .. 'completed', ts(t), jid)
  local ttl = tonumber(redis.call('HGET', jk, 'ttl_s') or '')
  if ttl then redis.call('ZADD', P .. 'expires', ts(t + ttl), jid) end
  if wh and wh ~= '' then redis.call('ZADD', P .. 'webhooks', ts(t), jid) end
  drop_entry(jk)
  if holder and holder ~= '' then redis.call('SREM', P .. 'held:' .. holder, jid) end
  bump('completed_' .. outcome)
end
local function error_fields(status, detail, error, etype)
  return {status_code = status, result = cjson.encode({detail = detail, error_type = etype}),
          error = error, error_type = etype}
end
local function finish_cancelled(jid, why, t)
  finish(jid, error_fields(CANCELLED_STATUS, CANCELLED_MESSAGE, CANCELLED_MESSAGE, CANCELLED_TYPE),
         'cancelled', t)
  log(jid, 'WARN', why, t)
end
-- Makes a request's entry claimable by any worker at once (backdated delivery).
local function park(jk, jid)
  local s = redis.call('HGET', jk, 'stream')
  local e = redis.call('HGET', jk, 'entry')
  local moved = {}
  if s and e and e ~= '' then
    moved = redis.call('XCLAIM', s, GROUP, PARK, 0, e, 'IDLE', PARK_IDLE_MS, 'JUSTID')
  end
  if #moved == 0 and s then
    -- The entry is gone from the pending list (never expected): queue a fresh one.
    if e and e ~= '' then redis.call('XDEL', s, e) end
    redis.call('HSET', jk, 'entry', redis.call('XADD', s, '*', 'id', jid))
  end
end
local function requeue(jid, reason, maxa, t)
  local jk = P .. 'job:' .. jid
  local attempts = tonumber(redis.call('HGET', jk, 'attempts') or '0')
  local cap = tonumber(redis.call('HGET', jk, 'max_attempts') or '')
  if cap and cap < maxa then maxa = cap end
  local holder = redis.call('HGET', jk, 'worker_id')
  if holder and holder ~= '' then redis.call('SREM', P .. 'held:' .. holder, jid) end
  if redis.call('HGET', jk, 'cancel_requested') == '1' then
    finish_cancelled(jid, reason .. '; cancelled as requested', t)
    return false
  end
  if attempts >= maxa then
    finish(jid, error_fields(503, 'Generation failed: ' .. reason,
                             'Generation failed: ' .. reason, 'runner_disconnected'), 'error', t)
    log(jid, 'ERROR', reason .. '; giving up after ' .. attempts .. ' attempts', t)
    return false
  end
  redis.call('HSET', jk, 'state', 'IN_QUEUE', 'worker_id', '', 'started_at', '',
             'heartbeat_at', '')
  redis.call('ZREM', P .. 'running', jid)
  redis.call('ZADD', P .. 'waiting', redis.call('HGET', jk, 'rank'), jid)
  park(jk, jid)
  log(jid, 'WARN', reason .. '; queued again', t)
  bump('requeued')
  return true
end
local function expire_deadlines(t)
  local ids = redis.call('ZRANGEBYSCORE', P .. 'deadlines', '-inf', '(' .. ts(t))
  for _, jid in ipairs(ids) do
    if redis.call('HGET', P .. 'job:' .. jid, 'state') == 'IN_QUEUE' then
      finish(jid, error_fields(504, 'Request timed out', 'Request timed out before it started',
                               'request_timeout'), 'timeout', t)
    else
      redis.call('ZREM', P .. 'deadlines', jid)
    end
  end
end
"""

# ARGV: prefix, id, stream member, priority, max_len|'', deadline|'', fields (JSON object)
_SUBMIT = _COMMON + r"""
local jid = ARGV[2]
local jk = P .. 'job:' .. jid
if redis.call('EXISTS', jk) == 1 then return {'exists', 0} end
if ARGV[5] ~= '' then
  local n = redis.call('ZCARD', P .. 'waiting')
  if n >= tonumber(ARGV[5]) then return {'full', n} end
end
local seq = redis.call('INCR', P .. 'seq')
local rank = string.format('%.0f', tonumber(ARGV[4]) * 1e13 + seq)
for k, v in pairs(cjson.decode(ARGV[7])) do redis.call('HSET', jk, k, v) end
redis.call('HSET', jk, 'seq', seq, 'rank', rank, 'state', 'IN_QUEUE', 'attempts', 0)
redis.call('ZADD', P .. 'waiting', rank, jid)
if ARGV[6] ~= '' then redis.call('ZADD', P .. 'deadlines', ARGV[6], jid) end
local s = P .. 'stream:' .. ARGV[3]
if redis.call('EXISTS', s) == 0 then
  redis.pcall('XGROUP', 'CREATE', s, GROUP, '0', 'MKSTREAM')
end
redis.call('SADD', P .. 'streams', ARGV[3])
redis.call('HSET', jk, 'stream', s, 'entry', redis.call('XADD', s, '*', 'id', jid))
bump('submitted')
return {'ok', 0}
"""

# ARGV: prefix, worker, token, visibility_s, max_attempts, endpoint|'', instance
_CLAIM = _COMMON + r"""
local me, token = ARGV[2], ARGV[3]
-- vis < 0: the caller just saw Redis come back from an outage; holders get a full lease to
-- renew first, so only handed-back (parked) entries are taken now.
local vis = tonumber(ARGV[4])
local min_idle = PARK_IDLE_MS
if vis >= 0 then min_idle = math.floor(vis * 1000) end
local maxa = tonumber(ARGV[5])
local endpoint = ARGV[6]
local t = now()
expire_deadlines(t)

local function take(jid)
  local jk = P .. 'job:' .. jid
  redis.call('HSET', jk, 'state', 'IN_PROGRESS', 'worker_id', me, 'started_at', ts(t),
             'heartbeat_at', ts(t), 'claim_token', token, 'claim_instance', ARGV[7])
  redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('ZREM', P .. 'waiting', jid)
  redis.call('ZREM', P .. 'deadlines', jid)
  redis.call('ZADD', P .. 'running', ts(t), jid)
  redis.call('SADD', P .. 'held:' .. me, jid)
  return jid
end

local function consider(jid, entry, s, reclaimed)
  local jk = P .. 'job:' .. jid
  local state = redis.call('HGET', jk, 'state')
  if (not state) or state == 'COMPLETED' or redis.call('HGET', jk, 'entry') ~= entry then
    redis.call('XACK', s, GROUP, entry)
    redis.call('XDEL', s, entry)
    return nil
  end
  if state == 'IN_PROGRESS' then
    if not reclaimed then return nil end
    local holder = redis.call('HGET', jk, 'worker_id')
    local hb = tonumber(redis.call('HGET', jk, 'heartbeat_at')) or 0
    if vis < 0 or t - hb < vis then
      -- Its holder renewed the lease meanwhile: hand the entry back.
      redis.call('XCLAIM', s, GROUP, holder, 0, entry, 'JUSTID')
      return nil
    end
    if not requeue(jid, 'the worker stopped responding', maxa, t) then return nil end
    redis.call('XCLAIM', s, GROUP, me, 0, entry, 'JUSTID')
  end
  return take(jid)
end

-- A retried call (its first reply was lost) gets the same request again.
for _, jid in ipairs(redis.call('SMEMBERS', P .. 'held:' .. me)) do
  local jk = P .. 'job:' .. jid
  if redis.call('HGET', jk, 'claim_token') == token and redis.call('HGET', jk, 'worker_id') == me
     and redis.call('HGET', jk, 'state') == 'IN_PROGRESS' then
    return jid
  end
end

local members = redis.call('SMEMBERS', P .. 'streams')
table.sort(members)
for _, m in ipairs(members) do
  local sep = string.find(m, '|', 1, true)
  if endpoint == '' or string.sub(m, sep + 1) == endpoint then
    local s = P .. 'stream:' .. m
    -- Older entries first: handed back or abandoned ones, then new ones.
    local cursor = '0-0'
    repeat
      local r = redis.call('XAUTOCLAIM', s, GROUP, me, min_idle, cursor, 'COUNT', 1)
      cursor = r[1]
      for _, e in ipairs(r[2]) do
        local got = consider(e[2][2], e[1], s, true)
        if got then return got end
      end
    until cursor == '0-0'
    while true do
      local r = redis.call('XREADGROUP', 'GROUP', GROUP, me, 'COUNT', 1, 'STREAMS', s, '>')
      if (not r) or (not r[1]) or #r[1][2] == 0 then break end
      local e = r[1][2][1]
      local got = consider(e[2][2], e[1], s, false)
      if got then return got end
    end
  end
end
return false
"""

# ARGV: prefix, worker, instance
# Only the process that claimed a request renews it: a restarted worker reusing its id must
# not keep alive what its predecessor held (that goes stale and is taken over).
_HEARTBEAT = _COMMON + r"""
local me = ARGV[2]
local t = now()
for _, jid in ipairs(redis.call('SMEMBERS', P .. 'held:' .. me)) do
  local jk = P .. 'job:' .. jid
  if redis.call('HGET', jk, 'worker_id') == me and redis.call('HGET', jk, 'state') == 'IN_PROGRESS'
     and redis.call('HGET', jk, 'claim_instance') == ARGV[3] then
    redis.call('HSET', jk, 'heartbeat_at', ts(t))
    redis.call('ZADD', P .. 'running', ts(t), jid)
    local s, e = redis.call('HGET', jk, 'stream'), redis.call('HGET', jk, 'entry')
    if s and e and e ~= '' then redis.call('XCLAIM', s, GROUP, me, 0, e, 'JUSTID') end
  else
    redis.call('SREM', P .. 'held:' .. me, jid)
  end
end
if redis.call('HEXISTS', P .. 'workers', me) == 1 then
  redis.call('ZADD', P .. 'workers:hb', ts(t), me)
end
return ts(t)
"""

# ARGV: prefix, id, worker|'', op token, outcome, inference_time|'', fields (JSON object)
_COMPLETE = _COMMON + r"""
local jid = ARGV[2]
local jk = P .. 'job:' .. jid
local state = redis.call('HGET', jk, 'state')
if not state then return 0 end
if state == 'COMPLETED' then
  if redis.call('HGET', jk, 'complete_op') == ARGV[4] then return 1 end
  return 0
end
if state ~= 'IN_PROGRESS' then return 0 end
if ARGV[3] ~= '' and redis.call('HGET', jk, 'worker_id') ~= ARGV[3] then return 0 end
local f = cjson.decode(ARGV[7])
f['complete_op'] = ARGV[4]
finish(jid, f, ARGV[5], now())
if ARGV[6] ~= '' then
  bump('inference_seconds_sum', tonumber(ARGV[6]))
  bump('inference_count')
end
return 1
"""

# ARGV: prefix, id, worker
_RELEASE = _COMMON + r"""
local jid, me = ARGV[2], ARGV[3]
local jk = P .. 'job:' .. jid
if redis.call('HGET', jk, 'state') ~= 'IN_PROGRESS' or redis.call('HGET', jk, 'worker_id') ~= me then
  return 0
end
if redis.call('HGET', jk, 'cancel_requested') == '1' then
  finish_cancelled(jid, 'worker shut down; cancelled as requested', now())
  return 1
end
local attempts = math.max(tonumber(redis.call('HGET', jk, 'attempts')) - 1, 0)
redis.call('HSET', jk, 'state', 'IN_QUEUE', 'worker_id', '', 'started_at', '', 'heartbeat_at', '',
           'attempts', attempts)
redis.call('ZREM', P .. 'running', jid)
redis.call('ZADD', P .. 'waiting', redis.call('HGET', jk, 'rank'), jid)
redis.call('SREM', P .. 'held:' .. me, jid)
park(jk, jid)
log(jid, 'WARN', 'worker shut down; queued again', now())
return 1
"""

# ARGV: prefix, lease_s, max_attempts, consumer_prune_s
_REQUEUE_STALE = _COMMON + r"""
local t = now()
local maxa = tonumber(ARGV[3])
local out = {}
for _, jid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', '(' .. ts(t - tonumber(ARGV[2])))) do
  if redis.call('HGET', P .. 'job:' .. jid, 'state') == 'IN_PROGRESS' then
    requeue(jid, 'the worker stopped responding', maxa, t)
    table.insert(out, jid)
  else
    redis.call('ZREM', P .. 'running', jid)
  end
end
expire_deadlines(t)
-- Forget consumers of workers long gone that hold nothing (worker ids are per process).
local prune_ms = tonumber(ARGV[4]) * 1000
for _, m in ipairs(redis.call('SMEMBERS', P .. 'streams')) do
  local s = P .. 'stream:' .. m
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', s, GROUP)
  if ok then
    for _, c in ipairs(consumers) do
      local info = {}
      for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
      if info['name'] ~= PARK and tonumber(info['pending']) == 0 and tonumber(info['idle']) > prune_ms then
        redis.call('XGROUP', 'DELCONSUMER', s, GROUP, info['name'])
      end
    end
  end
end
return out
"""

# ARGV: prefix, worker, max_attempts
_RELEASE_WORKER = _COMMON + r"""
local me = ARGV[2]
local t = now()
local out = {}
for _, jid in ipairs(redis.call('SMEMBERS', P .. 'held:' .. me)) do
  local jk = P .. 'job:' .. jid
  if redis.call('HGET', jk, 'worker_id') == me and redis.call('HGET', jk, 'state') == 'IN_PROGRESS' then
    requeue(jid, 'the worker process died', tonumber(ARGV[3]), t)
    table.insert(out, jid)
  end
end
redis.call('DEL', P .. 'held:' .. me)
redis.call('HDEL', P .. 'workers', me)
redis.call('ZREM', P .. 'workers:hb', me)
return out
"""

# ARGV: prefix, id
_CANCEL = _COMMON + r"""
local jid = ARGV[2]
local jk = P .. 'job:' .. jid
local state = redis.call('HGET', jk, 'state')
local t = now()
if not state then return 'not_found' end
if state == 'COMPLETED' then return 'completed' end
if state == 'IN_QUEUE' then
  finish_cancelled(jid, 'cancelled while queued', t)
  return 'cancelled'
end
redis.call('HSET', jk, 'cancel_requested', '1')
log(jid, 'WARN', 'cancellation requested', t)
return 'requested'
"""

# ARGV: prefix, id
_DELETE = _COMMON + r"""
local jid = ARGV[2]
local jk = P .. 'job:' .. jid
if redis.call('EXISTS', jk) == 0 then return false end
local files = {redis.call('HGET', jk, 'input_files'), redis.call('HGET', jk, 'output_files')}
local holder = redis.call('HGET', jk, 'worker_id')
if holder and holder ~= '' then redis.call('SREM', P .. 'held:' .. holder, jid) end
drop_entry(jk)
for _, z in ipairs({'waiting', 'running', 'completed', 'expires', 'deadlines', 'webhooks'}) do
  redis.call('ZREM', P .. z, jid)
end
redis.call('DEL', jk, P .. 'logs:' .. jid, P .. 'webhook-claim:' .. jid)
return files
"""

# ARGV: prefix, id, ttl_s
_SET_TTL = r"""
local jk = ARGV[1] .. 'job:' .. ARGV[2]
if redis.call('EXISTS', jk) == 0 then return 0 end
redis.call('HSET', jk, 'ttl_s', ARGV[3])
local done = tonumber(redis.call('HGET', jk, 'completed_at') or '')
if done then
  redis.call('ZADD', ARGV[1] .. 'expires', string.format('%.6f', done + tonumber(ARGV[3])), ARGV[2])
end
return 1
"""

# ARGV: prefix, id, timestamp, level, message
_ADD_LOG = r"""
local P = ARGV[1]
if redis.call('EXISTS', P .. 'job:' .. ARGV[2]) == 0 then return 0 end
return redis.call('RPUSH', P .. 'logs:' .. ARGV[2], cjson.encode({ARGV[3], ARGV[4], ARGV[5]}))
"""

_JSON_FIELDS = ("input", "result", "metrics", "input_files", "output_files")


def _opt(value: Optional[str]) -> Optional[str]:
    return value if value not in (None, "") else None


def _opt_float(value: Optional[str]) -> Optional[float]:
    return float(value) if value not in (None, "") else None


def _job_from_hash(jid: str, h: dict[str, str]) -> Job:
    loads = {k: json.loads(h[k]) if h.get(k) not in (None, "") else None for k in _JSON_FIELDS}
    return Job(
        id=jid,
        endpoint=h.get("endpoint", ""),
        state=h.get("state", IN_QUEUE),
        input=loads["input"] or {},
        owner=h.get("owner", ""),
        priority=int(h.get("priority") or 0),
        created_at=float(h.get("created_at") or 0.0),
        started_at=_opt_float(h.get("started_at")),
        completed_at=_opt_float(h.get("completed_at")),
        attempts=int(h.get("attempts") or 0),
        max_attempts=int(h["max_attempts"]) if h.get("max_attempts") else None,
        ttl_s=_opt_float(h.get("ttl_s")),
        worker_id=_opt(h.get("worker_id")),
        cancel_requested=h.get("cancel_requested") == "1",
        webhook_url=_opt(h.get("webhook_url")),
        webhook_state=h.get("webhook_state") or "none",
        ephemeral=h.get("ephemeral") == "1",
        status_code=int(h["status_code"]) if h.get("status_code") not in (None, "") else None,
        result=loads["result"],
        error=_opt(h.get("error")),
        error_type=_opt(h.get("error_type")),
        metrics=loads["metrics"] or {},
        input_files=loads["input_files"] or [],
        output_files=loads["output_files"] or [],
    )


def _retries_within(window_s: float, base: float, cap: float) -> int:
    """How many exponentially backed-off retries fit in ``window_s``."""
    n, slept = 0, 0.0
    while slept < window_s:
        slept += min(cap, base * 2 ** n)
        n += 1
    return n


def _write_refusal(exc: Exception) -> Optional[str]:
    if isinstance(exc, RedisOutOfMemoryError):
        return "out of memory"
    if isinstance(exc, RedisReadOnlyError):
        return "read-only"
    if str(exc).startswith("MISCONF"):  # it cannot persist (its disk is full)
        return "cannot persist"
    return None


def _reachable(method):
    """A call on an unreachable Redis raises ServiceFault("queue", …) once its retries are
    spent; while Redis stays unreachable, calls fail at once, but one per probe interval tries
    it again (that call ends the outage when it succeeds)."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        self._fail_fast()
        try:
            out = method(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._went_down(exc) from exc
        except RedisResponseError as exc:
            refusal = _write_refusal(exc)
            if refusal is None:
                raise
            # Reachable but refusing writes (full memory or disk, a replica after failover):
            # ours, not the client's; each call asks again, so it clears the moment Redis does.
            raise ServiceFault("queue", f"{self.where} refuses writes ({refusal}: {exc})",
                               status_code=507 if refusal != "read-only" else 503) from exc
        self._came_back()
        return out

    return call


# Read-only: counts an owner's waiting and running requests (bounded by the queue length).
_ACTIVE_COUNT = r"""
local P, owner, n = ARGV[1], ARGV[2], 0
for _, set in ipairs({'waiting', 'running'}) do
  for _, jid in ipairs(redis.call('ZRANGE', P .. set, 0, -1)) do
    if redis.call('HGET', P .. 'job:' .. jid, 'owner') == owner then n = n + 1 end
  end
end
return n
"""


class RedisQueue(Queue):
    """``Queue`` on a Redis server (6.2+; 7+ recommended). Thread- and process-safe."""

    def __init__(self, url: str, *, prefix: str = "pulid-flux:", visibility_timeout_s: float = 20.0,
                 retry_s: float = 2.0, socket_timeout_s: float = 10.0,
                 connect_timeout_s: float = 0.5, probe_interval_s: float = 1.0,
                 webhook_claim_ttl_s: float = 7200.0, consumer_prune_s: float = 3600.0,
                 max_attempts: int = 2, client=None):
        import redis
        from redis.backoff import ExponentialBackoff, NoBackoff
        from redis.retry import Retry

        self.url = url
        self.prefix = prefix
        self.visibility_timeout_s = float(visibility_timeout_s)
        self.webhook_claim_ttl_s = float(webhook_claim_ttl_s)
        self.consumer_prune_s = float(consumer_prune_s)
        self.max_attempts = int(max_attempts)
        # Identifies this process's claims, so heartbeats renew only what it claimed itself.
        self.instance = uuid.uuid4().hex
        self._claim_tokens: dict[str, str] = {}  # worker -> token of its unanswered claim
        parts = urlsplit(url)
        self.where = f"Redis at {parts.path}" if parts.scheme == "unix" else \
            f"Redis at {parts.hostname}:{parts.port or 6379}"
        self.probe_interval_s = float(probe_interval_s)
        self._down: Optional[str] = None  # why Redis is unreachable, while it is
        self._next_probe = 0.0
        self._recovered_at = float("-inf")  # monotonic time the last outage ended
        self._state_lock = threading.Lock()
        if client is None:
            # A Redis restart or failover shows up as connection errors: retry with backoff for
            # about `retry_s`, so blips are ridden out; longer outages are ServiceFaults.
            base, cap = 0.05, 1.0
            client = redis.Redis.from_url(
                url, decode_responses=True, socket_timeout=socket_timeout_s,
                socket_connect_timeout=connect_timeout_s, health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=cap, base=base),
                            _retries_within(retry_s, base, cap),
                            supported_errors=(RedisConnectionError, RedisTimeoutError)),
            )
            # One attempt, no retries: what checks whether an outage is over.
            self._probe = redis.Redis.from_url(
                url, socket_timeout=connect_timeout_s, socket_connect_timeout=connect_timeout_s,
                retry=Retry(NoBackoff(), 0))
        else:
            self._probe = client
        self.r = client
        reg = self.r.register_script
        self._submit = reg(_SUBMIT)
        self._claim = reg(_CLAIM)
        self._heartbeat = reg(_HEARTBEAT)
        self._complete = reg(_COMPLETE)
        self._release = reg(_RELEASE)
        self._requeue_stale = reg(_REQUEUE_STALE)
        self._release_worker = reg(_RELEASE_WORKER)
        self._cancel = reg(_CANCEL)
        self._delete = reg(_DELETE)
        self._add_log = reg(_ADD_LOG)
        self._set_ttl = reg(_SET_TTL)
        self._active_count = reg(_ACTIVE_COUNT)

    def k(self, name: str) -> str:
        return self.prefix + name

    # --- availability ---------------------------------------------------------------------
    def _fault(self) -> ServiceFault:
        return ServiceFault("queue", self._down or f"{self.where} is unreachable",
                            retry_after_s=max(1, round(self.probe_interval_s)))

    def _fail_fast(self) -> None:
        if self._down is None:
            return
        with self._state_lock:
            now = time.monotonic()
            if now < self._next_probe:
                raise self._fault()
            self._next_probe = now + self.probe_interval_s
        try:  # one quick attempt, so a probe never blocks for the whole retry window
            self._probe.ping()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self._went_down(exc) from exc
        self._came_back()  # at once: a call made inside this one must not fail fast

    def _went_down(self, exc: Exception) -> ServiceFault:
        with self._state_lock:
            if self._down is None:
                log.warning("%s is unreachable: %s", self.where, exc)
            self._down = f"{self.where} is unreachable ({type(exc).__name__}: {exc})"
            self._next_probe = time.monotonic() + self.probe_interval_s
        return self._fault()

    def _came_back(self) -> None:
        if self._down is None:
            return
        with self._state_lock:
            if self._down is not None:
                log.warning("%s is reachable again", self.where)
                self._down = None
                self._recovered_at = time.monotonic()

    def _recovering(self, lease_s: float) -> bool:
        """True for one lease after this process saw Redis come back: holders could not renew
        their leases during the outage, so none of them counts as lost yet."""
        return time.monotonic() - self._recovered_at < lease_s

    def close(self) -> None:
        self.r.close()
        if self._probe is not self.r:
            self._probe.close()

    @_reachable
    def ping(self) -> bool:
        return bool(self.r.ping())

    # --- API side -------------------------------------------------------------------------
    @_reachable
    def submit(self, endpoint, input, *, owner="", priority=0, webhook_url=None, ephemeral=False,
               start_deadline=None, input_files=None, max_queue_length=None,
               max_attempts=None, ttl_s=None) -> Job:
        request_id = str(uuid.uuid4())
        fields = {
            "endpoint": endpoint, "input": json.dumps(input), "owner": owner or "",
            "priority": str(int(priority)), "created_at": repr(time.time()),
            "webhook_url": webhook_url or "", "webhook_state": "none",
            "ephemeral": "1" if ephemeral else "0", "cancel_requested": "0",
            "input_files": json.dumps(input_files or []), "output_files": "[]", "metrics": "{}",
            "worker_id": "", "started_at": "", "completed_at": "", "status_code": "",
            "result": "", "error": "", "error_type": "",
            "max_attempts": "" if max_attempts is None else str(int(max_attempts)),
            "ttl_s": "" if ttl_s is None else repr(float(ttl_s)),
        }
        member = f"{max(int(priority), 0):06d}|{endpoint}"
        status, n = self._submit(args=[
            self.prefix, request_id, member, int(priority),
            "" if max_queue_length is None else int(max_queue_length),
            "" if start_deadline is None else repr(float(start_deadline)), json.dumps(fields),
        ])
        if status == "full":
            raise QueueFullError(f"the queue is full ({n} waiting)")
        return self.get(request_id)  # type: ignore[return-value]

    @_reachable
    def get(self, request_id):
        h = self.r.hgetall(self.k(f"job:{request_id}"))
        return _job_from_hash(request_id, h) if h else None

    @_reachable
    def position(self, request_id) -> int:
        rank = self.r.zrank(self.k("waiting"), request_id)
        return int(rank) if rank is not None else 0

    @_reachable
    def active_count(self, owner) -> int:
        return int(self._active_count(args=[self.prefix, owner or ""]))

    @_reachable
    def logs(self, request_id, after_seq=0):
        start = max(int(after_seq), 0)
        rows = self.r.lrange(self.k(f"logs:{request_id}"), start, -1)
        out = []
        for i, raw in enumerate(rows):
            ts, level, message = json.loads(raw)
            out.append(LogRecord(start + i + 1, float(ts), level, message))
        return out

    @_reachable
    def add_log(self, request_id, message, level="INFO"):
        self._add_log(args=[self.prefix, request_id, repr(time.time()), level, message])

    @_reachable
    def cancel(self, request_id) -> str:
        return self._cancel(args=[self.prefix, request_id])

    @_reachable
    def delete(self, request_id) -> list[str]:
        files = self._delete(args=[self.prefix, request_id])
        if not files:
            return []
        return [f for part in files if part for f in json.loads(part)]

    @_reachable
    def expire(self, completed_before, now=None) -> list[str]:
        now = time.time() if now is None else now
        ids = list(dict.fromkeys(
            self.r.zrangebyscore(self.k("completed"), "-inf", f"({completed_before!r}")
            + self.r.zrangebyscore(self.k("expires"), "-inf", f"({now!r}")))
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for jid in ids:
            pipe.hget(self.k(f"job:{jid}"), "webhook_state")
        states = pipe.execute()
        files: list[str] = []
        for jid, state in zip(ids, states):
            # Undelivered webhooks keep their request alive until delivery ends.
            if state != WEBHOOK_PENDING:
                files += self.delete(jid)
        return files

    @_reachable
    def pending_webhooks(self, limit=100):
        """Pending deliveries this caller now owns: each is claimed with SET NX, so among many
        API replicas exactly one delivers it (another takes over after ``webhook_claim_ttl_s``
        only if the owner died before recording the outcome)."""
        ids = self.r.zrange(self.k("webhooks"), 0, max(int(limit), 1) - 1)
        out = []
        holder = uuid.uuid4().hex
        for jid in ids:
            if not self.r.set(self.k(f"webhook-claim:{jid}"), holder, nx=True,
                              px=int(self.webhook_claim_ttl_s * 1000)):
                continue
            job = self.get(jid)
            if job is None or job.state != COMPLETED or job.webhook_state != WEBHOOK_PENDING:
                self.r.zrem(self.k("webhooks"), jid)
                continue
            out.append(job)
        return out

    @_reachable
    def set_ttl(self, request_id, ttl_s):
        self._set_ttl(args=[self.prefix, request_id, repr(float(ttl_s))])

    @_reachable
    def set_webhook_state(self, request_id, state):
        key = self.k(f"job:{request_id}")
        if not self.r.exists(key):
            return
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, "webhook_state", state)
        if state == WEBHOOK_PENDING:
            pipe.delete(self.k(f"webhook-claim:{request_id}"))
        else:
            pipe.zrem(self.k("webhooks"), request_id)
        pipe.execute()

    @_reachable
    def stats(self) -> dict[str, float]:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.k("stats"))
        for name in ("waiting", "running", "completed"):
            pipe.zcard(self.k(name))
        raw, waiting, running, completed = pipe.execute()
        out = {k: float(v) for k, v in raw.items()}
        out[f"state_{IN_QUEUE}"] = waiting
        out[f"state_{IN_PROGRESS}"] = running
        out[f"state_{COMPLETED}"] = completed
        return out

    # --- worker side ----------------------------------------------------------------------
    @_reachable
    def claim(self, worker_id, endpoint=None):
        # max_attempts bounds the take-overs of abandoned requests done here (XAUTOCLAIM).
        vis = -1 if self._recovering(self.visibility_timeout_s) else self.visibility_timeout_s
        # One token until a claim gets its answer: a call whose reply was lost (even past the
        # retry window, when the worker claims again later) is given the request it took.
        token = self._claim_tokens.setdefault(worker_id, uuid.uuid4().hex)
        jid = self._claim(args=[self.prefix, worker_id, token, vis,
                                self.max_attempts, endpoint or "", self.instance])
        del self._claim_tokens[worker_id]
        return self.get(jid) if jid else None

    @_reachable
    def heartbeat(self, worker_id):
        self._heartbeat(args=[self.prefix, worker_id, self.instance])

    @_reachable
    def is_cancel_requested(self, request_id) -> bool:
        value = self.r.hget(self.k(f"job:{request_id}"), "cancel_requested")
        # A request deleted meanwhile counts as cancelled: nobody wants its result.
        return value is None or value == "1"

    @_reachable
    def complete(self, request_id, *, worker_id, status_code, result, error=None,
                 error_type=None, metrics=None, output_files=None, op_id=None) -> bool:
        fields: dict[str, str] = {
            "status_code": str(int(status_code)),
            "result": json.dumps(result) if result is not None else "",
            "error": error or "", "error_type": error_type or "",
        }
        if metrics is not None:
            fields["metrics"] = json.dumps(metrics)
        if output_files is not None:
            fields["output_files"] = json.dumps(output_files)
        outcome = "ok" if error is None else (
            "cancelled" if error_type == "request_cancelled" else "error")
        inference = ""
        if metrics and "inference_time" in metrics:
            inference = repr(float(metrics["inference_time"]))
        done = self._complete(args=[self.prefix, request_id, worker_id or "", op_id or uuid.uuid4().hex,
                                    outcome, inference, json.dumps(fields)])
        return bool(done)

    @_reachable
    def release(self, request_id, worker_id) -> bool:
        return bool(self._release(args=[self.prefix, request_id, worker_id]))

    @_reachable
    def requeue_stale(self, lease_timeout_s, max_attempts):
        if self._recovering(lease_timeout_s):
            return []
        return list(self._requeue_stale(args=[self.prefix, float(lease_timeout_s),
                                              int(max_attempts), self.consumer_prune_s]))

    @_reachable
    def release_worker(self, worker_id, max_attempts):
        return list(self._release_worker(args=[self.prefix, worker_id, int(max_attempts)]))

    def _redis_now(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1e6

    @_reachable
    def register_worker(self, info: WorkerInfo):
        now = self._redis_now()
        old = self.r.hget(self.k("workers"), info.worker_id)
        started = json.loads(old)["started_at"] if old else (info.started_at or now)
        record = {"pid": info.pid, "model": info.model, "random_weights": bool(info.random_weights),
                  "device": info.device, "precision": info.precision, "state": info.state,
                  "error": info.error,
                  "started_at": started}
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.k("workers"), info.worker_id, json.dumps(record))
        pipe.zadd(self.k("workers:hb"), {info.worker_id: now})
        pipe.execute()

    @_reachable
    def remove_worker(self, worker_id):
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(self.k("workers"), worker_id)
        pipe.zrem(self.k("workers:hb"), worker_id)
        pipe.execute()

    @_reachable
    def workers(self, alive_within_s=None):
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.k("workers"))
        pipe.zrange(self.k("workers:hb"), 0, -1, withscores=True)
        pipe.time()
        records, beats, (sec, usec) = pipe.execute()
        now = sec + usec / 1e6
        beat = dict(beats)
        out = []
        for worker_id, raw in records.items():
            hb = beat.get(worker_id, 0.0)
            if alive_within_s is not None and hb < now - alive_within_s:
                continue
            r = json.loads(raw)
            out.append(WorkerInfo(worker_id=worker_id, pid=int(r["pid"]), model=r["model"],
                                  random_weights=bool(r["random_weights"]), device=r["device"],
                                  precision=r.get("precision", ""), state=r["state"],
                                  error=r.get("error", ""), started_at=float(r["started_at"]),
                                  heartbeat_at=hb))
        out.sort(key=lambda w: w.started_at)
        return out
