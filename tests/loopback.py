"""Loopback-only networking helpers shared by the fetch tests: a connect guard, a fake DNS
resolver and a tiny raw HTTP server."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Record every outgoing connect; refuse (and fail) any that leaves loopback."""
    seen: list[tuple[str, int]] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def check(address):
        if isinstance(address, tuple):
            host = address[0]
            seen.append((host, address[1]))
            if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
                pytest.fail(f"test tried to connect to non-loopback {address}")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return seen


class FakeResolver:
    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[host])


def http_response(body: bytes, content_type: str = "image/png", status: str = "200 OK", extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class LocalServer:
    """A tiny HTTP/1.1 server on loopback; ``routes`` maps a path to raw response bytes
    or to an async callable(writer) that writes whatever it likes."""

    def __init__(self, routes: dict, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None):
        self.routes = routes
        self.host = host
        self.ssl_context = ssl_context
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> LocalServer:
        self.server = await asyncio.start_server(self._handle, self.host, 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self._tasks:  # stalled handlers must not outlive the test
            task.cancel()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            self.requests.append((path, headers))
            route = self.routes.get(path, http_response(b"not found", "text/plain", "404 Not Found"))
            if callable(route):
                await route(writer)
            else:
                writer.write(route)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, ssl.SSLError):
            pass
        finally:
            writer.close()
