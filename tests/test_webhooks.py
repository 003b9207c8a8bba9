"""Webhook payloads, Ed25519 signatures/JWKS and retrying delivery (loopback receiver)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import stat
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from loopback import FakeResolver, loopback_only  # noqa: F401  (autouse guard)
from pulid_flux.fetch import FetchPolicy, ReferenceImageError
from pulid_flux.webhooks import (
    WebhookSender,
    WebhookSigner,
    build_payload,
    validate_webhook_url,
    verify_signature,
)

# ---------------------------------------------------------------------------
# keys, JWKS, signatures


def test_load_or_create_writes_private_key_once(tmp_path):
    path = tmp_path / "keys" / "webhook.pem"
    first = WebhookSigner.load_or_create(path)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in path.read_bytes()
    second = WebhookSigner.load_or_create(path)
    assert second.jwks() == first.jwks()  # the same key is reloaded, not replaced
    assert [p.name for p in path.parent.iterdir()] == ["webhook.pem"]  # no temp files left
    assert WebhookSigner.load_or_create(tmp_path / "other.pem").jwks() != first.jwks()


def test_load_refuses_non_ed25519_key(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "ec.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(ValueError):
        WebhookSigner.load_or_create(path)


def test_jwks_shape_and_key_material():
    signer = WebhookSigner.generate()
    jwks = signer.jwks()
    assert list(jwks) == ["keys"] and len(jwks["keys"]) == 1
    jwk = jwks["keys"][0]
    assert {k: jwk[k] for k in ("kty", "crv", "use", "alg")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "use": "sig",
        "alg": "EdDSA",
    }
    assert "=" not in jwk["x"] and "+" not in jwk["x"] and "/" not in jwk["x"]
    raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
    assert len(raw) == 32
    assert jwk["kid"] and isinstance(jwk["kid"], str)
    json.dumps(jwks)  # serialisable as served


def test_signature_is_over_fal_message_format():
    signer = WebhookSigner.generate()
    body = b'{"request_id":"r1"}'
    headers = signer.headers("r1", "user-7", body, timestamp=1_700_000_000)
    assert headers["X-Fal-Webhook-Request-Id"] == "r1"
    assert headers["X-Fal-Webhook-User-Id"] == "user-7"
    assert headers["X-Fal-Webhook-Timestamp"] == "1700000000"
    # Check independently of verify_signature: raw Ed25519 over the documented message.
    x = signer.jwks()["keys"][0]["x"]
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4)))
    message = f"r1\nuser-7\n1700000000\n{hashlib.sha256(body).hexdigest()}".encode()
    public.verify(bytes.fromhex(headers["X-Fal-Webhook-Signature"]), message)


def test_verify_accepts_good_and_rejects_tampering():
    signer = WebhookSigner.generate()
    jwks = signer.jwks()
    body = build_payload("req-1", ok=True, payload={"images": []}, error=None)
    now = int(time.time())
    headers = signer.headers("req-1", "u", body, timestamp=now)
    assert verify_signature(jwks, headers, body)
    # header names are case-insensitive for receivers
    assert verify_signature(jwks, {k.lower(): v for k, v in headers.items()}, body)
    assert not verify_signature(jwks, headers, body + b" ")  # tampered body
    assert not verify_signature(jwks, headers, body.replace(b"OK", b"ER"))
    assert not verify_signature(jwks, {**headers, "X-Fal-Webhook-Request-Id": "req-2"}, body)
    assert not verify_signature(jwks, {**headers, "X-Fal-Webhook-User-Id": "someone"}, body)
    assert not verify_signature(jwks, {**headers, "X-Fal-Webhook-Timestamp": str(now + 1)}, body)
    assert not verify_signature(jwks, {**headers, "X-Fal-Webhook-Signature": "zz"}, body)
    missing = dict(headers)
    del missing["X-Fal-Webhook-Signature"]
    assert not verify_signature(jwks, missing, body)
    assert not verify_signature(WebhookSigner.generate().jwks(), headers, body)  # another key
    assert not verify_signature({"keys": []}, headers, body)


@pytest.mark.parametrize("field", ["request_id", "user_id"])
def test_line_breaks_in_signed_fields_are_refused(field):
    args = {"request_id": "r", "user_id": "u"}
    args[field] = "a\nb"
    with pytest.raises(ValueError):
        WebhookSigner.generate().headers(args["request_id"], args["user_id"], b"{}")


def test_verify_enforces_timestamp_skew():
    signer = WebhookSigner.generate()
    jwks = signer.jwks()
    body = b"{}"
    old = signer.headers("r", "u", body, timestamp=1_000_000)
    assert verify_signature(jwks, old, body, now=1_000_000 + 300)
    assert verify_signature(jwks, old, body, now=1_000_000 - 300)
    assert not verify_signature(jwks, old, body, now=1_000_000 + 301)
    assert not verify_signature(jwks, old, body, now=1_000_000 - 301)
    assert not verify_signature(jwks, old, body)  # against the real clock it is years old
    assert verify_signature(jwks, old, body, now=1_000_000 + 3000, max_skew_s=3600)


# ---------------------------------------------------------------------------
# payloads


def test_payload_ok_shape():
    doc = json.loads(build_payload("abc", ok=True, payload={"images": [{"url": "u"}], "seed": 1}, error=None))
    assert doc == {
        "request_id": "abc",
        "gateway_request_id": "abc",
        "status": "OK",
        "payload": {"images": [{"url": "u"}], "seed": 1},
        "error": None,
    }


def test_payload_error_shape():
    detail = {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]}
    doc = json.loads(build_payload("abc", ok=False, payload=detail, error="Invalid status code: 422"))
    assert doc == {
        "request_id": "abc",
        "gateway_request_id": "abc",
        "status": "ERROR",
        "payload": detail,
        "error": "Invalid status code: 422",
    }


@pytest.mark.parametrize("bad", [{"x": object()}, {"x": float("nan")}, {1, 2}])
def test_payload_not_serialisable(bad):
    doc = json.loads(build_payload("abc", ok=True, payload=bad, error=None))
    assert doc["payload"] is None and doc["status"] == "OK"
    assert isinstance(doc["payload_error"], str) and doc["payload_error"]


# The receivers below listen on loopback, which the address policy refuses unless the operator
# allow-lists it (fetch_allowed_private_cidrs), as a deployment with a local receiver would.
LOOPBACK = FetchPolicy(allowed_networks=["127.0.0.0/8"])


def test_validate_webhook_url():
    public = FetchPolicy(resolver=FakeResolver({"example.com": ["93.184.215.14"]}))
    check = lambda url, policy=public: asyncio.run(validate_webhook_url(url, policy))  # noqa: E731
    assert check("https://example.com/hook?x=1").startswith("https://example.com/hook")
    assert check("http://not-yet-in-dns.test/h")  # unresolvable now: every delivery checks again
    for bad in ["ftp://example.com/", "file:///tmp/x", "javascript:alert(1)", "/relative", "",
                "http://127.0.0.1:9000/hook", "http://[::1]/h", "http://0x7f000001/h"]:
        with pytest.raises(ReferenceImageError) as exc:
            check(bad)
        assert exc.value.type == "url_not_allowed"
    assert check("http://127.0.0.1:9000/hook", LOOPBACK) == "http://127.0.0.1:9000/hook"


# ---------------------------------------------------------------------------
# delivery against a loopback receiver


class Receiver:
    """Answers with the given status codes in order (then 200), recording each POST."""

    def __init__(self, statuses: list[int], stall_s: float = 0.0):
        self.statuses = list(statuses)
        self.stall_s = stall_s
        self.received: list[tuple[dict[str, str], bytes]] = []

    async def __aenter__(self) -> Receiver:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader, writer) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:] if ln)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.received.append((headers, body))
            status = self.statuses.pop(0) if self.statuses else 200
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


class FakeSleep:
    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def test_retries_with_backoff_then_succeeds():
    signer = WebhookSigner.generate()
    body = build_payload("req-9", ok=True, payload={"seed": 3}, error=None)
    sleep = FakeSleep()

    async def scenario():
        async with Receiver([500, 503]) as rx:
            async with WebhookSender(signer, policy=LOOPBACK, base_delay_s=2.0, sleep=sleep,
                                     rng=random.Random(1)) as sender:
                ok = await sender.deliver(rx.url, "req-9", body, user_id="user-1")
            return ok, rx

    ok, rx = asyncio.run(scenario())
    assert ok is True
    assert len(rx.received) == 3
    assert len(sleep.delays) == 2
    assert 1.0 <= sleep.delays[0] <= 2.0 and 2.0 <= sleep.delays[1] <= 4.0  # exponential, jittered
    for headers, got in rx.received:
        assert got == body
        assert headers["content-type"] == "application/json"
        assert headers["x-fal-webhook-request-id"] == "req-9"
        assert headers["x-fal-webhook-user-id"] == "user-1"
        assert verify_signature(signer.jwks(), headers, got)


def test_gives_up_after_max_attempts():
    signer = WebhookSigner.generate()
    sleep = FakeSleep()

    async def scenario():
        async with Receiver([500] * 10) as rx:
            async with WebhookSender(signer, policy=LOOPBACK, max_attempts=4, base_delay_s=1.0,
                                     max_delay_s=3.0, sleep=sleep) as sender:
                ok = await sender.deliver(rx.url, "r", b"{}")
            return ok, rx

    ok, rx = asyncio.run(scenario())
    assert ok is False
    assert len(rx.received) == 4
    assert len(sleep.delays) == 3  # no sleep after the last attempt
    assert all(d <= 3.0 for d in sleep.delays) and 1.5 <= sleep.delays[2] <= 3.0  # capped at max_delay_s


def test_default_retries_spread_over_fals_two_hours():
    from pulid_flux.config import Settings

    s = Settings()

    class Extreme(random.Random):
        def __init__(self, upper: bool):
            super().__init__()
            self.upper = upper

        def uniform(self, a, b):
            return b if self.upper else a

    waits = {}
    for upper in (False, True):
        sender = WebhookSender(WebhookSigner.generate(), max_attempts=s.webhook_max_attempts,
                               base_delay_s=s.webhook_base_delay_s, max_delay_s=s.webhook_max_delay_s,
                               rng=Extreme(upper))
        waits[upper] = [sender.backoff(n) for n in range(1, s.webhook_max_attempts)]
    assert len(waits[True]) == 10  # retries after the first try
    assert 45 * 60 < sum(waits[False]) and sum(waits[True]) < 2 * 3600
    assert WebhookSender(WebhookSigner.generate()).max_attempts == s.webhook_max_attempts


def test_redirect_is_not_followed_and_counts_as_failure():
    sleep = FakeSleep()

    async def scenario():
        async with Receiver([302, 302]) as rx:
            async with WebhookSender(WebhookSigner.generate(), policy=LOOPBACK, max_attempts=2,
                                     sleep=sleep) as sender:
                return await sender.deliver(rx.url, "r", b"{}"), rx

    ok, rx = asyncio.run(scenario())
    assert ok is False and len(rx.received) == 2


def test_connection_errors_and_timeouts_are_retried():
    sleep = FakeSleep()

    async def scenario():
        async with Receiver([], stall_s=5.0) as rx:
            sender = WebhookSender(WebhookSigner.generate(), policy=LOOPBACK, max_attempts=2, timeout_s=0.2,
                                   sleep=sleep)
            async with sender:
                stalled = await sender.deliver(rx.url, "r", b"{}")
            rx.server.close()
            return stalled, rx

    stalled, rx = asyncio.run(scenario())
    assert stalled is False and len(rx.received) == 2 and len(sleep.delays) == 1

    async def refused():
        async with WebhookSender(WebhookSigner.generate(), policy=LOOPBACK, max_attempts=3,
                                 sleep=FakeSleep()) as sender:
            return await sender.deliver("http://127.0.0.1:9/hook", "r", b"{}")  # port 9: nothing listens

    assert asyncio.run(refused()) is False


def test_each_attempt_is_signed_with_a_fresh_timestamp(monkeypatch):
    clock = iter([1_000, 2_000, 3_000])
    monkeypatch.setattr("pulid_flux.webhooks._unix_now", lambda: next(clock))

    async def scenario():
        async with Receiver([500, 500]) as rx:
            async with WebhookSender(WebhookSigner.generate(), policy=LOOPBACK, sleep=FakeSleep()) as sender:
                assert await sender.deliver(rx.url, "r", b"{}")
            return rx

    rx = asyncio.run(scenario())
    assert [h["x-fal-webhook-timestamp"] for h, _ in rx.received] == ["1000", "2000", "3000"]
    assert len({h["x-fal-webhook-signature"] for h, _ in rx.received}) == 3


def test_refused_targets_are_never_contacted_nor_retried(loopback_only):
    """Without the allow-list, loopback (in any spelling, or behind a name) is refused at every
    delivery: nothing connects, and the refusal is final (no retries to probe ports with)."""
    sleep = FakeSleep()
    resolver = FakeResolver({"localhost": ["127.0.0.1", "::1"], "rebound.test": ["127.0.0.1"],
                             "mixed.test": ["93.184.215.14", "10.0.0.7"]})

    async def scenario():
        async with Receiver([]) as rx:
            port = rx.server.sockets[0].getsockname()[1]
            sender = WebhookSender(WebhookSigner.generate(), policy=FetchPolicy(resolver=resolver),
                                   sleep=sleep)
            results = [await sender.deliver(url, "r", b"{}") for url in (
                rx.url, f"http://localhost:{port}/hook", f"http://[::ffff:127.0.0.1]:{port}/h",
                f"http://2130706433:{port}/h", f"http://rebound.test:{port}/h", "http://mixed.test/h",
                "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/")]
            return results, rx

    results, rx = asyncio.run(scenario())
    assert results == [False] * 8
    assert rx.received == [] and sleep.delays == [] and loopback_only == []


def test_delivery_is_pinned_to_the_vetted_address_and_keeps_the_name():
    """The name is resolved by the policy's resolver once per attempt and the connection dials that
    address: hooks.test exists in no real DNS, so any second lookup would fail."""
    resolver = FakeResolver({"hooks.test": ["127.0.0.1"]})
    policy = FetchPolicy(allowed_networks=["127.0.0.0/8"], resolver=resolver)

    async def scenario():
        async with Receiver([500]) as rx:
            port = rx.server.sockets[0].getsockname()[1]
            async with WebhookSender(WebhookSigner.generate(), policy=policy, sleep=FakeSleep()) as sender:
                assert await sender.deliver(f"http://hooks.test:{port}/hook", "r", b'{"a":1}')
            return rx, port

    rx, port = asyncio.run(scenario())
    assert [h["host"] for h, _ in rx.received] == [f"hooks.test:{port}"] * 2
    assert resolver.calls == ["hooks.test", "hooks.test"]  # checked again at each attempt
    assert rx.received[0][1] == b'{"a":1}'


def test_address_that_changes_to_internal_after_submit_is_refused_at_delivery():
    table = {"hooks.test": ["93.184.215.14"]}
    policy = FetchPolicy(resolver=FakeResolver(table))
    assert asyncio.run(validate_webhook_url("http://hooks.test/h", policy)) == "http://hooks.test/h"
    table["hooks.test"] = ["10.1.2.3"]  # DNS changed since the submit
    sleep = FakeSleep()
    sender = WebhookSender(WebhookSigner.generate(), policy=policy, sleep=sleep)
    assert asyncio.run(sender.deliver("http://hooks.test/h", "r", b"{}")) is False
    assert sleep.delays == []
