"""Hostile reference-image inputs at the fetch/decode level, and hostile HTTP requests against a
live server (uploads, tokens, JSON, HEAD; at the end).

Every case must end in ReferenceImageError with the expected ``.type``; any other
exception fails the test. SSRF cases also assert that no connection was attempted
(and a guard fails the test if a socket would leave loopback).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import socket
import struct
import zlib

import httpx
import pytest
from PIL import Image

from pulid_flux.fetch import FetchPolicy, ReferenceImageError, decode_image, fetch_reference, load_reference_image

from loopback import FakeResolver, LocalServer, http_response, loopback_only  # noqa: F401  (autouse guard)


def raw_head(status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\n{extra}Connection: close\r\n\r\n".encode("latin-1")


def redirect(location: str, status: str = "302 Found") -> bytes:
    return http_response(b"", "text/plain", status, f"Location: {location}\r\n")


# ---------------------------------------------------------------------------
# hostile files


def noisy(fmt: str, size=(256, 256), mode="RGB", **save) -> bytes:
    image = Image.frombytes(mode, size, os.urandom(size[0] * size[1] * len(mode)))
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int, idat: bytes | None = None, color_type: int = 0) -> bytes:
    """A PNG whose header claims width x height (grey 8-bit), with a tiny or given IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def zero_png_bomb(side: int) -> bytes:
    """A real, fully valid PNG of side x side black pixels: tiny file, huge image."""
    rows = (b"\x00" + b"\x00" * side) * side
    return crafted_png(side, side, zlib.compress(rows, 9))


def corrupt_png() -> bytes:
    good = bytearray(noisy("PNG", (64, 64)))
    start = good.index(b"IDAT") + 4
    for i in range(start + 20, start + 60):  # scramble compressed data (CRC no longer matches)
        good[i] ^= 0x5A
    return bytes(good)


def big_gif(size) -> bytes:
    buf = io.BytesIO()
    Image.new("P", size, 3).save(buf, format="GIF")
    return buf.getvalue()


def bmp_header_only(width: int, height: int) -> bytes:
    pixel_offset = 54
    return (
        b"BM"
        + struct.pack("<IHHI", pixel_offset + 12, 0, 0, pixel_offset)
        + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 12, 2835, 2835, 0, 0)
        + b"\x00" * 12
    )


def zip_file() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello" * 100)
    return buf.getvalue()


SMALL_PIXELS = dict(max_pixels=1_000_000)

DECODE_CASES = [
    # (id, bytes, policy overrides, expected type)
    ("truncated-jpeg", lambda: noisy("JPEG")[: len(noisy("JPEG")) // 3], {}, "image_load_error"),
    ("jpeg-magic-then-garbage", lambda: b"\xff\xd8\xff\xe0" + os.urandom(2000), {}, "image_load_error"),
    ("truncated-png", lambda: noisy("PNG")[:3000], {}, "image_load_error"),
    ("corrupt-png-idat", corrupt_png, {}, "image_load_error"),
    ("png-header-only", lambda: b"\x89PNG\r\n\x1a\n", {}, "image_load_error"),
    ("png-zero-width", lambda: crafted_png(0, 10), {}, "image_load_error"),
    ("truncated-webp", lambda: noisy("WEBP")[:200], {}, "image_load_error"),
    ("truncated-gif", lambda: noisy("GIF", mode="L")[:30], {}, "image_load_error"),
    ("truncated-tiff", lambda: noisy("TIFF")[:100], {}, "image_load_error"),
    ("html", lambda: b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", {}, "image_load_error"),
    ("pdf", lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF", {}, "image_load_error"),
    ("zip", zip_file, {}, "image_load_error"),
    (
        "svg",
        lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        {},
        "image_load_error",
    ),
    ("text", lambda: b"just some text, definitely not pixels\n", {}, "image_load_error"),
    ("postscript", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", {}, "image_load_error"),
    ("empty", lambda: b"", {}, "image_load_error"),
    ("png-bomb-100000x100000", lambda: crafted_png(100_000, 100_000), {}, "image_too_large"),
    ("png-bomb-7000x7000-header", lambda: crafted_png(7000, 7000), {}, "image_too_large"),
    ("png-bomb-real-6400x6400", lambda: zero_png_bomb(6400), {}, "image_too_large"),
    ("gif-over-max-pixels", lambda: big_gif((1200, 1000)), SMALL_PIXELS, "image_too_large"),
    ("png-over-max-side", lambda: crafted_png(9000, 10), {}, "image_too_large"),
    ("bmp-header-claims-huge", lambda: bmp_header_only(50_000, 50_000), {}, "image_too_large"),
    (
        "gif-not-in-allowed-types",
        lambda: big_gif((10, 10)),
        {"allowed_content_types": ["image/png"]},
        "image_load_error",
    ),
    ("over-max-bytes", lambda: noisy("PNG", (64, 64)), {"max_bytes": 1000}, "file_too_large"),
]


@pytest.mark.filterwarnings("ignore:Truncated File Read")  # PIL's TIFF plugin warns before failing
@pytest.mark.parametrize("make,overrides,expected", [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_hostile_bytes_are_rejected_by_decode(make, overrides, expected):
    data = make()
    with pytest.raises(ReferenceImageError) as exc:
        decode_image(data, FetchPolicy(**overrides))
    assert exc.value.type == expected, exc.value.msg
    assert exc.value.msg


def test_bomb_file_is_small_but_refused_before_decoding():
    data = zero_png_bomb(6400)
    assert len(data) < 200_000  # tiny on the wire...
    with pytest.raises(ReferenceImageError) as exc:
        decode_image(data, FetchPolicy())
    assert exc.value.type == "image_too_large"  # ...refused from its header


# ---------------------------------------------------------------------------
# data: URIs

PNG_B64 = base64.b64encode(noisy("PNG", (8, 8))).decode()

DATA_CASES = [
    ("huge", lambda: "data:image/png;base64," + "A" * 2_000_000, {"max_data_uri_bytes": 1_000_000}, "file_too_large"),
    ("decodes-over-max-bytes", lambda: "data:image/png;base64," + PNG_B64, {"max_bytes": 50}, "file_too_large"),
    ("percent-over-max-bytes", lambda: "data:image/png," + "%00" * 300, {"max_bytes": 100}, "file_too_large"),
    ("no-comma", lambda: "data:image/png;base64" + PNG_B64, {}, "image_load_error"),
    ("bad-base64-chars", lambda: "data:image/png;base64,****$$$$" + PNG_B64, {}, "image_load_error"),
    ("bad-base64-length", lambda: "data:image/png;base64,A", {}, "image_load_error"),
    ("non-ascii", lambda: "data:image/png;base64,ÿØÿà", {}, "image_load_error"),
    ("empty", lambda: "data:,", {}, "image_load_error"),
    (
        "html-payload",
        lambda: "data:image/png;base64," + base64.b64encode(b"<html><script>x</script>").decode(),
        {},
        "image_load_error",
    ),
    (
        "svg-payload",
        lambda: "data:image/svg+xml,%3Csvg%20xmlns%3D%22http://www.w3.org/2000/svg%22/%3E",
        {},
        "image_load_error",
    ),
]


@pytest.mark.parametrize("make,overrides,expected", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_hostile_data_uris(make, overrides, expected, loopback_only):
    with pytest.raises(ReferenceImageError) as exc:
        asyncio.run(load_reference_image(make(), FetchPolicy(**overrides), resolver=FakeResolver({})))
    assert exc.value.type == expected, exc.value.msg
    assert loopback_only == []


# ---------------------------------------------------------------------------
# URLs refused before any connection

RESOLVER_TABLE = {
    "localhost": ["127.0.0.1", "::1"],
    "rebind.test": ["127.0.0.1"],
    "mixed.test": ["93.184.215.14", "10.0.0.7"],
    "mixed6.test": ["2606:4700:4700::1111", "fd00::1"],
    "meta.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:192.168.1.1"],
}

URL_CASES = [
    ("http://127.0.0.1/", "url_not_allowed"),
    ("http://127.0.0.1:8443/files/x.png", "url_not_allowed"),
    ("http://localhost/", "url_not_allowed"),
    ("http://[::1]/", "url_not_allowed"),
    ("http://0.0.0.0/", "url_not_allowed"),
    ("http://10.0.0.1/", "url_not_allowed"),
    ("http://172.16.0.1/", "url_not_allowed"),
    ("http://192.168.1.1/", "url_not_allowed"),
    ("http://169.254.169.254/latest/meta-data/", "url_not_allowed"),
    ("http://100.64.0.1/", "url_not_allowed"),
    ("http://224.0.0.1/", "url_not_allowed"),
    ("http://255.255.255.255/", "url_not_allowed"),
    ("http://[::ffff:127.0.0.1]/", "url_not_allowed"),
    ("http://[::ffff:a9fe:a9fe]/", "url_not_allowed"),
    ("http://[64:ff9b::a9fe:a9fe]/", "url_not_allowed"),
    ("http://[2002:7f00:1::]/", "url_not_allowed"),
    ("http://[fe80::1]/", "url_not_allowed"),
    ("http://[fd00::1]/", "url_not_allowed"),
    ("http://[::]/", "url_not_allowed"),
    ("http://2130706433/", "url_not_allowed"),
    ("http://0x7f000001/", "url_not_allowed"),
    ("http://0177.0.0.1/", "url_not_allowed"),
    ("http://0x7f.0.0.1/", "url_not_allowed"),
    ("http://127.1/", "url_not_allowed"),
    ("http://%31%32%37.0.0.1/", "url_not_allowed"),
    ("file:///etc/passwd", "url_not_allowed"),
    ("ftp://example.com/face.png", "url_not_allowed"),
    ("gopher://127.0.0.1:6379/_FLUSHALL", "url_not_allowed"),
    ("dict://127.0.0.1:11211/stats", "url_not_allowed"),
    ("javascript:alert(1)", "url_not_allowed"),
    ("//example.com/face.png", "url_not_allowed"),
    ("face.png", "url_not_allowed"),
    ("", "url_not_allowed"),
    ("http:///nohost", "url_not_allowed"),
    ("http://good@127.0.0.1/", "url_not_allowed"),
    ("http://user:pass@example.com/", "url_not_allowed"),
    ("http://example.com@127.0.0.1/", "url_not_allowed"),
    ("http://rebind.test/", "url_not_allowed"),
    ("http://mixed.test/", "url_not_allowed"),
    ("http://mixed6.test/", "url_not_allowed"),
    ("http://meta.test/", "url_not_allowed"),
    ("http://mapped.test/", "url_not_allowed"),
    ("http://x" + "a" * 9000 + ".test/", "url_not_allowed"),
    ("http://nxdomain.test/", "fetch_failed"),
]


@pytest.mark.parametrize("url,expected", URL_CASES, ids=[u[:60] for u, _ in URL_CASES])
def test_hostile_urls_refused_before_connecting(url, expected, loopback_only):
    resolver = FakeResolver(RESOLVER_TABLE)
    with pytest.raises(ReferenceImageError) as exc:
        asyncio.run(fetch_reference(url, FetchPolicy(), resolver=resolver))
    assert exc.value.type == expected, exc.value.msg
    assert loopback_only == []  # no socket was ever opened


def test_allow_list_does_not_open_other_private_ranges(loopback_only):
    policy = FetchPolicy(allowed_networks=["10.9.0.0/16"])
    resolver = FakeResolver({"store.test": ["10.9.0.5", "10.10.0.5"]})
    with pytest.raises(ReferenceImageError) as exc:
        asyncio.run(fetch_reference("http://store.test/x.png", policy, resolver=resolver))
    assert exc.value.type == "url_not_allowed" and loopback_only == []


# ---------------------------------------------------------------------------
# hostile servers (served from loopback, which these tests allow explicitly)

PUBLIC = FakeResolver  # alias for readability below
ALLOW_LOOPBACK = ["127.0.0.0/8"]


async def _stall(writer):
    await asyncio.sleep(30)  # cancelled when the server shuts down


async def _slow_body(writer):
    writer.write(raw_head(extra="Content-Type: image/png\r\nContent-Length: 100000\r\n"))
    await writer.drain()
    for _ in range(300):
        writer.write(b"\x00" * 10)
        await writer.drain()
        await asyncio.sleep(0.05)


async def _endless_body(writer):
    writer.write(raw_head(extra="Content-Type: image/png\r\n"))  # no length: body ends at close
    while True:
        writer.write(b"\x89PNG" * 16384)
        await writer.drain()


async def _endless_chunked(writer):
    writer.write(raw_head(extra="Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n"))
    while True:
        writer.write(b"4000\r\n" + b"\x00" * 0x4000 + b"\r\n")
        await writer.drain()


async def _short_body(writer):
    writer.write(raw_head(extra="Content-Type: image/png\r\nContent-Length: 5000\r\n") + b"\x89PNG" * 25)
    await writer.drain()


async def _long_body(writer):
    png = noisy("PNG", (64, 64))
    writer.write(raw_head(extra="Content-Type: image/png\r\nContent-Length: 100\r\n") + png + b"\x00" * 100000)
    await writer.drain()


SERVER_CASES = {
    # id: (routes, path, policy overrides, expected type)
    "http-404": ({}, "/missing", {}, "fetch_failed"),
    "http-500": ({"/p": http_response(b"oops", "text/plain", "500 Internal Server Error")}, "/p", {}, "fetch_failed"),
    "http-204": ({"/p": raw_head("204 No Content")}, "/p", {}, "fetch_failed"),
    "html-content-type": ({"/p": http_response(b"<html></html>", "text/html")}, "/p", {}, "image_load_error"),
    "html-disguised-as-png": ({"/p": http_response(b"<html>hi</html>", "image/png")}, "/p", {}, "image_load_error"),
    "empty-body": ({"/p": http_response(b"", "image/png")}, "/p", {}, "image_load_error"),
    "bomb-over-http": ({"/p": http_response(zero_png_bomb(6400))}, "/p", {}, "image_too_large"),
    "content-length-over-limit": ({"/p": raw_head(extra="Content-Length: 999999999\r\n")}, "/p", {}, "file_too_large"),
    "oversize-no-content-length": ({"/p": _endless_body}, "/p", {"max_bytes": 100_000}, "file_too_large"),
    "oversize-chunked": ({"/p": _endless_chunked}, "/p", {"max_bytes": 100_000}, "file_too_large"),
    "content-length-lying-long": ({"/p": _short_body}, "/p", {}, "fetch_failed"),
    "content-length-lying-short": ({"/p": _long_body}, "/p", {}, "image_load_error"),
    # Content-Encoding is never undone, so a gzip bomb stays a small, undecodable blob.
    "gzip-bomb-not-inflated": (
        {"/p": http_response(gzip.compress(b"\0" * 30_000_000), "image/png", extra="Content-Encoding: gzip\r\n")},
        "/p",
        {},
        "image_load_error",
    ),
    "garbage-not-http": ({"/p": b"SSH-2.0-OpenSSH_9.6\r\n\r\n"}, "/p", {}, "fetch_failed"),
    "never-answers": ({"/p": _stall}, "/p", {"timeout_s": 0.3}, "timeout"),
    "slow-body": ({"/p": _slow_body}, "/p", {"timeout_s": 0.5}, "timeout"),
    "redirect-loop": ({"/p": redirect("/p")}, "/p", {}, "fetch_failed"),
    "redirect-without-location": ({"/p": http_response(b"", "text/plain", "302 Found")}, "/p", {}, "fetch_failed"),
    "redirect-to-file": ({"/p": redirect("file:///etc/passwd")}, "/p", {}, "url_not_allowed"),
    "redirect-to-gopher": ({"/p": redirect("gopher://public.test:70/_x")}, "/p", {}, "url_not_allowed"),
    "redirect-to-metadata-ip": (
        {"/p": redirect("http://169.254.169.254/latest/meta-data/")},
        "/p",
        {},
        "url_not_allowed",
    ),
    "redirect-to-mapped-metadata": ({"/p": redirect("http://[::ffff:169.254.169.254]/")}, "/p", {}, "url_not_allowed"),
    "redirect-to-name-of-10.x": ({"/p": redirect("http://internal.test/admin")}, "/p", {}, "url_not_allowed"),
    "redirect-to-name-of-metadata": ({"/p": redirect("http://meta.test/")}, "/p", {}, "url_not_allowed"),
    "redirect-to-userinfo": ({"/p": redirect("http://u:p@public.test/x")}, "/p", {}, "url_not_allowed"),
    "redirect-to-decimal-ip": ({"/p": redirect("http://2852039166/")}, "/p", {}, "url_not_allowed"),
}


@pytest.mark.parametrize("case", list(SERVER_CASES), ids=list(SERVER_CASES))
def test_hostile_servers(case, loopback_only):
    routes, path, overrides, expected = SERVER_CASES[case]
    resolver = FakeResolver(
        {"public.test": ["127.0.0.1"], "internal.test": ["10.0.0.1"], "meta.test": ["169.254.169.254"]}
    )

    async def scenario():
        async with LocalServer(dict(routes)) as srv:
            policy = FetchPolicy(allowed_networks=ALLOW_LOOPBACK, **overrides)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ReferenceImageError) as exc:
                await load_reference_image(f"http://public.test:{srv.port}{path}", policy, resolver=resolver)
            return srv, exc.value, loop.time() - started

    srv, err, elapsed = asyncio.run(scenario())
    assert err.type == expected, err.msg
    assert elapsed < 5
    # Only the test server was ever dialled; refused redirect targets never were.
    assert loopback_only and all(addr == ("127.0.0.1", srv.port) for addr in loopback_only)
    assert len(srv.requests) == len(loopback_only) == 1


def test_redirect_from_allowed_server_to_loopback_is_refused(loopback_only):
    """Only 127.0.0.2 is allowed; a redirect to 127.0.0.1 must be refused before it is dialled."""

    async def scenario():
        async with LocalServer({"/secret": http_response(b"secret")}, host="127.0.0.1") as secret:
            routes = {"/p": redirect(f"http://127.0.0.1:{secret.port}/secret")}
            async with LocalServer(routes, host="127.0.0.2") as srv:
                with pytest.raises(ReferenceImageError) as exc:
                    await fetch_reference(
                        f"http://127.0.0.2:{srv.port}/p", FetchPolicy(allowed_networks=["127.0.0.2/32"])
                    )
                return secret, srv, exc.value

    secret, srv, err = asyncio.run(scenario())
    assert err.type == "url_not_allowed"
    assert secret.requests == []
    assert loopback_only == [("127.0.0.2", srv.port)]


def test_too_many_redirects(loopback_only):
    routes = {f"/r{i}": redirect(f"/r{i + 1}", "301 Moved Permanently") for i in range(20)}

    async def scenario():
        async with LocalServer(routes) as srv:
            with pytest.raises(ReferenceImageError) as exc:
                await fetch_reference(
                    f"http://public.test:{srv.port}/r0",
                    FetchPolicy(allowed_networks=ALLOW_LOOPBACK, max_redirects=3),
                    resolver=FakeResolver({"public.test": ["127.0.0.1"]}),
                )
            return srv, exc.value

    srv, err = asyncio.run(scenario())
    assert err.type == "fetch_failed"
    assert [p for p, _ in srv.requests] == ["/r0", "/r1", "/r2", "/r3"]  # 1 request + 3 redirects followed


def test_connection_refused_is_fetch_failed(loopback_only):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(ReferenceImageError) as exc:
        asyncio.run(
            fetch_reference(
                f"http://public.test:{port}/x",
                FetchPolicy(allowed_networks=ALLOW_LOOPBACK),
                resolver=FakeResolver({"public.test": ["127.0.0.1"]}),
            )
        )
    assert exc.value.type == "fetch_failed"


def test_case_count():
    total = len(DECODE_CASES) + len(DATA_CASES) + len(URL_CASES) + len(SERVER_CASES) + 4
    assert total >= 40


# ---------------------------------------------------------------------------
# hostile requests at the HTTP level (issue 10): one live server with two keys and no worker;
# no request gets a 5xx, and the server stays healthy and logs no unhandled error.

KEY_A = {"Authorization": "Key alpha"}
KEY_B = {"Authorization": "Key beta"}
COMPLETE_CAP = 4096


def deep_json(n: int) -> str:
    return "[" * n + "]" * n


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory):
    from conftest import LiveServer

    server = LiveServer(tmp_path_factory.mktemp("hostile") / "data",
                        args=["--host", "127.0.0.1", "--api-key", "alpha", "--api-key", "beta"],
                        env={"PULID_FLUX_LOCAL_WORKERS": "0", "PULID_FLUX_MAX_UPLOAD_BYTES": str(1 << 20),
                             "PULID_FLUX_MAX_COMPLETE_BODY_BYTES": str(COMPLETE_CAP)})
    server.start()
    try:
        server.wait_ready(timeout=120, need_worker=False)
        yield server
    finally:
        server.stop()


def raw_request(server, data: bytes) -> int:
    """Bytes no well-behaved client library would send; returns the status code (0: no answer)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        reply = b""
        while b"\r\n" not in reply:
            chunk = s.recv(4096)
            if not chunk:
                return 0
            reply += chunk
    return int(reply.split(b" ", 2)[1])


class Upload:
    """A CDN multipart upload of key A, and the routes an attacker would aim at."""

    def __init__(self, http):
        r = http.post("/cdn/files/upload/multipart", headers={**KEY_A, "x-fal-file-name": "t.bin"})
        self.url, self.upload_id = r.json()["access_url"], r.json()["uploadId"]
        self.path = httpx.URL(self.url).path
        self.file_id = self.path.split("/")[2]
        self.base = f"{self.path}/multipart/{self.upload_id}"


def hostile_cases(http, server):
    """(name, send() -> status, allowed statuses)."""
    up = Upload(http)
    etag = http.put(f"{up.base}/1", content=b"x" * 10, headers=KEY_A).json()["etag"]
    done = Upload(http)
    done_etag = http.put(f"{done.base}/1", content=b"d", headers=KEY_A).json()["etag"]
    http.post(f"{done.base}/complete", json={"parts": [{"partNumber": 1, "etag": done_etag}]}, headers=KEY_A)
    init = http.post("/rest/storage/upload/initiate-multipart", headers=KEY_A, json={}).json()
    signed_path, signed_query = httpx.URL(init["upload_url"]).path, httpx.URL(init["upload_url"]).query.decode()
    token = http.post("/rest/tokens/", headers=KEY_A, json={"token_expiration": 60}).json()

    def post(path, **kw):
        return lambda: http.post(path, **kw).status_code

    def put(path, **kw):
        return lambda: http.put(path, **kw).status_code

    def complete(body: bytes | str, headers=KEY_A):
        return post(f"{up.base}/complete", content=body, headers=headers)

    def chunked(total: int):
        def gen():
            for _ in range(total // 1000):
                yield b"x" * 1000
        return gen()

    lifecycle = {h: deep_json(3000) for h in ("x-fal-object-lifecycle",)}
    return [
        # declared content types
        ("content type with CR/LF", post("/rest/storage/upload/initiate", headers=KEY_A,
                                         json={"content_type": "text/html\r\nSet-Cookie: a=b"}), {422}),
        ("content type with NUL", post("/rest/storage/upload/initiate", headers=KEY_A,
                                       json={"content_type": "image/png\x00"}), {422}),
        ("content type not a type", post("/cdn/files/upload", content=b"x",
                                         headers={**KEY_A, "content-type": "<script>"}), {422}),
        ("raw control byte in Content-Type", lambda: raw_request(server, (
            f"POST /cdn/files/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Key alpha\r\n"
            f"Content-Type: text/html\x01x\r\nContent-Length: 1\r\n\r\nx").encode("latin-1")), {400, 422}),
        ("file name traversal", post("/cdn/files/upload", content=b"x",
                                     headers={**KEY_A, "x-fal-file-name": "../../../etc/passwd"}), {200}),
        ("file name 8 KiB", post("/cdn/files/upload", content=b"x",
                                 headers={**KEY_A, "x-fal-file-name": "n" * 8192}), {200}),
        # JSON nested deep or badly, in every body and header parsed
        ("deep complete body", complete(deep_json(COMPLETE_CAP // 2)), {422}),
        ("deep lifecycle header", post("/cdn/files/upload", content=b"x", headers={**KEY_A, **lifecycle}), {422}),
        ("deep lifecycle-preference on upload", post("/cdn/files/upload", content=b"x", headers={
            **KEY_A, "x-fal-object-lifecycle-preference": deep_json(3000)}), {422}),
        ("deep lifecycle-preference on submit", post("/fal-ai/flux-pulid", json={"prompt": "p"}, headers={
            **KEY_A, "x-fal-object-lifecycle-preference": deep_json(3000)}), {422}),
        ("deep submit body", post("/fal-ai/flux-pulid", content=deep_json(200_000),
                                  headers={**KEY_A, "content-type": "application/json"}), {400, 422}),
        ("deep initiate body", post("/rest/storage/upload/initiate", content=deep_json(200_000),
                                    headers={**KEY_A, "content-type": "application/json"}), {400, 422}),
        ("deep tokens body", post("/rest/tokens/", content='{"a":' * 50_000 + "1" + "}" * 50_000,
                                  headers={**KEY_A, "content-type": "application/json"}), {400, 422}),
        ("deep query JSON", lambda: http.get("/run/fal-ai/flux-pulid", headers=KEY_A, params={
            "prompt": "p", "reference_image_urls": deep_json(3000)}).status_code, {422}),
        ("complete body not JSON", complete(b"\xff\xfe{"), {422}),
        # sizes
        ("complete body over the cap", complete(b" " * (COMPLETE_CAP + 1)), {413}),
        ("chunked complete body over the cap", lambda: http.post(
            f"{up.base}/complete", content=chunked(COMPLETE_CAP + 1000), headers=KEY_A).status_code, {413}),
        ("upload over the limit, chunked", lambda: http.post(
            "/cdn/files/upload", content=chunked(2 << 20), headers=KEY_A).status_code, {413}),
        ("part over the limit", put(f"{up.base}/2", content=b"x" * (1 << 20), headers=KEY_A), {413}),
        # part lists
        ("part listed 3 times", complete(json.dumps({"parts": [{"partNumber": 1, "etag": etag}] * 3})), {422}),
        ("part listed twice, apart", complete(json.dumps({"parts": [
            {"partNumber": 1}, {"partNumber": 2}, {"partNumber": 1}]})), {422}),
        ("part number a string", complete(json.dumps({"parts": [{"partNumber": "1"}]})), {422}),
        ("part number huge", complete(json.dumps({"parts": [{"partNumber": 10 ** 30}]})), {422}),
        ("parts not a list", complete(json.dumps({"parts": "all"})), {422}),
        ("part path 0", put(f"{up.base}/0", content=b"x", headers=KEY_A), {422}),
        ("part path huge", put(f"{up.base}/{10 ** 30}", content=b"x", headers=KEY_A), {422}),
        ("part path not a number", put(f"{up.base}/one", content=b"x", headers=KEY_A), {422}),
        # writes by others, or after the end
        ("part by another key", put(f"{up.base}/1", content=b"evil", headers=KEY_B), {404}),
        ("complete by another key", complete(json.dumps({"parts": [{"partNumber": 1}]}), headers=KEY_B), {404}),
        ("part without credentials", put(f"{up.base}/1", content=b"evil"), {401}),
        ("part with the file id as upload id", put(f"{up.path}/multipart/{up.file_id}/1", content=b"e",
                                                   headers=KEY_A), {404}),
        ("part of a finished upload", put(f"{done.base}/1", content=b"again", headers=KEY_A), {403}),
        ("complete a finished upload", post(f"{done.base}/complete", headers=KEY_A, json={
            "parts": [{"partNumber": 1, "etag": done_etag}]}), {403}),
        ("signed part, bad signature", put(f"{signed_path}/1?{signed_query.replace('sig=', 'sig=0')}",
                                           content=b"x"), {403}),
        ("signed part, no signature", put(f"{signed_path}/1", content=b"x"), {403}),
        ("signed part, exp not a number", put(f"{signed_path}/1?exp=soon&sig=00", content=b"x"), {403}),
        ("signed part, exp far away", put(f"{signed_path}/1?exp={10 ** 40}&sig=00", content=b"x"), {403}),
        ("signed put on an unknown id", put(f"/files/upload/{'A' * 24}?{signed_query}", content=b"x"), {403}),
        ("signed put on a traversal id", put("/files/upload/..%2F..%2Fetc?exp=1&sig=0", content=b"x"), {403, 404}),
        # tokens
        ("token minted from a token", post("/rest/tokens/", json={}, headers={"Authorization": f"Bearer {token}"}),
         {403}),
        ("storage token from a token", post("/rest/storage/auth/token", json={},
                                            headers={"Authorization": f"Bearer {token}"}), {403}),
        ("forged token", post("/rest/tokens/", json={}, headers={"Authorization": "Bearer e30.00"}), {401}),
        ("token of dots", post("/rest/tokens/", json={}, headers={"Authorization": "Bearer ...."}), {401}),
        # reading
        ("file with the wrong name", lambda: http.get(f"{done.path[:-len('t.bin')]}x.html").status_code, {404}),
        ("file path traversal", lambda: http.get("/files/..%2F..%2Fsecret.key/x").status_code, {404}),
        # HEAD wherever GET is answered (a stream included: it must end at the headers)
        *[(f"HEAD {p}", lambda p=p: http.head(p, headers=KEY_A).status_code, {200, 202})
          for p in ("/health", "/", "/docs", "/static/app.js", "/metrics", done.path)],
        ("HEAD status stream", lambda: http.head(
            f"/fal-ai/flux-pulid/requests/{'r' * 36}/status/stream", headers=KEY_A).status_code, {404}),
    ]


def test_hostile_http_requests_get_4xx_and_the_server_stays_healthy(hostile_server):
    with httpx.Client(base_url=hostile_server.url, timeout=30) as http:
        results = []
        for name, send, allowed in hostile_cases(http, hostile_server):
            status = send()
            results.append((name, status, allowed))
            assert http.get("/health").status_code == 200, f"unhealthy after {name}"
        wrong = [(name, status, sorted(allowed)) for name, status, allowed in results if status not in allowed]
        assert not wrong, wrong
        assert all(status < 500 for _, status, _ in results)
        head = http.head("/health")
        assert head.status_code == 200 and head.content == b""
    log = hostile_server.log_tail(2000)
    assert "Traceback" not in log and "unhandled error" not in log, log
