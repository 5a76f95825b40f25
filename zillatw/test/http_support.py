"""Test support: plain HTTP clients and upstreams, and clients that retry in a thread."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from zillatw.test.support import (
    raw_exchange,
    split_response,
    start_gateway,
)
from zillatw.wire.http1 import RequestHeadParser
from zillatw.wire.http1body import LAST_CHUNK, BodyDecoder, chunk, request_framing


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


class UpstreamFactory(Factory):  # type: ignore[type-arg]
    """What the upstream saw: its connections, and each request's head and body size."""

    def __init__(self) -> None:
        self.connections: list[HttpUpstream] = []
        self.requests: list[dict[str, Any]] = []
        self.lost = 0
        self.first_body_bytes: defer.Deferred = defer.Deferred()
        self.generators: list[Generated] = []
        self.pause_after: int | None = None  # body bytes after which reading pauses for PAUSE s
        self.paused: defer.Deferred = defer.Deferred()  # fires (with the sender) when reading resumes

    def buildProtocol(self, addr: Any) -> Any:
        protocol = HttpUpstream()
        protocol.factory = self
        self.connections.append(protocol)
        return protocol


@implementer(IPushProducer)
class Generated:
    """`size` bytes of response body, written as fast as the connection takes them."""

    def __init__(self, transport: Any, size: int, chunked: bool, done: Any):
        self.transport, self.left, self.chunked, self.done = transport, size, chunked, done
        self.paused = False
        self.piece = b"z" * 65536
        self.written = 0

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            piece = self.piece if self.left >= len(self.piece) else self.piece[:self.left]
            self.left -= len(piece)
            self.written += len(piece)
            if self.chunked:
                self.transport.writeSequence(chunk(piece))
            else:
                self.transport.write(piece)
        if self.left == 0 and not self.paused:
            self.left = -1
            self.transport.unregisterProducer()
            if self.chunked:
                self.transport.write(LAST_CHUNK)
            self.done()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused, self.left = True, -1


class HttpUpstream(Protocol):
    """A small HTTP/1.1 origin. By path:
    /echo      the request's body back, same framing (Content-Length or chunked), streamed;
    /count     read the body, answer its size (JSON, with the headers it got);
    /big?N     N bytes of body (chunked when ?chunked is in the path);
    /drop-next answer, then close as the next request on this connection arrives;
    /hang      never answer;    /garbage  not HTTP;    /close  answer with Connection: close;
    /early     answer at once (200, "early"), before reading the body;
    any other  a small text/html page naming the path."""

    factory: UpstreamFactory
    transport: Any
    current: Any

    def connectionMade(self) -> None:
        self.parser = RequestHeadParser()
        self.decoder: BodyDecoder | None = None
        self.current: dict[str, Any] | None = None
        self.drop_next = False

    def dataReceived(self, data: bytes) -> None:
        while data:
            if self.decoder is None:
                head = self.parser.feed(data)
                if head is None:
                    return
                data, self.parser = self.parser.rest, RequestHeadParser()
                kind, length = request_framing(head.headers)
                self.decoder = BodyDecoder(kind, length)
                self.current = {"method": head.method, "path": head.target, "headers": head.headers, "size": 0}
                self.factory.requests.append(self.current)
                if self.drop_next:  # closed as the request came: a keep-alive race
                    self.transport.loseConnection()
                    return
                self.start_response(head)
                if self.decoder.done:
                    self.body_done()
                    continue
            pieces = self.decoder.feed(data)
            for piece in pieces:
                if not self.factory.first_body_bytes.called:
                    self.factory.first_body_bytes.callback(None)
                self.current["size"] += len(piece)
                pause_after = self.factory.pause_after
                if pause_after is not None and self.current["size"] >= pause_after:
                    self.factory.pause_after = None
                    self.transport.pauseProducing()
                    reactor.callLater(PAUSE, self.resume_reading)
                if self.current["path"] == "/echo":
                    self.transport.writeSequence(chunk(piece) if self.echo_chunked else [piece])
            if not self.decoder.done:
                return
            data = self.decoder.rest
            self.body_done()

    def start_response(self, head: Any) -> None:
        path = head.target
        if path == "/early":  # the whole answer at the head, whatever the body still to come
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
        elif path == "/echo":
            self.echo_chunked = "content-length" not in head.headers
            framing = "transfer-encoding: chunked" if self.echo_chunked \
                else f"content-length: {head.headers['content-length']}"
            self.transport.write(f"HTTP/1.1 200 OK\r\ncontent-type: {head.headers.get('content-type', 'x/y')}\r\n"
                                 f"{framing}\r\nkeep-alive: timeout=5\r\n\r\n".encode())

    def body_done(self) -> None:
        current, self.decoder = self.current, None
        path = current["path"]
        if path == "/early":
            pass
        elif path == "/echo":
            if self.echo_chunked:
                self.transport.write(LAST_CHUNK)
        elif path == "/count":
            body = json.dumps({"size": current["size"], "headers": current["headers"]}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: x-hop\r\n"
                                 b"x-hop: gone\r\nx-kept: yes\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        elif path.startswith("/big"):
            size = int(path.split("?")[1].split("&")[0])
            chunked = "chunked" in path
            framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % size
            self.transport.write(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n")
            generated = Generated(self.transport, size, chunked, lambda: None)
            self.factory.generators.append(generated)
            generated.start()
        elif path == "/garbage":
            self.transport.write(b"SPLAT\r\n\r\n")
        elif path == "/close":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            self.transport.loseConnection()
        elif path == "/hang":
            pass
        elif path == "/drop-next":
            self.drop_next = True
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        else:  # a page, as the example's nginx serves
            body = f"<html>{path}</html>".encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n"
                                 % len(body) + body)

    def resume_reading(self) -> None:
        self.transport.resumeProducing()
        self.factory.paused.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost += 1


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` with exactly these labels in a Prometheus text scrape."""
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


# ---------------------------------------------------------------------------- an http proxy

def proxy_chain(upstream_port: int, client_options: dict[str, Any] | None = None,
                server_options: dict[str, Any] | None = None) -> dict[str, Any]:
    client: dict[str, Any] = {"type": "http", "kind": "client", "exit": "tcp_client0"}
    if client_options:
        client["options"] = client_options
    server: dict[str, Any] = {"type": "http", "kind": "server", "exit": "http_client0"}
    if server_options:
        server["options"] = server_options
    return {"name": "test", "bindings": {
        "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 0}, "exit": "http0"},
        "http0": server,
        "http_client0": client,
        "tcp_client0": {"type": "tcp", "kind": "client", "options": {"host": "127.0.0.1", "port": upstream_port}},
    }, "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}


class GatewayCase(unittest.TestCase):
    """A test of a gateway on `self.port` (set by the case's serve) with raw HTTP clients."""

    port: int

    @defer.inlineCallbacks
    def client(self) -> Any:
        client = yield connect_http(self.port)
        self.addCleanup(lambda: client.transport.loseConnection() if not client.is_closed else None)
        return client


class ProxyCase(GatewayCase):
    @defer.inlineCallbacks
    def serve(self, client_options: dict[str, Any] | None = None,
              server_options: dict[str, Any] | None = None, edit: Any = None) -> Any:
        """The gateway in front of a fresh upstream; `edit(config)` may change its config first."""
        self.upstream = UpstreamFactory()
        listening: Any = reactor.listenTCP(0, self.upstream, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(listening.stopListening)
        self.addCleanup(self.cleanup_upstreams)
        config = proxy_chain(listening.getHost().port, client_options, server_options)
        if edit is not None:
            edit(config)
        self.gateway, self.port = yield start_gateway(self, config)
        return self.port

    def cleanup_upstreams(self) -> None:
        connection: Any
        for connection in self.upstream.connections:
            connection.transport.loseConnection()


def rss_bytes() -> int:
    """This process's resident set (the gateway, the clients and the upstream of a test)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
