"""DNS-rebinding guard for a server without API keys.

Without keys anything that reaches the port is trusted, and a web page on another site can reach
a loopback port by making its own name resolve to 127.0.0.1 (DNS rebinding): the browser then
treats this API as that site, same-origin. Such requests carry the attacker's name in ``Host``.
So, without keys, ``Host`` must be an IP address (no DNS involved, so nothing to rebind),
``localhost`` or a ``*.localhost`` name (browsers resolve those to loopback themselves), the host
of ``public_url``, the bind host, or one of the ``allowed_hosts`` setting; anything else gets a 400.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Iterable, Optional
from urllib.parse import urlsplit

_REFUSAL = json.dumps({"detail": "Invalid Host header: without API keys this server answers only to "
                                 "its own names (see the allowed_hosts setting)"}).encode()


def host_name(header: str) -> Optional[str]:
    """The name or address in a Host header, without port or IPv6 brackets; None if malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        return name if sep and (not rest or rest[:1] == ":") else None
    name, _, port = header.partition(":")
    return name.rstrip(".") if not port or port.isdigit() else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheckMiddleware:
    def __init__(self, app, *, allowed: Iterable[str], public_urls: Iterable[Optional[str]] = ()) -> None:
        self.app = app
        names = {n.strip().lower().rstrip(".") for n in allowed if n.strip()}
        for url in public_urls:  # the API's and the files' public origins
            if url:
                names.add((urlsplit(url).hostname or "").rstrip("."))
        self.any = "*" in names
        self.names = names

    def allows(self, header: Optional[str]) -> bool:
        if header is None:  # no Host at all: not a browser
            return True
        name = host_name(header)
        if not name:
            return False
        return (self.any or name in self.names or name == "localhost" or name.endswith(".localhost")
                or _is_ip(name))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            raw = dict(scope.get("headers") or []).get(b"host")
            if not self.allows(raw.decode("latin-1") if raw is not None else None):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(_REFUSAL)).encode())]})
                await send({"type": "http.response.body", "body": _REFUSAL})
                return
        await self.app(scope, receive, send)
