"""Sans-IO checks of a WebSocket opening handshake (RFC 6455 §4.2.1) and Zilla's
subprotocol selection; the heads zillatw writes itself (a server's 101, a client's upgrade
request) and the check of an upstream's answer (§4.1). Zilla's runtime answers most bad
handshakes with 404; zillatw answers as the RFC says: 400 with the reason, 426 with
`Sec-WebSocket-Version: 13`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from zillatw.wire.http1 import HttpError, Request, Response

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_LIST_SPLIT = re.compile(r"\s*,\s*")


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode("ascii")


def _tokens(value: str | None) -> list[str]:
    return [t.strip().lower() for t in (value or "").split(",")]


def check_upgrade(request: Request) -> None:
    """Raise HttpError naming the client's mistake if this is not a valid upgrade request."""
    headers = request.headers
    if "upgrade" not in headers:
        raise HttpError(400, "not a WebSocket request: the Upgrade header is missing")
    if "websocket" not in _tokens(headers["upgrade"]):
        raise HttpError(400, f"Upgrade: {headers['upgrade']} is not websocket")
    if request.method != "GET":
        raise HttpError(400, f"a WebSocket handshake must use GET, not {request.method}")
    if request.version < (1, 1):
        raise HttpError(400, "a WebSocket handshake needs HTTP/1.1 or later")
    if "host" not in headers:
        raise HttpError(400, "the Host header is missing")
    if "upgrade" not in _tokens(headers.get("connection")):
        raise HttpError(400, "the Connection header must include 'upgrade'")
    if "content-length" in headers or "transfer-encoding" in headers:
        raise HttpError(400, "an upgrade request must not have a body")
    if headers.get("sec-websocket-version") != "13":
        got = headers.get("sec-websocket-version")
        # RFC 9110 §15.5.22: a 426 names the protocol to upgrade to.
        raise HttpError(426, "Sec-WebSocket-Version 13 is required" + (f", got {got}" if got else ""),
                        (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))
    key = headers.get("sec-websocket-key")
    if key is None:
        raise HttpError(400, "the Sec-WebSocket-Key header is missing")
    try:
        decoded = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        decoded = b""
    if len(decoded) != 16:
        raise HttpError(400, "Sec-WebSocket-Key must be 16 bytes in base64")
    for name in HANDSHAKE_HEADERS:  # handed on to the WebSocket layer: tokens, ASCII only
        if name in headers and not _VISIBLE_ASCII.match(headers[name]):
            raise HttpError(400, f"the {name} header must be ASCII")


# The headers the WebSocket layer acts on. Each is a list of ASCII tokens (RFC 6455 §4.1,
# §11.3); the subprotocol and extension values are echoed in our 101.
HANDSHAKE_HEADERS = ("host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                     "sec-websocket-protocol", "sec-websocket-extensions")
_VISIBLE_ASCII = re.compile(r"^[\x20-\x7e]*$")


def offered_protocols(header: str | None) -> list[str]:
    """Subprotocols a client offers, in its order (Zilla splits on `\\s*,\\s*`)."""
    if header is None or not header.strip():
        return []
    return [p for p in _LIST_SPLIT.split(header.strip()) if p]


Route = TypeVar("Route")


def select_route(offered: Sequence[str], resolve: Callable[[str | None], tuple[int, Route] | None]
                 ) -> tuple[Route, str | None] | None:
    """Zilla's rule: resolve a route per offered protocol; the lowest route index wins, and
    on a tie the earlier-offered protocol. With nothing offered, resolve once with None.
    `resolve(protocol)` returns (route index, route) of the first matching route or None."""
    if not offered:
        found = resolve(None)
        return (found[1], None) if found else None
    best: tuple[int, Route, str] | None = None
    for protocol in offered:
        found = resolve(protocol)
        if found and (best is None or found[0] < best[0]):
            best = (found[0], found[1], protocol)
    return (best[1], best[2]) if best else None


# ---------------------------------------------------------------------------- our own heads

def _visible(name: str, value: str) -> str:
    if not _VISIBLE_ASCII.match(value):
        raise HttpError(400, f"the {name} header must be ASCII")
    return value


def server_response(key: str, protocol: str | None, extensions: str | None) -> bytes:
    """The 101 a ws server writes (RFC 6455 §4.2.2): no Server header, nothing else."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept_key(key)}"]
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {_visible('sec-websocket-protocol', protocol)}")
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def new_key() -> str:
    """A client's Sec-WebSocket-Key: 16 random bytes in base64 (RFC 6455 §4.1)."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def client_request(path: str, authority: str, key: str, protocols: Sequence[str] = (),
                   extensions: str | None = None, headers: Mapping[str, str] | None = None) -> bytes:
    """The upgrade request a ws client writes upstream (RFC 6455 §4.1): `headers` are the
    http client's extra ones (its overrides); no User-Agent naming a library."""
    lines = [f"GET {_visible(':path', path)} HTTP/1.1", f"Host: {_visible(':authority', authority)}",
             "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if protocols:
        lines.append(f"Sec-WebSocket-Protocol: {_visible('sec-websocket-protocol', ', '.join(protocols))}")
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {_visible(name, value)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class HandshakeRefused(Exception):
    """The upstream did not accept our upgrade as RFC 6455 §4.1 requires; the text says why."""


def check_response(response: Response, key: str, offered: Sequence[str]) -> str | None:
    """Check an upstream's answer to our upgrade; the subprotocol it chose (one of
    `offered`, or None). Its Sec-WebSocket-Extensions are the caller's to check."""
    if response.status != 101:
        raise HandshakeRefused(f"it answered {response.status} {response.reason}".rstrip())
    headers = response.headers
    if "websocket" not in _tokens(headers.get("upgrade")):
        raise HandshakeRefused("its 101 has no 'Upgrade: websocket'")
    if "upgrade" not in _tokens(headers.get("connection")):
        raise HandshakeRefused("its 101 has no 'Connection: Upgrade'")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise HandshakeRefused("its Sec-WebSocket-Accept does not match our key")
    chosen = headers.get("sec-websocket-protocol")
    if chosen is not None and chosen not in offered:
        raise HandshakeRefused(f"it selected subprotocol {chosen!r}, offered {list(offered)!r}")
    return chosen
