"""The outbound address policy (SSRF guard), and safe retrieval and decoding of reference images.

Every URL this server contacts on a client's behalf -- reference images and webhooks alike --
goes through ``vet_url`` (scheme, host spelling, every resolved address) and is then dialled
through ``pinned_pool`` (only the vetted addresses), under one ``FetchPolicy``.

``fetch_reference`` turns the ``reference_image_url`` of a request into bytes:

* ``data:`` URIs (base64 or percent-encoded), size-capped *before* decoding;
* this server's own file URLs, through the ``own_file`` callback (no network);
* ``http``/``https`` URLs, fetched with these guards:

  - only http/https, no userinfo, no non-canonical numeric hosts (``2130706433``,
    ``0x7f000001``, ``127.1``);
  - the host is resolved here and the request is refused if *any* address is not
    globally routable (loopback, RFC 1918, link-local/metadata, CGNAT, multicast,
    reserved, unspecified, and the IPv4-mapped / NAT64 / 6to4 / IPv4-compatible
    IPv6 spellings of those), unless it lies in ``FetchPolicy.allowed_networks``;
  - the connection is *pinned* to the vetted address: the HTTP layer gets a
    network backend that can only dial that address, so a DNS answer that changes
    between check and connect (rebinding) cannot redirect the request. The URL
    keeps its host name, so the Host header, TLS SNI and certificate checks all
    use the name the user gave;
  - redirects are followed by hand, every hop re-checked the same way;
  - the body is streamed and cut at ``max_bytes``; a larger Content-Length is
    refused before reading; the whole fetch runs under one total time cap;
  - ``Accept-Encoding: identity`` and no transparent decompression, so the byte
    cap counts what is actually buffered (no gzip bombs).

``decode_image`` sniffs the real format from magic bytes, opens it with only that
PIL plugin, checks the declared dimensions *before* decoding pixels, and turns
every decoder failure into ``ReferenceImageError``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import io
import ipaddress
import logging
import re
import socket
import ssl
import threading
import urllib.parse
import warnings
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import httpcore
import httpx
from PIL import Image

from .errors import InputError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A resolver maps (host, port) to the list of IP address strings it resolves to.
Resolver = Callable[[str, int], Awaitable[Iterable[str]] | Iterable[str]]

# Machine-readable error types carried by ReferenceImageError.type.
URL_NOT_ALLOWED = "url_not_allowed"  # scheme/host/address refused by policy
FETCH_FAILED = "fetch_failed"  # DNS, connect, HTTP status, protocol, redirect loop
FILE_TOO_LARGE = "file_too_large"  # body or data URI over the byte limits
IMAGE_LOAD_ERROR = "image_load_error"  # not an image, unsupported, corrupt, malformed data URI
IMAGE_TOO_LARGE = "image_too_large"  # dimensions over max_pixels / max_side
IMAGE_TOO_SMALL = "image_too_small"  # a side under min_side: too small to hold a usable face
TIMEOUT = "timeout"  # total or connect time cap exceeded

ERROR_TYPES = (URL_NOT_ALLOWED, FETCH_FAILED, FILE_TOO_LARGE, IMAGE_LOAD_ERROR, IMAGE_TOO_LARGE,
               IMAGE_TOO_SMALL, TIMEOUT)


class ReferenceImageError(InputError):
    """A reference image could not be used; ``msg`` is safe to show to the user."""

    def __init__(self, msg: str, type: str) -> None:  # noqa: A002 - agreed attribute name
        super().__init__(msg, loc=("body", "reference_image_url"), type_=type)

    def __repr__(self) -> str:
        return f"ReferenceImageError(type={self.type!r}, msg={self.msg!r})"


_DEFAULT_CONTENT_TYPES = [
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/tiff",
]


@dataclass
class FetchPolicy:
    """Limits for fetching and decoding one reference image."""

    max_bytes: int = 20 * 1024 * 1024  # largest body (or decoded data URI) accepted, in bytes
    timeout_s: float = 30.0  # total wall time for resolve + connect + all redirects + body
    connect_timeout_s: float = 10.0  # time allowed to open one TCP/TLS connection
    max_redirects: int = 5  # redirect hops followed before giving up
    max_pixels: int = 40_000_000  # width*height cap checked from the header, before decoding
    max_side: int = 8192  # cap on either dimension, checked from the header
    min_side: int = 0  # floor on either dimension, checked from the header; 0 = none
    max_data_uri_bytes: int = 28 * 1024 * 1024  # cap on the raw data: URI string (base64 of ~20 MiB)
    max_url_length: int = 8192  # cap on a non-data URL's length
    # CIDRs allowed although not globally routable (e.g. a private model store); empty = none.
    allowed_networks: list[str] = field(default_factory=list)
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])  # data: is handled apart
    # Image types accepted (checked against the sniffed type, and against a declared
    # Content-Type unless that is missing or generic).
    allowed_content_types: list[str] = field(default_factory=lambda: list(_DEFAULT_CONTENT_TYPES))
    # Declared Content-Types that say nothing about the data; tolerated, magic bytes decide.
    generic_content_types: list[str] = field(
        default_factory=lambda: ["application/octet-stream", "binary/octet-stream"]
    )
    ca_file: str | None = None  # extra CA bundle for https fetches; None = SSL_CERT_FILE or certifi
    user_agent: str = "pulid-flux-fetch/1"  # User-Agent header sent on fetches
    # Looks host names up; None = the system resolver (tests substitute a table).
    resolver: Resolver | None = None

    def __post_init__(self) -> None:
        # Parse once so a typo in configuration fails at start-up, not per request.
        self._networks: list[IPNetwork] = [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]
        bad = [s for s in self.allowed_schemes if s not in ("http", "https")]
        if bad:
            raise ValueError(f"only http and https can be fetched, not {bad}")

    def is_allowed_network(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self._networks)


# ---------------------------------------------------------------------------
# Address vetting

# Ranges refused on top of what the ipaddress flags report: the flags' lists have
# changed between Python releases, so the ones that matter here are spelled out.
_EXTRA_BLOCKED: list[IPNetwork] = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, cloud metadata
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved + broadcast
        "::/128",
        "::1/128",
        "::/96",  # IPv4-compatible (deprecated); embedded v4 also checked
        "100::/64",  # discard-only
        "2001:db8::/32",  # documentation
        "64:ff9b:1::/48",  # local-use NAT64
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
]


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4, compatible)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    packed = ip.packed
    if packed[:12] == bytes.fromhex("0064ff9b0000000000000000"):  # 64:ff9b::/96 NAT64
        return ipaddress.IPv4Address(packed[12:])
    if packed[:12] == bytes(12) and packed[12:] not in (bytes(4), b"\x00\x00\x00\x01"):  # ::a.b.c.d
        return ipaddress.IPv4Address(packed[12:])
    return None


def _is_forbidden(ip: IPAddress) -> bool:
    if (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    ):
        return True
    return any(ip.version == net.version and ip in net for net in _EXTRA_BLOCKED)


def address_refusal(ip: IPAddress, policy: FetchPolicy) -> str | None:
    """Why ``ip`` may not be connected to, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
    embedded = _embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    candidates = [ip] + ([embedded] if embedded is not None else [])
    if any(policy.is_allowed_network(c) for c in candidates):
        return None
    if embedded is not None and (ip.ipv4_mapped is not None or ip in _NAT64):
        # These reach exactly the embedded IPv4 host (DNS64 answers use them for every
        # public name on IPv6-only networks), so that address alone decides.
        candidates = [embedded]
    for c in candidates:
        if _is_forbidden(c):
            return f"address {c} is not a public address"
    return None


# ---------------------------------------------------------------------------
# URL vetting

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"^(?:{_LABEL}\.)*{_LABEL}\.?$")
# WHATWG parses a host whose last label is numeric as an IPv4 number (127.1,
# 0x7f.1, 2130706433); such hosts are refused rather than interpreted.
_NUMERIC_LABEL_RE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")


@dataclass
class Target:
    url: httpx.URL
    scheme: str
    host: str  # ASCII host; IPv6 literals without brackets
    port: int
    literal: IPAddress | None


def _refuse(msg: str) -> ReferenceImageError:
    return ReferenceImageError(msg, URL_NOT_ALLOWED)


def _parse_target(raw: str | httpx.URL, policy: FetchPolicy) -> Target:
    try:
        url = raw if isinstance(raw, httpx.URL) else httpx.URL(raw)
    except (httpx.InvalidURL, TypeError, ValueError, UnicodeError):
        raise _refuse("the URL could not be parsed") from None
    scheme = url.scheme.lower()
    if scheme not in policy.allowed_schemes:
        raise _refuse(f"URL scheme {scheme or '(none)'!r} is not allowed; use http or https")
    if url.userinfo:
        raise _refuse("URLs with a user name or password are not allowed")
    try:
        host = url.raw_host.decode("ascii").lower()  # IDNA-encoded form, what DNS sees
    except UnicodeDecodeError:
        raise _refuse("the URL host is not a valid host name") from None
    if not host:
        raise _refuse("the URL has no host")
    literal: IPAddress | None = None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        if len(host) > 253 or not _HOSTNAME_RE.match(host):
            raise _refuse("the URL host is not a valid host name") from None
        if _NUMERIC_LABEL_RE.match(host.rstrip(".").rsplit(".", 1)[-1]):
            raise _refuse("numeric host names other than dotted-quad IPv4 are not allowed") from None
    if isinstance(literal, ipaddress.IPv6Address) and literal.scope_id:
        raise _refuse("IPv6 zone identifiers are not allowed")
    port = url.port or (443 if scheme == "https" else 80)
    return Target(url=url, scheme=scheme, host=host, port=port, literal=literal)


async def _default_resolver(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [info[4][0] for info in infos]


async def _vetted_addresses(target: Target, policy: FetchPolicy, resolver: Resolver | None) -> list[str]:
    if target.literal is not None:
        reason = address_refusal(target.literal, policy)
        if reason:
            raise _refuse(f"refused to connect to {target.host}: {reason}")
        return [str(target.literal)]
    resolve = resolver or policy.resolver or _default_resolver
    try:
        result = resolve(target.host, target.port)
        if inspect.isawaitable(result):
            result = await result
        answers = list(result)
    except (OSError, UnicodeError, ValueError):
        raise ReferenceImageError(f"could not resolve host {target.host}", FETCH_FAILED) from None
    addresses: list[str] = []
    for text in answers:
        try:
            ip = ipaddress.ip_address(str(text))
        except ValueError:
            raise ReferenceImageError(f"host {target.host} resolved to an invalid address", FETCH_FAILED) from None
        reason = address_refusal(ip, policy)
        if reason:
            # One bad answer condemns the name: a later lookup may return it.
            raise _refuse(f"refused to connect to {target.host}: {reason}")
        addresses.append(str(ip).split("%", 1)[0])
    if not addresses:
        raise ReferenceImageError(f"host {target.host} has no addresses", FETCH_FAILED)
    return list(dict.fromkeys(addresses))


def parse_url(url: str | httpx.URL, policy: FetchPolicy) -> Target:
    """The checks that need no DNS (length, scheme, user info, host spelling, literal
    addresses are vetted later); raises ReferenceImageError (URL_NOT_ALLOWED)."""
    if isinstance(url, str) and len(url) > policy.max_url_length:
        raise _refuse(f"the URL is longer than {policy.max_url_length} characters")
    return _parse_target(url, policy)


async def vet_url(
    url: str | httpx.URL, policy: FetchPolicy, resolver: Resolver | None = None
) -> tuple[Target, list[str]]:
    """Parse ``url`` and resolve its host under ``policy``; returns the target and the vetted
    addresses to pin, or raises ReferenceImageError (URL_NOT_ALLOWED or FETCH_FAILED)."""
    target = parse_url(url, policy)
    return target, await _vetted_addresses(target, policy, resolver)


# ---------------------------------------------------------------------------
# Pinned connections


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Dials only the vetted addresses of one (host, port); anything else is refused."""

    def __init__(self, host: str, port: int, addresses: list[str]) -> None:
        self._host = host
        self._port = port
        self._addresses = addresses
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        if host.lower() != self._host or port != self._port:
            raise httpcore.ConnectError("connection target differs from the vetted one")
        last: Exception | None = None
        for address in self._addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError("no address to connect to")

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are never used for fetches")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _ssl_context(policy: FetchPolicy) -> ssl.SSLContext:
    # A fresh context per fetch: httpcore sets ALPN on it, so it is not shared.
    ctx = httpx.create_ssl_context()
    if policy.ca_file:
        ctx.load_verify_locations(cafile=policy.ca_file)
    return ctx


def pinned_pool(target: Target, addresses: list[str], policy: FetchPolicy) -> httpcore.AsyncConnectionPool:
    """A one-connection pool that can dial only ``addresses`` (no second DNS lookup between
    check and connect); the URL keeps its name for Host, SNI and certificate checks."""
    ssl_ctx = _ssl_context(policy) if target.scheme == "https" else None
    return httpcore.AsyncConnectionPool(
        ssl_context=ssl_ctx,
        network_backend=_PinnedBackend(target.host, target.port, addresses),
        max_connections=1,
        retries=0,
        http2=False,
    )


def pinned_url(target: Target) -> httpcore.URL:
    return httpcore.URL(
        scheme=target.scheme.encode("ascii"),
        host=target.host.encode("ascii"),
        port=target.port,
        target=target.url.raw_path or b"/",
    )


def host_header(target: Target) -> bytes:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return (host if target.port == default else f"{host}:{target.port}").encode("ascii")


_REDIRECTS = {301, 302, 303, 307, 308}


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


async def _fetch_once(target: Target, addresses: list[str], policy: FetchPolicy) -> tuple[int, str | None, bytes]:
    """One GET; returns (status, Location, body). Body is read only for 2xx."""
    headers = [
        (b"Host", host_header(target)),
        (b"User-Agent", policy.user_agent.encode("ascii", "replace")),
        (b"Accept", b"image/*"),
        (b"Accept-Encoding", b"identity"),
        (b"Connection", b"close"),
    ]
    timeouts = {
        "connect": policy.connect_timeout_s,
        "read": policy.timeout_s,
        "write": policy.timeout_s,
        "pool": policy.timeout_s,
    }
    async with pinned_pool(target, addresses, policy) as pool:
        async with pool.stream(
            "GET", pinned_url(target), headers=headers, extensions={"timeout": timeouts}
        ) as response:
            fields = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
            status = response.status
            if status in _REDIRECTS:
                return status, fields.get("location"), b""
            if not (200 <= status < 300) or status in (204, 205, 206):
                raise ReferenceImageError(f"the image URL answered HTTP {status}", FETCH_FAILED)
            declared = _media_type(fields.get("content-type", ""))
            if (
                declared
                and declared not in policy.generic_content_types
                and declared not in policy.allowed_content_types
            ):
                raise ReferenceImageError(
                    f"the URL does not point to an image (Content-Type {declared})", IMAGE_LOAD_ERROR
                )
            length = fields.get("content-length")
            if length is not None and length.strip().isdigit() and int(length) > policy.max_bytes:
                raise ReferenceImageError(_too_large_msg(policy), FILE_TOO_LARGE)
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_stream():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise ReferenceImageError(_too_large_msg(policy), FILE_TOO_LARGE)
                chunks.append(chunk)
            return status, None, b"".join(chunks)


def _too_large_msg(policy: FetchPolicy) -> str:
    return f"the image file is larger than {policy.max_bytes} bytes"


async def _fetch_http(url: str, policy: FetchPolicy, resolver: Resolver | None) -> bytes:
    target, addresses = await vet_url(url, policy, resolver)
    seen: set[str] = set()
    for hop in range(policy.max_redirects + 1):
        if hop:
            addresses = await _vetted_addresses(target, policy, resolver)
        seen.add(str(target.url))
        status, location, body = await _fetch_once(target, addresses, policy)
        if location is None:
            if status in _REDIRECTS:
                raise ReferenceImageError(f"HTTP {status} redirect without a Location", FETCH_FAILED)
            return body
        if len(location) > policy.max_url_length:
            raise _refuse("the redirect URL is too long")
        try:
            next_url = target.url.join(location)
        except (httpx.InvalidURL, TypeError, ValueError, UnicodeError):
            raise _refuse("the redirect URL could not be parsed") from None
        target = _parse_target(next_url, policy)
        if str(target.url) in seen:
            raise ReferenceImageError("the image URL redirects in a loop", FETCH_FAILED)
    raise ReferenceImageError(f"more than {policy.max_redirects} redirects", FETCH_FAILED)


# ---------------------------------------------------------------------------
# data: URIs

_BASE64_STRIP = re.compile(rb"\s+")


def _decode_data_uri(url: str, policy: FetchPolicy) -> bytes:
    if len(url) > policy.max_data_uri_bytes:
        raise ReferenceImageError(f"the data URI is longer than {policy.max_data_uri_bytes} bytes", FILE_TOO_LARGE)
    header, sep, data = url[5:].partition(",")
    if not sep:
        raise ReferenceImageError("malformed data URI: no comma", IMAGE_LOAD_ERROR)
    params = [p.strip().lower() for p in header.split(";")]
    is_base64 = params[-1] == "base64" if params else False
    try:
        raw = data.encode("ascii")
    except UnicodeEncodeError:
        raise ReferenceImageError("malformed data URI: non-ASCII characters", IMAGE_LOAD_ERROR) from None
    if is_base64:
        if b"%" in raw:
            raw = urllib.parse.unquote_to_bytes(raw)
        raw = _BASE64_STRIP.sub(b"", raw)
        if b"-" in raw or b"_" in raw:
            raw = raw.translate(bytes.maketrans(b"-_", b"+/"))
        raw += b"=" * (-len(raw) % 4)
        try:
            decoded = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise ReferenceImageError("malformed data URI: invalid base64", IMAGE_LOAD_ERROR) from None
    else:
        decoded = urllib.parse.unquote_to_bytes(raw)
    if len(decoded) > policy.max_bytes:
        raise ReferenceImageError(_too_large_msg(policy), FILE_TOO_LARGE)
    if not decoded:
        raise ReferenceImageError("the data URI is empty", IMAGE_LOAD_ERROR)
    return decoded


# ---------------------------------------------------------------------------
# Public entry points


async def fetch_reference(
    url: str,
    policy: FetchPolicy,
    *,
    own_file: Callable[[str], bytes | None] | None = None,
    resolver: Resolver | None = None,
) -> bytes:
    """Return the bytes behind ``url`` or raise ReferenceImageError.

    ``own_file(url)`` is asked first for non-data URLs; bytes it returns are used
    as-is (files this server stored itself need no network). ``resolver(host,
    port)`` replaces DNS (tests); it returns IP strings, sync or async.
    """
    if not isinstance(url, str) or not url.strip():
        raise ReferenceImageError("the image URL is empty", URL_NOT_ALLOWED)
    url = url.strip()
    if url[:5].lower() == "data:":
        return _decode_data_uri(url, policy)
    if own_file is not None:
        own = own_file(url)
        if own is not None:
            if len(own) > policy.max_bytes:
                raise ReferenceImageError(_too_large_msg(policy), FILE_TOO_LARGE)
            return bytes(own)
    try:
        # wait_for rather than asyncio.timeout: the package still supports 3.10.
        return await asyncio.wait_for(_fetch_http(url, policy, resolver), policy.timeout_s)
    except ReferenceImageError:
        raise
    except (TimeoutError, asyncio.TimeoutError, httpcore.TimeoutException):
        raise ReferenceImageError(f"fetching the image took longer than {policy.timeout_s} s", TIMEOUT) from None
    except ssl.SSLError:
        raise ReferenceImageError("TLS handshake with the image host failed", FETCH_FAILED) from None
    except (httpcore.ConnectError, OSError):
        raise ReferenceImageError("could not connect to the image host", FETCH_FAILED) from None
    except (httpcore.ProtocolError, httpcore.NetworkError):
        raise ReferenceImageError("the image host sent an invalid HTTP response", FETCH_FAILED) from None
    except httpcore.UnsupportedProtocol:
        raise _refuse("unsupported URL") from None
    except Exception:  # noqa: BLE001 - callers rely on ReferenceImageError only
        log.exception("unexpected error fetching a reference image")
        raise ReferenceImageError("the image could not be fetched", FETCH_FAILED) from None


# Magic bytes -> (PIL format name, content type).
def _sniff(data: bytes) -> tuple[str, str] | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG", "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG", "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF", "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP", "image/webp"
    if data[:2] == b"BM" and len(data) >= 26:
        return "BMP", "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF", "image/tiff"
    return None


# warnings.catch_warnings mutates process-wide state; serialise our own use of it.
_WARNINGS_LOCK = threading.Lock()


def decode_image(data: bytes, policy: FetchPolicy) -> Image.Image:
    """Decode ``data`` into a loaded PIL image (mode untouched) or raise ReferenceImageError."""
    if not data:
        raise ReferenceImageError("the image file is empty", IMAGE_LOAD_ERROR)
    if len(data) > policy.max_bytes:
        raise ReferenceImageError(_too_large_msg(policy), FILE_TOO_LARGE)
    sniffed = _sniff(data)
    if sniffed is None:
        raise ReferenceImageError(
            "the file is not a supported image (JPEG, PNG, WebP, GIF, BMP, TIFF)", IMAGE_LOAD_ERROR
        )
    pil_format, content_type = sniffed
    if content_type not in policy.allowed_content_types:
        raise ReferenceImageError(f"{content_type} images are not accepted", IMAGE_LOAD_ERROR)
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Only the sniffed plugin may parse it: no fallback to other decoders.
            image = Image.open(io.BytesIO(data), formats=[pil_format])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ReferenceImageError(f"the image has more than {policy.max_pixels} pixels", IMAGE_TOO_LARGE) from None
    except Exception:  # noqa: BLE001 - any parser failure means an unusable file
        raise ReferenceImageError("the image file is corrupt or unreadable", IMAGE_LOAD_ERROR) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ReferenceImageError("the image has no pixels", IMAGE_LOAD_ERROR)
    if width > policy.max_side or height > policy.max_side:
        raise ReferenceImageError(f"the image is larger than {policy.max_side} pixels on a side", IMAGE_TOO_LARGE)
    if width * height > policy.max_pixels:
        raise ReferenceImageError(f"the image has more than {policy.max_pixels} pixels", IMAGE_TOO_LARGE)
    if min(width, height) < policy.min_side:
        raise ReferenceImageError(
            f"the image is too small ({width}x{height} pixels) to hold a recognisable face; "
            f"it needs at least {policy.min_side} pixels on each side", IMAGE_TOO_SMALL)
    try:
        image.load()
    except MemoryError:
        raise ReferenceImageError("the image is too large to decode", IMAGE_TOO_LARGE) from None
    except Exception:  # noqa: BLE001 - truncated/corrupt data raises many types
        raise ReferenceImageError("the image file is truncated or corrupt", IMAGE_LOAD_ERROR) from None
    return image


async def load_reference_image(
    url: str,
    policy: FetchPolicy,
    *,
    own_file: Callable[[str], bytes | None] | None = None,
    resolver: Resolver | None = None,
) -> Image.Image:
    """``fetch_reference`` then ``decode_image`` (decoding off the event loop)."""
    data = await fetch_reference(url, policy, own_file=own_file, resolver=resolver)
    return await asyncio.to_thread(decode_image, data, policy)
