"""Images and PDFs in requests: `data:` URLs (base64) and http(s) URLs fetched with httpx.

Fetching has connect and read timeouts, an overall deadline per URL and per request (a server
trickling bytes restarts a read timeout forever), a byte cap, an image-or-PDF content-type check and at
most a few redirects. Unless private URLs are allowed, every host is resolved first and refused if
any address is not public, an IPv4 address embedded in an IPv6 one included; this is checked again
on every redirect. Local paths and other schemes are refused.

Each image is decoded once at admission, one at a time, to refuse unreadable ones (and the pixel
guard) with a 400 before any stream starts and to learn its size; the pixels are dropped at once.
A queued job keeps only the encoded bytes, which the engine worker decodes right before use, so
jobs waiting in the queue hold no pixels.

A PDF (the request's only image-like input) becomes one OCR page per PDF page: each is rendered at
admission, checked against the pixel limit and kept as lossless PNG bytes, so queued PDF pages are
encoded bytes like any image and PDFium never runs outside admission.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import socket
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image

from dsocr.cli.config import Server
from dsocr.runtime.errors import InputError
from dsocr.runtime.pdf import is_pdf_data, open_pdf, parse_pages, render_document
from dsocr.runtime.preprocess import load_image
from dsocr.sanic_app.errors import APIError

PDF_TYPE = "application/pdf"
PDFIUM = threading.Lock()         # PDFium is not thread-safe: one PDF at a time, whatever runs the admissions


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
    max_pdf_pages: int = Server.model_fields["max_pdf_pages"].default


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


def _bad(message: str, param: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param, code)


def accepted_type(media_type: str) -> bool:
    return media_type.startswith("image/") or media_type == PDF_TYPE


def decode_data_url(url: str, param: str) -> bytes:
    """RFC 2397: the scheme, the media type and the base64 token are case-insensitive."""
    head, sep, payload = url.partition(",")
    head = head.lower()
    if not sep or ";base64" not in head:
        raise _bad("data URLs must be base64 encoded (data:image/...;base64,... or data:application/pdf;base64,...)",
                   param)
    media_type = head[5:].split(";")[0]
    if not accepted_type(media_type):
        raise _bad(f"data URL type {media_type!r} is not an image or a PDF", param)
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
    """The image's (or PDF's) bytes, or the URL a redirect points to."""
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
            if not accepted_type(ctype):
                raise _bad(f"the URL returned {ctype or 'no content type'}, not an image or a PDF", param)
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
    """The bytes of an image or PDF reference."""
    if not isinstance(url, str) or not url:
        raise _bad("image_url must be a non-empty string", param)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return decode_data_url(url, param)
    if scheme in ("http", "https"):
        return await fetch_url(url, policy, param, request_deadline)
    raise _bad("local paths and other schemes are not accepted: use an http(s) or data: URL", param)


def pdf_pages(data: bytes, param: str, policy: FetchPolicy) -> list[EncodedImage]:
    """Each page of a PDF rendered, checked against the pixel limit and kept as PNG bytes (lossless: the
    page's pixels are the CLI's); more pages than policy.max_pdf_pages is refused before any renders."""
    try:
        with PDFIUM:
            doc = open_pdf(data, param)
            try:
                if len(doc) > policy.max_pdf_pages:
                    raise _bad(f"the PDF has {len(doc)} pages; this server takes at most {policy.max_pdf_pages} "
                               f"(its max_pdf_pages setting): send fewer pages", param, "too_many_pages")
                rendered = render_document(doc, param, parse_pages(None, len(doc)), policy.max_pixels)
                pages = []
                for _, page in rendered:
                    png = io.BytesIO()
                    page.save(png, "PNG", compress_level=1)      # fast; PNG is lossless at any level
                    pages.append(EncodedImage(png.getvalue(), page.size, param, policy.max_pixels))
                return pages
            finally:
                doc.close()
    except InputError as e:
        raise _bad(str(e), param, "invalid_file") from None


async def load_request_pages(refs: list[tuple[str, str]], policy: FetchPolicy,
                             decoder: Executor) -> list[list[EncodedImage]]:
    """A request's image references ((url, param) pairs) -> its OCR pages, each the checked encoded images
    of one sequence: one page holding every image in order, or for a PDF (which must come alone) one page
    per PDF page. APIError 400 when unusable. `decoder` runs the admission decodes and PDF renders: one
    worker there bounds them to one at a time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + policy.request_fetch_timeout
    loaded = [(await image_bytes(url, policy, param, deadline), param) for url, param in refs]
    pdfs = [param for data, param in loaded if is_pdf_data(data)]      # by content, as `dsocr ocr` tells them
    if pdfs and len(loaded) > 1:
        raise _bad("a PDF must be the request's only image or file (each of its pages is OCR'd on its own)", pdfs[0],
                   "invalid_file")
    if pdfs:
        data, param = loaded[0]
        return [[page] for page in await loop.run_in_executor(decoder, pdf_pages, data, param, policy)]
    images = []
    for data, param in loaded:
        image = EncodedImage(data, (0, 0), param, policy.max_pixels)
        image.size = await loop.run_in_executor(decoder, lambda: image.decode().size)
        images.append(image)
    return [images]
