"""Images in requests: `data:` URLs (base64) and http(s) URLs fetched with httpx.

Fetching has connect and read timeouts, a byte cap, an image content-type check and at most a
few redirects. Unless private URLs are allowed, every host is resolved first and refused if any
address is private, loopback, link-local or otherwise not global; this is checked again on every
redirect. Local paths and other schemes are refused. Decoded images pass the CLI's pixel guard.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from dsocr.runtime.errors import InputError
from dsocr.runtime.preprocess import load_image
from dsocr.sanic_app.errors import APIError


@dataclass
class FetchPolicy:
    allow_private: bool = False
    max_bytes: int = 20 << 20
    max_redirects: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 15.0
    max_pixels: int = 64_000_000


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param, "invalid_image")


def decode_data_url(url: str, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or ";base64" not in head:
        raise _bad("data URLs must be base64 encoded (data:image/...;base64,...)", param)
    if not head[5:].startswith("image/"):
        raise _bad(f"data URL type {head[5:].split(';')[0]!r} is not an image", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the data URL is not valid base64", param) from None


async def _check_host(host: str, port: int, policy: FetchPolicy, param: str) -> None:
    if policy.allow_private:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise _bad(f"cannot resolve {host!r}", param) from None
    for *_, addr in infos:
        ip = ipaddress.ip_address(addr[0])
        if not ip.is_global or ip.is_multicast:
            raise _bad(f"{host} resolves to a non-public address ({ip}); image URLs must be public", param)


async def fetch_url(url: str, policy: FetchPolicy, param: str) -> bytes:
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        for _ in range(policy.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise _bad("image URLs must be http(s) or data: URLs", param)
            await _check_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), policy, param)
            try:
                async with client.stream("GET", url) as r:
                    if r.is_redirect:
                        url = urljoin(url, r.headers.get("location", ""))
                        continue
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
            except httpx.HTTPError as e:
                raise _bad(f"fetching the image failed ({type(e).__name__})", param) from None
    raise _bad(f"more than {policy.max_redirects} redirects", param)


async def load_request_image(url: str, policy: FetchPolicy, param: str):
    """An image reference from a request -> RGB PIL image (APIError 400 when unusable)."""
    if not isinstance(url, str) or not url:
        raise _bad("image_url must be a non-empty string", param)
    if url.startswith("data:"):
        data = decode_data_url(url, param)
    elif url.split(":", 1)[0].lower() in ("http", "https"):
        data = await fetch_url(url, policy, param)
    else:
        raise _bad("local paths and other schemes are not accepted: use an http(s) or data: URL", param)
    try:
        return await asyncio.to_thread(load_image, io.BytesIO(data), policy.max_pixels, param)
    except InputError as e:
        raise _bad(str(e), param) from None
