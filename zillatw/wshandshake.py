"""Sans-IO checks of a WebSocket opening handshake (RFC 6455 §4.2.1) and Zilla's
subprotocol selection. Zilla's runtime answers most bad handshakes with 404; zillatw answers
as the RFC says: 400 with the reason, 426 with `Sec-WebSocket-Version: 13`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from zillatw.http1 import HttpError, Request

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
# §11.3), and only these are handed on: what that layer reads is what check_upgrade read.
HANDSHAKE_HEADERS = ("host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
                     "sec-websocket-protocol", "sec-websocket-extensions")
_VISIBLE_ASCII = re.compile(r"^[\x20-\x7e]*$")


def handshake_head(request: Request) -> bytes:
    """The request head the WebSocket layer is given: rendered anew from the parsed request
    (CRLF line ends, one line per header), never the client's own bytes, so it cannot find a
    header, a line end or a second request that zillatw's parser did not."""
    lines = [f"GET {request.target} HTTP/1.1"]  # check_upgrade made sure these are ASCII
    lines += [f"{name}: {request.headers[name]}" for name in HANDSHAKE_HEADERS if name in request.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


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
