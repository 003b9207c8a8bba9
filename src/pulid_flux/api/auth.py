"""API keys and the HMAC-signed tokens this server hands out.

Keys are compared in constant time. A request belongs to the key that submitted it (its
"owner", a hash of the key), and other keys get 404 for it. Tokens (CDN upload tokens,
`/rest/tokens/` JWT stand-ins) and signed upload URLs are HMACs over a server secret kept
in the data directory, so they survive restarts and need no database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import HTTPException, Request

from ..keyfile import read_or_create

TOKEN_CDN = "cdn"
TOKEN_CLIENT = "client"


@dataclass(frozen=True)
class Credential:
    owner: str
    expires_at: Optional[float] = None  # set when it is a token: what it mints ends no later

    def cap(self, ttl_s: float) -> float:
        """Expiry of something minted from this credential with ``ttl_s``."""
        exp = time.time() + ttl_s
        return exp if self.expires_at is None else min(exp, self.expires_at)


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def load_or_create_secret(path: Path) -> bytes:
    return read_or_create(path, lambda: secrets.token_bytes(32))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Auth:
    def __init__(self, api_keys: list[str], secret: bytes):
        self._keys = [k.encode() for k in api_keys]
        self._secret = secret

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check_key(self, key: str) -> Optional[str]:
        candidate = key.encode()
        match = None
        for k in self._keys:  # no early exit: timing does not tell which key matched
            if hmac.compare_digest(candidate, k):
                match = k
        return owner_of(match.decode()) if match is not None else None

    # --- tokens -------------------------------------------------------------------------
    def _mac(self, message: str) -> str:
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def make_token(self, owner: str, kind: str, exp: float) -> tuple[str, float]:
        body = _b64(json.dumps({"o": owner, "k": kind, "e": int(exp)}).encode())
        return f"{body}.{self._mac(body)}", exp

    def check_token(self, token: str, kind: str) -> Optional[Credential]:
        try:
            body, mac = token.rsplit(".", 1)
            if not hmac.compare_digest(mac, self._mac(body)):
                return None
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return None
        if not isinstance(claims, dict) or claims.get("k") != kind or claims.get("e", 0) < time.time():
            return None
        return Credential(str(claims.get("o", "")), float(claims["e"]))

    def upload_id(self, file_id: str) -> str:
        """The id of a CDN multipart upload: only its initiator learns it (the file's own id
        is public in its URL)."""
        return self._mac(f"upload|{file_id}")[:32]

    def sign_path(self, path: str, exp: float) -> str:
        """Query string that makes ``path`` (and sub-paths) usable without credentials."""
        exp = int(exp)
        return f"exp={exp}&sig={self._mac(f'{path}|{exp}')}"

    def check_signed(self, path: str, exp: Optional[str], sig: Optional[str]) -> bool:
        if not exp or not sig:
            return False
        try:
            if int(exp) < time.time():
                return False
        except ValueError:
            return False
        return hmac.compare_digest(sig, self._mac(f"{path}|{exp}"))

    # --- request authentication --------------------------------------------------------
    def owner_for(self, request: Request, *, allow: tuple[str, ...] = (TOKEN_CLIENT,)) -> str:
        """The caller's owner id; raises 401 when auth is on and nothing valid was sent."""
        return self.credential(request, allow=allow).owner

    def credential(self, request: Request, *, allow: tuple[str, ...] = (TOKEN_CLIENT,)) -> Credential:
        """Who the caller is, and until when (tokens); raises 401 when auth is on and nothing
        valid was sent. Without keys, a token sent anyway still bounds what it mints."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "key" and value and self.enabled:
            owner = self.check_key(value)
            if owner is not None:
                return Credential(owner)
        elif scheme.lower() == "bearer" and value:
            for kind in allow:
                cred = self.check_token(value, kind)
                if cred is not None:
                    return cred
        token = request.query_params.get("fal_jwt_token")
        if token and TOKEN_CLIENT in allow:
            cred = self.check_token(token, TOKEN_CLIENT)
            if cred is not None:
                return cred
        if not self.enabled:
            return Credential("")
        raise HTTPException(
            status_code=401,
            detail="Unauthorized: send `Authorization: Key <key>`",
            headers={"x-fal-error-type": "unauthorized"},
        )
