"""Test support: plain HTTP clients and upstreams, and clients that retry in a thread."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from zillatw.test.support import (
    raw_exchange,
    split_response,
)
from zillatw.wire.http1body import LAST_CHUNK, chunk


# from test_health
@defer.inlineCallbacks
def probe(port: int, path: str, method: str = "GET") -> Any:
    """(status code, headers, body) of one request, as a load balancer's probe sends it."""
    data = yield raw_exchange(port, f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    status, headers, body = split_response(data)
    return int(status.split()[1]), headers, body


# from test_admission_ws
def in_thread(script: Any) -> defer.Deferred:
    """Run an async client script on its own asyncio loop in a thread (the reactor runs here)."""
    return threads.deferToThread(asyncio.run, script)


# from test_admission_ws
async def attempt(url: str, **kwargs: Any) -> Any:
    """A `websockets` connection, or what refused it."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus
    try:
        return await connect(url, open_timeout=10, **kwargs)
    except InvalidStatus as e:
        response = e.response
        return Refused(response.status_code, response.headers.get("Retry-After"), bytes(response.body))


# from test_admission_ws
@dataclass
class Refused:
    status: int
    retry_after: str | None
    body: bytes


# from test_http_plain
_STATUS = re.compile(r"^HTTP/1\.[01] (\d{3})")


def request(method: str = "GET", path: str = "/", body: bytes | None = None, headers: dict[str, str] | None = None,
            version: str = "HTTP/1.1", host: str | None = "localhost") -> bytes:
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None and not any(n.lower() == "transfer-encoding" for n in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


# from test_http_plain
def connect_http(port: int) -> defer.Deferred:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), HttpClientConn())


# from test_http_plain
class HttpClientConn(Protocol):
    """A raw client connection that collects complete responses."""

    transport: Any

    def __init__(self) -> None:
        self.data = b""
        self.raw = b""  # everything received
        self.replies: list[Reply] = []
        self.closed: defer.Deferred = defer.Deferred()
        self.is_closed = False
        self.head_only = False
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self.data += data
        replies, self.data = parse_replies(self.data, self.head_only)
        self.replies += replies
        self._check()

    def _check(self) -> None:
        for item in list(self._waiting):
            if len(self.replies) >= item[0]:
                self._waiting.remove(item)
                item[1].callback(self.replies[:item[0]])

    def responses(self, count: int) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((count, d))
        self._check()
        return d

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.is_closed = True
        for _, d in self._waiting:
            d.errback(ConnectionError(f"closed with {len(self.replies)} responses and {self.data[:200]!r} left"))
        self._waiting = []
        self.closed.callback(None)


# from test_http_plain
def parse_replies(data: bytes, head_only: bool = False) -> tuple[list[Reply], bytes]:
    """The complete responses at the start of `data` (Content-Length or chunked bodies, or
    none after HEAD/204/304), and what is left."""
    replies: list[Reply] = []
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return replies, data
        head = data[:end].decode("latin-1")
        lines = head.split("\r\n")
        match = _STATUS.match(lines[0])
        assert match, lines[0]
        status = int(match.group(1))
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        rest = data[end + 4:]
        if status == 100:
            data = rest
            continue
        if head_only or status in (204, 304):
            body, data = b"", rest
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body_parts, at = [], 0
            while True:
                line_end = rest.find(b"\r\n", at)
                if line_end < 0:
                    return replies, data
                size = int(rest[at:line_end].split(b";")[0], 16)
                if size == 0:
                    trailer_end = rest.find(b"\r\n\r\n", line_end - 2 if line_end >= 2 else 0)
                    if rest[line_end:line_end + 4] == b"\r\n\r\n":
                        at = line_end + 4
                        break
                    if trailer_end < 0:
                        return replies, data
                    at = trailer_end + 4
                    break
                if len(rest) < line_end + 2 + size + 2:
                    return replies, data
                body_parts.append(rest[line_end + 2:line_end + 2 + size])
                at = line_end + 2 + size + 2
            body, data = b"".join(body_parts), rest[at:]
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if len(rest) < length:
                return replies, data
            body, data = rest[:length], rest[length:]
        else:
            return replies, data  # until close: the caller reads .closed
        replies.append(Reply(status, headers, body, head))


# from test_http_plain
class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, head: str):
        self.status, self.headers, self.body, self.head = status, headers, body, head


# from test_http_plain
def plain_chain(http_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """tcp (port 0) -> http: upgrades to ws -> echo, plain requests to echo."""
    http: dict[str, Any] = {"type": "http", "kind": "server",
                            "routes": [{"when": [{"headers": {"upgrade": "websocket"}}], "exit": "ws0"},
                                       {"exit": "echo0"}]}
    if http_options:
        http["options"] = http_options
    return {"name": "test", "bindings": {
        "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 0}, "exit": "http0"},
        "http0": http,
        "ws0": {"type": "ws", "kind": "server", "exit": "echo0"},
        "echo0": {"type": "echo", "kind": "server"},
    }, "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}


# from test_http_proxy
PAUSE = 0.5  # seconds a slow reader stops reading


# from test_http_proxy
class Counting(Protocol):
    """A client that counts the response's bytes without keeping them; after `pause_after`
    bytes it stops reading for PAUSE seconds (a slow client), then `paused` fires."""

    transport: Any

    def __init__(self, pause_after: int | None) -> None:
        self.head = b""
        self.received = 0
        self.pause_after: int | None = pause_after
        self.paused: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        if len(self.head) < 200:
            self.head += data[:200]
        self.received += len(data)
        if self.pause_after is not None and self.received >= self.pause_after:
            self.pause_after = None
            self.transport.pauseProducing()
            reactor.callLater(PAUSE, self.resume)

    def resume(self) -> None:
        self.paused.callback(self.received)
        self.transport.resumeProducing()

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


# from test_http_proxy
@implementer(IPushProducer)
class Sender:
    """Writes `size` bytes of request body (chunked or sized by the head already sent),
    generated and discarded, pausing as the transport asks."""

    def __init__(self, transport: Any, size: int, chunked: bool):
        self.transport, self.left, self.chunked = transport, size, chunked
        self.paused = False
        self.piece = b"q" * 65536
        self.done: defer.Deferred = defer.Deferred()

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        reactor.callLater(0, self.resumeProducing)

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            piece = self.piece if self.left >= len(self.piece) else self.piece[:self.left]
            self.left -= len(piece)
            self.transport.writeSequence(chunk(piece) if self.chunked else [piece])
        if self.left == 0:
            self.left = -1
            self.transport.unregisterProducer()
            if self.chunked:
                self.transport.write(LAST_CHUNK)
            self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused, self.left = True, -1
