"""fal-style webhook delivery: payload, Ed25519 signature, JWKS, retries.

Wire format (docs/fal-protocol.md §8): ``POST <url>`` with ``Content-Type:
application/json`` and the body ``{"request_id", "gateway_request_id", "status":
"OK"|"ERROR", "payload", "error"}``. Headers ``X-Fal-Webhook-Request-Id``,
``-User-Id``, ``-Timestamp`` (unix seconds) and ``-Signature`` (hex), the signature
being Ed25519 over ``request_id\\nuser_id\\ntimestamp\\nhex(sha256(body))``. Receivers
verify with the public key published as a JWKS and reject timestamps more than
300 s away from their clock.

Targets go through the same address policy as reference fetching (``fetch.FetchPolicy``):
a loopback, private, link-local or otherwise internal address is refused at submit time and
again at every delivery attempt (DNS may change in between), each attempt connects only to
the addresses it vetted, and redirects are never followed. The operator's allow-list
(``fetch_allowed_private_cidrs``) opens chosen private networks for both.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpcore
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .fetch import (
    FETCH_FAILED, URL_NOT_ALLOWED, FetchPolicy, ReferenceImageError, host_header, parse_url, pinned_pool,
    pinned_url, vet_url,
)
from .keyfile import read_or_create

log = logging.getLogger(__name__)

HEADER_REQUEST_ID = "X-Fal-Webhook-Request-Id"
HEADER_USER_ID = "X-Fal-Webhook-User-Id"
HEADER_TIMESTAMP = "X-Fal-Webhook-Timestamp"
HEADER_SIGNATURE = "X-Fal-Webhook-Signature"

DEFAULT_MAX_SKEW_S = 300  # receivers accept timestamps this far from their clock (fal's rule)


def _unix_now() -> int:
    return int(time.time())


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed_message(request_id: str, user_id: str, timestamp: int | str, body: bytes) -> bytes:
    """The exact bytes that are signed."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


class WebhookSigner:
    """Holds this server's Ed25519 webhook key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._x = _b64url(raw)
        # RFC 7638 thumbprint: a stable key id derived from the key itself.
        canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": self._x}, separators=(",", ":"), sort_keys=True)
        self.kid = _b64url(hashlib.sha256(canonical.encode("ascii")).digest())

    @classmethod
    def generate(cls) -> WebhookSigner:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> WebhookSigner:
        """Load the PEM key at ``path``, or create it (mode 0600) if absent; processes creating
        it together all end up with the same key."""
        def make() -> bytes:
            return Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )

        read_or_create(path, make)
        return cls._load(Path(path))

    @classmethod
    def _load(cls, path: Path) -> WebhookSigner:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 private key")
        if os.name == "posix" and path.stat().st_mode & 0o077:
            log.warning("webhook key %s is readable by other users; chmod 600 it", path)
        return cls(key)

    def public_jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "x": self._x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The document to serve at ``/.well-known/jwks.json``."""
        return {"keys": [self.public_jwk()]}

    def sign(self, message: bytes) -> str:
        return self._key.sign(message).hex()

    def headers(self, request_id: str, user_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        for name, value in (("request_id", request_id), ("user_id", user_id)):
            # Newlines would both break the header and make the signed message ambiguous.
            if any(c in value for c in "\r\n\x00"):
                raise ValueError(f"{name} must not contain line breaks or NUL")
        ts = _unix_now() if timestamp is None else int(timestamp)
        return {
            HEADER_REQUEST_ID: request_id,
            HEADER_USER_ID: user_id,
            HEADER_TIMESTAMP: str(ts),
            HEADER_SIGNATURE: self.sign(signed_message(request_id, user_id, ts, body)),
        }


def verify_signature(
    jwks: Mapping[str, Any],
    headers: Mapping[str, str],
    body: bytes,
    *,
    max_skew_s: int = DEFAULT_MAX_SKEW_S,
    now: float | None = None,
) -> bool:
    """Receiver-side check: True iff some Ed25519 key in ``jwks`` signed this delivery
    and its timestamp is within ``max_skew_s`` of ``now`` (default: the clock)."""
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        request_id = lower[HEADER_REQUEST_ID.lower()]
        user_id = lower[HEADER_USER_ID.lower()]
        ts_text = lower[HEADER_TIMESTAMP.lower()]
        signature = bytes.fromhex(lower[HEADER_SIGNATURE.lower()])
        timestamp = int(ts_text)
    except (KeyError, ValueError):
        return False
    if not ts_text.isdigit():
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > max_skew_s:
        return False
    message = signed_message(request_id, user_id, ts_text, body)
    for jwk in jwks.get("keys", []) if isinstance(jwks, Mapping) else []:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        try:
            raw = _b64url_decode(str(jwk.get("x", "")))
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)
            return True
        except (InvalidSignature, ValueError):
            continue
    return False


def build_payload(request_id: str, *, ok: bool, payload: Any, error: str | None) -> bytes:
    """The JSON body fal sends to a webhook."""
    doc: dict[str, Any] = {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": "OK" if ok else "ERROR",
        "payload": None,
        "error": error,
    }
    try:
        # Serialise the payload alone first so a failure leaves the envelope intact.
        json.dumps(payload, allow_nan=False)
        doc["payload"] = payload
    except (TypeError, ValueError, RecursionError) as exc:
        doc["payload_error"] = f"Response payload is not JSON serializable: {exc}"
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


async def validate_webhook_url(url: str, policy: FetchPolicy) -> str:
    """Submit-time check of a webhook URL under the outbound address policy; returns it
    normalised or raises ReferenceImageError. A name that does not resolve (yet) is accepted:
    every delivery attempt checks again."""
    target = parse_url(url, policy)
    try:
        await asyncio.wait_for(vet_url(target.url, policy), policy.connect_timeout_s)
    except ReferenceImageError as exc:
        if exc.type != FETCH_FAILED:
            raise
    except (asyncio.TimeoutError, TimeoutError):
        pass
    return str(target.url)


# Errors of one delivery attempt that are worth retrying (the receiver may come back).
_TRANSIENT = (
    httpcore.ConnectError, httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError,
    asyncio.TimeoutError, TimeoutError, OSError,
)


class WebhookSender:
    """Delivers one webhook with retries: bounded exponential backoff with jitter."""

    def __init__(
        self,
        signer: WebhookSigner,
        *,
        policy: FetchPolicy | None = None,  # outbound address policy; None = no internal targets at all
        max_attempts: int = 11,  # the first try and fal's "up to 10 retries"
        base_delay_s: float = 10.0,  # wait before the 2nd try; doubles each time
        max_delay_s: float = 1800.0,  # cap on one wait: 10 retries take 0.9-1.7 h (fal: within 2 h)
        timeout_s: float = 15.0,  # whole time allowed for one attempt (fal quotes 15 s)
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.signer = signer
        self.policy = policy or FetchPolicy()
        self.max_attempts = max_attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._rng = rng or random.Random()

    def backoff(self, attempt: int) -> float:
        """Delay after failed attempt number ``attempt`` (1-based): half fixed, half random."""
        ceiling = min(self.max_delay_s, self.base_delay_s * (2 ** (attempt - 1)))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    async def aclose(self) -> None:
        pass  # every attempt opens and closes its own pinned connection

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _attempt(self, url: str, request_id: str, body: bytes, user_id: str) -> int:
        # Resolved and vetted again on every attempt: the name may point elsewhere by now.
        target, addresses = await vet_url(url, self.policy)
        headers = [
            (b"Host", host_header(target)),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode("ascii")),
            (b"User-Agent", self.policy.user_agent.encode("ascii", "replace")),
            (b"Connection", b"close"),
        ]
        signed = self.signer.headers(request_id, user_id, body)  # fresh timestamp per try
        headers += [(k.encode("ascii"), v.encode("latin-1")) for k, v in signed.items()]
        timeouts = {"connect": self.timeout_s, "read": self.timeout_s, "write": self.timeout_s,
                    "pool": self.timeout_s}
        async with pinned_pool(target, addresses, self.policy) as pool:
            # The response body is never read: a hostile receiver cannot make us buffer it.
            # A redirect is a failed attempt, never followed.
            async with pool.stream("POST", pinned_url(target), headers=headers, content=body,
                                   extensions={"timeout": timeouts}) as response:
                return response.status

    async def deliver(self, url: str, request_id: str, body: bytes, user_id: str = "") -> bool:
        """POST ``body`` to ``url``; True on a 2xx, False once every attempt failed or the
        address policy refused the target (that is final: it is not retried).

        Raises ValueError if ``request_id`` or ``user_id`` contains a line break.
        """
        for attempt in range(1, self.max_attempts + 1):
            try:
                status = await asyncio.wait_for(self._attempt(url, request_id, body, user_id), self.timeout_s)
                if 200 <= status < 300:
                    return True
                reason = f"HTTP {status}"
            except ReferenceImageError as exc:
                if exc.type == URL_NOT_ALLOWED:
                    log.warning("webhook for %s not sent: %s", request_id, exc.msg)
                    return False
                reason = exc.msg  # the name did not resolve: DNS may recover
            except _TRANSIENT as exc:
                reason = type(exc).__name__
            if attempt == self.max_attempts:
                log.warning("webhook for %s gave up after %d attempts (%s)", request_id, attempt, reason)
                return False
            delay = self.backoff(attempt)
            log.info("webhook for %s attempt %d failed (%s); retrying in %.1f s", request_id, attempt, reason, delay)
            await self._sleep(delay)
        return False
