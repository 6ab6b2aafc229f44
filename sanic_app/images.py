"""Images in requests: `data:` URLs (base64) and http(s) URLs fetched with httpx.

Fetching has connect and read timeouts, an overall deadline per URL and per request (a server
trickling bytes restarts a read timeout forever), a byte cap, an image content-type check and at
most a few redirects. Unless private URLs are allowed, every host is resolved first and refused if
any address is not public, an IPv4 address embedded in an IPv6 one included; this is checked again
on every redirect. Local paths and other schemes are refused.

Each image is decoded once at admission, one at a time, to refuse unreadable ones (and the pixel
guard) with a 400 before any stream starts and to learn its size; the pixels are dropped at once.
A queued job keeps only the encoded bytes, which the engine worker decodes right before use, so
jobs waiting in the queue hold no pixels.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import socket
from concurrent.futures import Executor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from dsocr.runtime.errors import InputError
from dsocr.runtime.preprocess import load_image
from dsocr.sanic_app.errors import APIError


@dataclass
class FetchPolicy:
    allow_private: bool
    max_pixels: int
    fetch_timeout: float                  # seconds for one URL, redirects included
    request_fetch_timeout: float          # seconds for all of one request's URLs
    max_bytes: int = 20 << 20
    max_redirects: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 15.0


@dataclass
class EncodedImage:
    """A request's image as its queued job holds it: the encoded bytes and, known at admission, the
    size after EXIF orientation (what the context check needs)."""
    data: bytes
    size: tuple[int, int]
    param: str
    max_pixels: int

    def decode(self) -> Image.Image:
        try:
            return load_image(io.BytesIO(self.data), self.max_pixels, self.param)
        except InputError as e:
            raise _bad(str(e), self.param) from None


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param, "invalid_image")


def decode_data_url(url: str, param: str) -> bytes:
    """RFC 2397: the scheme, the media type and the base64 token are case-insensitive."""
    head, sep, payload = url.partition(",")
    head = head.lower()
    if not sep or ";base64" not in head:
        raise _bad("data URLs must be base64 encoded (data:image/...;base64,...)", param)
    if not head[5:].startswith("image/"):
        raise _bad(f"data URL type {head[5:].split(';')[0]!r} is not an image", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the data URL is not valid base64", param) from None


# IPv6 ranges whose last 32 bits are an IPv4 address the traffic reaches: IPv4-compatible (::1 and ::
# included), SIIT's IPv4-translated and the well-known NAT64 prefix. (IPv4-mapped, 6to4 and Teredo
# have their own ipaddress properties.)
IPV4_IN_LAST_32_BITS = [ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")]
# Local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the operator's prefix length.
LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (Teredo carries its server's and its client's)."""
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return list(ip.teredo)
    if any(ip in net for net in IPV4_IN_LAST_32_BITS):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally reachable unicast; an IPv6 address that embeds IPv4 ones is as public as they are."""
    if ip.version == 6:
        if ip in LOCAL_NAT64:
            return False
        inner = embedded_ipv4(ip)
        if inner:
            return all(is_public_address(a) for a in inner)
    return ip.is_global and not ip.is_multicast


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [addr[0] for *_, addr in infos]


async def _checked_address(host: str, port: int, policy: FetchPolicy, param: str) -> str | None:
    """The address to connect to, every address the host resolves to having been checked (None when
    private URLs are allowed: httpx resolves as usual)."""
    if policy.allow_private:
        return None
    try:
        addresses = await resolve(host, port)
    except (socket.gaierror, UnicodeError):      # UnicodeError: a host IDNA cannot encode (an empty label)
        raise _bad(f"cannot resolve {host!r}", param) from None
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if not is_public_address(ip):
            raise _bad(f"{host} resolves to a non-public address ({ip}); image URLs must be public", param)
    if not addresses:
        raise _bad(f"cannot resolve {host!r}", param)
    return addresses[0]


def _host_port(url: str, param: str) -> tuple[str, int]:
    try:
        httpx.URL(url)
        parts = urlsplit(url)
        port = parts.port
    except (httpx.InvalidURL, ValueError):       # e.g. two ports, an unclosed [ in the host
        raise _bad(f"{url[:100]!r} is not a valid URL", param) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _bad("image URLs must be http(s) or data: URLs", param)
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


async def _fetch_once(client: httpx.AsyncClient, url: str, policy: FetchPolicy, param: str) -> bytes | str:
    """The image's bytes, or the URL a redirect points to."""
    host, port = _host_port(url, param)
    address = await _checked_address(host, port, policy, param)
    try:
        request = client.build_request("GET", url)
        if address is not None:
            # connect to the address just checked: a second DNS answer (rebinding) must not pick another.
            # The Host header keeps the name; TLS checks the certificate against it (SNI).
            request.url = request.url.copy_with(host=address)
            request.extensions["sni_hostname"] = host
        async with contextlib.aclosing(await client.send(request, stream=True)) as r:
            if r.is_redirect:
                return urljoin(url, r.headers.get("location", ""))
            if r.status_code != 200:
                raise _bad(f"fetching the image failed with HTTP {r.status_code}", param)
            ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
            if not ctype.startswith("image/"):
                raise _bad(f"the URL returned {ctype or 'no content type'}, not an image", param)
            if int(r.headers.get("content-length", "0") or 0) > policy.max_bytes:
                raise _bad(f"the image is over {policy.max_bytes >> 20} MB", param)
            body = bytearray()
            async for chunk in r.aiter_bytes():
                body += chunk
                if len(body) > policy.max_bytes:
                    raise _bad(f"the image is over {policy.max_bytes >> 20} MB", param)
            return bytes(body)
    except httpx.TimeoutException:
        raise _bad("fetching the image timed out", param) from None
    except httpx.InvalidURL:                     # httpx parses a redirect's Location (the URL itself is valid)
        raise _bad("the image URL redirects to something that is not an http(s) URL", param) from None
    except (httpx.HTTPError, ValueError) as e:   # ValueError: e.g. a Content-Length that is not a number
        raise _bad(f"fetching the image failed ({type(e).__name__})", param) from None


async def fetch_url(url: str, policy: FetchPolicy, param: str, request_deadline: float) -> bytes:
    """`request_deadline`: the event loop's time by which all of the request's fetches must be done."""
    loop = asyncio.get_running_loop()
    own_deadline = loop.time() + policy.fetch_timeout
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    try:
        async with asyncio.timeout_at(min(own_deadline, request_deadline)):
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
                for _ in range(policy.max_redirects + 1):
                    got = await _fetch_once(client, url, policy, param)
                    if isinstance(got, bytes):
                        return got
                    url = got
    except TimeoutError:
        if own_deadline <= request_deadline:
            raise _bad(f"fetching the image took over {policy.fetch_timeout:g} s", param) from None
        raise _bad(f"fetching the request's images took over {policy.request_fetch_timeout:g} s", param) from None
    raise _bad(f"more than {policy.max_redirects} redirects", param)


async def image_bytes(url, policy: FetchPolicy, param: str, request_deadline: float) -> bytes:
    if not isinstance(url, str) or not url:
        raise _bad("image_url must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return decode_data_url(url, param)
    if scheme in ("http", "https"):
        return await fetch_url(url, policy, param, request_deadline)
    raise _bad("local paths and other schemes are not accepted: use an http(s) or data: URL", param)


async def load_request_images(refs: list[tuple[str, str]], policy: FetchPolicy,
                              decoder: Executor) -> list[EncodedImage]:
    """A request's image references ((url, param) pairs) -> checked encoded images (APIError 400 when
    unusable). `decoder` runs the admission decodes: one worker there bounds them to one at a time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + policy.request_fetch_timeout
    out = []
    for url, param in refs:
        image = EncodedImage(await image_bytes(url, policy, param, deadline), (0, 0), param, policy.max_pixels)
        image.size = await loop.run_in_executor(decoder, lambda: image.decode().size)
        out.append(image)
    return out
