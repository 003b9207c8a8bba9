"""Positive paths and building blocks of pulid_flux.fetch.

All traffic stays on loopback: a guard fails the test if any socket connects
elsewhere, and host names are answered by a fake resolver.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import socket
import ssl
import urllib.parse

import pytest
from PIL import Image

from pulid_flux import fetch as fetch_mod
from pulid_flux.fetch import FetchPolicy, ReferenceImageError, decode_image, fetch_reference, load_reference_image

from loopback import FakeResolver, LocalServer, http_response, loopback_only  # noqa: F401  (autouse guard)

def image_bytes(fmt: str, size=(64, 48), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=(200, 30, 90) if mode == "RGB" else 7).save(buf, format=fmt)
    return buf.getvalue()


LOOPBACK_POLICY = dict(allowed_networks=["127.0.0.0/8"])


# ---------------------------------------------------------------------------
# positive fetches


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
def test_fetches_and_decodes_image_over_http(fmt, ctype, loopback_only):
    payload = image_bytes(fmt)

    async def scenario():
        async with LocalServer({"/face": http_response(payload, ctype)}) as srv:
            resolver = FakeResolver({"public.test": ["127.0.0.1"]})
            policy = FetchPolicy(**LOOPBACK_POLICY)
            data = await fetch_reference(f"http://public.test:{srv.port}/face", policy, resolver=resolver)
            return srv, resolver, data

    srv, resolver, data = asyncio.run(scenario())
    assert data == payload
    image = decode_image(data, FetchPolicy())
    assert image.size == (64, 48) and image.format == fmt
    # The name, not the pinned IP, travels in the Host header.
    assert srv.requests[0][1]["host"] == f"public.test:{srv.port}"
    assert srv.requests[0][1]["accept-encoding"] == "identity"
    assert resolver.calls == ["public.test"]
    assert loopback_only == [("127.0.0.1", srv.port)]


def test_octet_stream_is_accepted_and_magic_bytes_decide():
    payload = image_bytes("PNG")

    async def scenario():
        async with LocalServer({"/x.jpg": http_response(payload, "application/octet-stream")}) as srv:
            return await load_reference_image(
                f"http://public.test:{srv.port}/x.jpg",
                FetchPolicy(**LOOPBACK_POLICY),
                resolver=FakeResolver({"public.test": ["127.0.0.1"]}),
            )

    assert asyncio.run(scenario()).format == "PNG"


def test_follows_relative_and_absolute_redirects_within_policy():
    payload = image_bytes("PNG")

    async def scenario():
        routes = {
            "/start": http_response(b"", "text/plain", "302 Found", "Location: /middle\r\n"),
            "/img": http_response(payload),
        }
        async with LocalServer(routes) as srv:
            routes["/middle"] = http_response(
                b"", "text/plain", "307 Temporary Redirect", f"Location: http://cdn.test:{srv.port}/img\r\n"
            )
            resolver = FakeResolver({"public.test": ["127.0.0.1"], "cdn.test": ["127.0.0.1"]})
            data = await fetch_reference(
                f"http://public.test:{srv.port}/start", FetchPolicy(**LOOPBACK_POLICY), resolver=resolver
            )
            return srv, resolver, data

    srv, resolver, data = asyncio.run(scenario())
    assert data == payload
    assert [p for p, _ in srv.requests] == ["/start", "/middle", "/img"]
    assert srv.requests[2][1]["host"] == f"cdn.test:{srv.port}"
    assert resolver.calls == ["public.test", "public.test", "cdn.test"]  # every hop re-resolved and re-vetted


def test_connection_is_pinned_to_the_vetted_address(monkeypatch, loopback_only):
    """If anything resolved the name again (DNS rebinding), it would get 10.0.0.1;
    the fetch must still dial only the address that was checked."""
    payload = image_bytes("PNG")

    def rebound(*args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", 80))]

    async def rebound_async(self, *args, **kwargs):
        return rebound()

    monkeypatch.setattr(socket, "getaddrinfo", rebound)
    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", rebound_async)

    async def scenario():
        async with LocalServer({"/p.png": http_response(payload)}, host="127.0.0.2") as srv:
            data = await fetch_reference(
                f"http://rebind.test:{srv.port}/p.png",
                FetchPolicy(allowed_networks=["127.0.0.2/32"]),
                resolver=FakeResolver({"rebind.test": ["127.0.0.2"]}),
            )
            return srv, data

    srv, data = asyncio.run(scenario())
    assert data == payload
    assert loopback_only == [("127.0.0.2", srv.port)]


def test_https_fetch_pins_ip_but_verifies_the_name(tmp_path, loopback_only):
    from pulid_flux.tls import make_certificates

    paths = make_certificates(tmp_path, ["public.test"], 2)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(paths["cert"], paths["key"])
    payload = image_bytes("JPEG")
    policy = FetchPolicy(ca_file=str(paths["ca"]), **LOOPBACK_POLICY)
    resolver = FakeResolver({"public.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})

    async def scenario():
        async with LocalServer({"/a.jpg": http_response(payload, "image/jpeg")}, ssl_context=server_ctx) as srv:
            good = await fetch_reference(f"https://public.test:{srv.port}/a.jpg", policy, resolver=resolver)
            # Same IP, but a name the certificate does not cover: verification must fail.
            with pytest.raises(ReferenceImageError) as bad:
                await fetch_reference(f"https://other.test:{srv.port}/a.jpg", policy, resolver=resolver)
            # Without the CA the server is not trusted at all.
            with pytest.raises(ReferenceImageError) as untrusted:
                await fetch_reference(
                    f"https://public.test:{srv.port}/a.jpg", FetchPolicy(**LOOPBACK_POLICY), resolver=resolver
                )
            return srv, good, bad.value, untrusted.value

    srv, good, bad, untrusted = asyncio.run(scenario())
    assert good == payload
    assert bad.type == "fetch_failed" and untrusted.type == "fetch_failed"
    assert srv.requests[0][1]["host"] == f"public.test:{srv.port}"
    assert len(srv.requests) == 1  # the unverified connections never sent a request


def test_data_uris_base64_and_percent_encoded():
    payload = image_bytes("PNG")
    b64 = base64.b64encode(payload).decode()
    policy = FetchPolicy()
    assert asyncio.run(fetch_reference(f"data:image/png;base64,{b64}", policy)) == payload
    # Line-wrapped and unpadded base64 is tolerated; magic bytes decide the type.
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)).rstrip("=")
    assert asyncio.run(fetch_reference(f"data:application/octet-stream;base64,{wrapped}", policy)) == payload
    pct = urllib.parse.quote_from_bytes(payload)
    assert asyncio.run(fetch_reference(f"data:image/png,{pct}", policy)) == payload
    assert decode_image(payload, policy).size == (64, 48)


def test_own_file_is_used_without_network(loopback_only):
    payload = image_bytes("PNG")
    resolver = FakeResolver({})
    asked: list[str] = []

    def own_file(url: str):
        asked.append(url)
        return payload if url.startswith("http://127.0.0.1:8443/files/") else None

    data = asyncio.run(
        fetch_reference("http://127.0.0.1:8443/files/abc.png", FetchPolicy(), own_file=own_file, resolver=resolver)
    )
    assert data == payload
    assert asked == ["http://127.0.0.1:8443/files/abc.png"]
    assert resolver.calls == [] and loopback_only == []
    # A URL own_file does not know goes through the normal checks (and is refused here).
    with pytest.raises(ReferenceImageError) as exc:
        asyncio.run(fetch_reference("http://127.0.0.1:9/other.png", FetchPolicy(), own_file=own_file))
    assert exc.value.type == "url_not_allowed"


def test_own_file_result_is_size_capped():
    with pytest.raises(ReferenceImageError) as exc:
        asyncio.run(fetch_reference("http://x.test/f", FetchPolicy(max_bytes=10), own_file=lambda u: b"x" * 11))
    assert exc.value.type == "file_too_large"


def test_real_system_resolver_is_used_by_default(loopback_only):
    # "localhost" resolves through /etc/hosts to loopback: refused before connecting.
    with pytest.raises(ReferenceImageError) as exc:
        asyncio.run(fetch_reference("http://localhost:9/x.png", FetchPolicy()))
    assert exc.value.type == "url_not_allowed"
    assert loopback_only == []


# ---------------------------------------------------------------------------
# decoding


@pytest.mark.parametrize(
    "fmt,mode",
    [
        ("PNG", "RGBA"),
        ("PNG", "L"),
        ("JPEG", "RGB"),
        ("JPEG", "CMYK"),
        ("WEBP", "RGB"),
        ("GIF", "P"),
        ("BMP", "RGB"),
        ("TIFF", "RGB"),
    ],
)
def test_decode_keeps_format_and_mode(fmt, mode):
    image = decode_image(image_bytes(fmt, (33, 17), mode), FetchPolicy())
    assert image.format == fmt and image.mode == mode and image.size == (33, 17)
    assert image.getpixel((0, 0)) is not None  # pixels are loaded


def test_decode_limits_are_inclusive():
    policy = FetchPolicy(max_pixels=64 * 48, max_side=64)
    assert decode_image(image_bytes("PNG"), policy).size == (64, 48)
    with pytest.raises(ReferenceImageError) as exc:
        decode_image(image_bytes("PNG", (65, 10)), policy)
    assert exc.value.type == "image_too_large"


def test_policy_can_narrow_accepted_types():
    policy = FetchPolicy(allowed_content_types=["image/png"])
    assert decode_image(image_bytes("PNG"), policy).format == "PNG"
    with pytest.raises(ReferenceImageError) as exc:
        decode_image(image_bytes("JPEG"), policy)
    assert exc.value.type == "image_load_error"


# ---------------------------------------------------------------------------
# address vetting


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.31.255.255",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.254",
        "0.0.0.0",
        "224.0.0.251",
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "192.0.0.8",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:a9fe:a9fe::1",
        "::127.0.0.1",
        "2001:db8::1",
        "64:ff9b:1::1",
    ],
)
def test_non_public_addresses_are_refused(address):
    assert fetch_mod.address_refusal(ipaddress.ip_address(address), FetchPolicy()) is not None


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_pass(address):
    assert fetch_mod.address_refusal(ipaddress.ip_address(address), FetchPolicy()) is None


def test_allowed_networks_open_exactly_their_range():
    policy = FetchPolicy(allowed_networks=["10.20.0.0/16", "fd00:1::/64"])
    assert fetch_mod.address_refusal(ipaddress.ip_address("10.20.3.4"), policy) is None
    assert fetch_mod.address_refusal(ipaddress.ip_address("fd00:1::5"), policy) is None
    assert fetch_mod.address_refusal(ipaddress.ip_address("10.21.0.1"), policy) is not None
    assert fetch_mod.address_refusal(ipaddress.ip_address("127.0.0.1"), policy) is not None


def test_bad_policy_values_fail_at_construction():
    with pytest.raises(ValueError):
        FetchPolicy(allowed_networks=["10.0.0.0/33"])
    with pytest.raises(ValueError):
        FetchPolicy(allowed_schemes=["http", "file"])


def test_error_carries_user_message_and_type():
    err = ReferenceImageError("nope", "timeout")
    assert isinstance(err, ValueError) and err.msg == "nope" and err.type == "timeout" and str(err) == "nope"
