"""Plain HTTP through an http client: tcp -> http server -> http client -> tcp client -> a
real upstream (the small server below, on loopback). Keep-alive reuse counted by upstream
connections, bodies both ways in both framings, hop-by-hop headers, 502 and 504 (on a
Clock), a client that leaves mid-body, back-pressure, and 200 MB each way with bounded
memory."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import treq
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from zope.interface import implementer

from zillatw.test import pki
from zillatw.test.support import CONF, eventually, start_gateway
from zillatw.test.test_http_plain import connect_http, request
from zillatw.test.test_tls import free_port
from zillatw.wire.http1 import RequestHeadParser
from zillatw.wire.http1body import LAST_CHUNK, BodyDecoder, chunk, request_framing


class UpstreamFactory(Factory):  # type: ignore[type-arg]
    """What the upstream saw: its connections, and each request's head and body size."""

    def __init__(self) -> None:
        self.connections: list[Upstream] = []
        self.requests: list[dict[str, Any]] = []
        self.lost = 0
        self.first_body_bytes: defer.Deferred = defer.Deferred()
        self.generators: list[Generated] = []
        self.pause_after: int | None = None  # body bytes after which reading pauses for PAUSE s
        self.paused: defer.Deferred = defer.Deferred()  # fires (with the sender) when reading resumes

    def buildProtocol(self, addr: Any) -> Any:
        protocol = Upstream()
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


class Upstream(Protocol):
    """A small HTTP/1.1 origin. By path:
    /echo      the request's body back, same framing (Content-Length or chunked), streamed;
    /count     read the body, answer its size (JSON, with the headers it got);
    /big?N     N bytes of body (chunked when ?chunked is in the path);
    /drop-next answer, then close as the next request on this connection arrives;
    /hang      never answer;    /garbage  not HTTP;    /close  answer with Connection: close;
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
        if path == "/echo":
            self.echo_chunked = "content-length" not in head.headers
            framing = "transfer-encoding: chunked" if self.echo_chunked \
                else f"content-length: {head.headers['content-length']}"
            self.transport.write(f"HTTP/1.1 200 OK\r\ncontent-type: {head.headers.get('content-type', 'x/y')}\r\n"
                                 f"{framing}\r\nkeep-alive: timeout=5\r\n\r\n".encode())

    def body_done(self) -> None:
        current, self.decoder = self.current, None
        path = current["path"]
        if path == "/echo":
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


class ProxyCase(unittest.TestCase):
    @defer.inlineCallbacks
    def serve(self, client_options: dict[str, Any] | None = None,
              server_options: dict[str, Any] | None = None) -> Any:
        self.upstream = UpstreamFactory()
        listening: Any = reactor.listenTCP(0, self.upstream, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(listening.stopListening)
        self.addCleanup(self.cleanup_upstreams)
        self.gateway, self.port = yield start_gateway(
            self, proxy_chain(listening.getHost().port, client_options, server_options))
        return self.port

    @defer.inlineCallbacks
    def client(self) -> Any:
        client = yield connect_http(self.port)
        self.addCleanup(lambda: client.transport.loseConnection() if not client.is_closed else None)
        return client

    def cleanup_upstreams(self) -> None:
        connection: Any
        for connection in self.upstream.connections:
            connection.transport.loseConnection()


class ForwardingTests(ProxyCase):
    @defer.inlineCallbacks
    def test_keep_alive_reuses_one_upstream_connection(self):
        yield self.serve()
        client = yield self.client()
        for index in range(5):
            client.send(request("POST", "/echo", f"body {index}".encode(), {"Content-Type": "text/plain"}))
            replies = yield client.responses(index + 1)
            self.assertEqual(replies[index].body, f"body {index}".encode())
            self.assertEqual(replies[index].headers["content-type"], "text/plain")
        self.assertEqual(len(self.upstream.connections), 1)
        self.assertEqual(len(self.upstream.requests), 5)
        # a second client gets the same pooled connection once it is idle
        other = yield self.client()
        other.send(request("GET", "/count"))
        yield other.responses(1)
        self.assertEqual(len(self.upstream.connections), 1)

    @defer.inlineCallbacks
    def test_concurrent_requests_open_connections_up_to_the_bound(self):
        yield self.serve({"max-connections": 2})
        clients = []
        for _ in range(4):
            client = yield self.client()
            client.send(request("GET", "/big?1000"))
            clients.append(client)
        for client in clients:
            (reply,) = yield client.responses(1)
            self.assertEqual(len(reply.body), 1000)
        self.assertLessEqual(len(self.upstream.connections), 2)

    @defer.inlineCallbacks
    def test_connection_close_from_upstream_not_reused(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("GET", "/close"))
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.body, b"ok")
        self.assertNotIn("connection", reply.headers)  # the upstream's close is its own leg's
        client.send(request("GET", "/count"))
        yield client.responses(2)
        self.assertEqual(len(self.upstream.connections), 2)

    @defer.inlineCallbacks
    def test_reused_connection_closed_by_upstream_retried_for_a_bodiless_request(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("GET", "/drop-next"))
        yield client.responses(1)
        client.send(request("GET", "/count"))
        replies = yield client.responses(2)
        self.assertEqual(replies[1].status, 200)
        self.assertEqual(len(self.upstream.connections), 2)
        # a request with a body is not sent twice: 502
        client.send(request("GET", "/drop-next"))
        yield client.responses(3)
        client.send(request("POST", "/count", b"once"))
        yield client.closed
        self.assertIn(b"HTTP/1.1 502 ", client.raw)
        self.assertEqual(len(self.upstream.connections), 2)

    @defer.inlineCallbacks
    def test_chunked_and_length_both_ways(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("POST", "/echo", None, {"Transfer-Encoding": "chunked"})
                    + b"".join(chunk(b"abc") + chunk(b"defg")) + LAST_CHUNK)
        (reply,) = yield client.responses(1)
        self.assertEqual((reply.body, reply.headers["transfer-encoding"]), (b"abcdefg", "chunked"))
        self.assertEqual(self.upstream.requests[0]["headers"]["transfer-encoding"], "chunked")
        client.send(request("POST", "/echo", b"sized"))
        replies = yield client.responses(2)
        self.assertEqual((replies[1].body, replies[1].headers["content-length"]), (b"sized", "5"))
        self.assertEqual(self.upstream.requests[1]["headers"]["content-length"], "5")
        client.send(request("GET", "/big?70000&chunked"))
        replies = yield client.responses(3)
        self.assertEqual(len(replies[2].body), 70000)

    @defer.inlineCallbacks
    def test_hop_by_hop_headers_removed_and_host_forwarded(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("POST", "/count", b"12345", {
            "Connection": "keep-alive, X-Private", "X-Private": "p", "Keep-Alive": "timeout=1", "TE": "trailers",
            "Proxy-Authorization": "Basic eA==", "Upgrade": "h2c", "X-End": "e", "Expect": "100-continue"},
            host="localhost:9090"))
        (reply,) = yield client.responses(1)
        seen = json.loads(reply.body)
        self.assertEqual(seen["size"], 5)
        headers = seen["headers"]
        for name in ("connection", "x-private", "keep-alive", "te", "proxy-authorization", "upgrade", "via",
                     "forwarded", "expect"):
            self.assertNotIn(name, headers)
        self.assertEqual((headers["host"], headers["x-end"]), ("localhost:9090", "e"))
        self.assertNotIn("x-hop", reply.headers)  # named by the upstream's Connection
        self.assertEqual(reply.headers["x-kept"], "yes")

    @defer.inlineCallbacks
    def test_shutdown_closes_pooled_and_kept_alive_connections(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("GET", "/count"))
        yield client.responses(1)
        self.assertEqual(self.gateway.binding("http_client0").open_count(), 1)
        yield self.gateway.stopService()
        yield client.closed  # the idle client connection is closed, with no unasked-for answer
        self.assertEqual(len(client.replies), 1)
        yield eventually(lambda: self.upstream.lost == 1)
        self.assertEqual(self.gateway.binding("http_client0").open_count(), 0)

    @defer.inlineCallbacks
    def test_authority_override(self):
        yield self.serve({"overrides": {":authority": "backend.internal:8080", "x-added": "1"}})
        client = yield self.client()
        client.send(request("GET", "/count"))
        (reply,) = yield client.responses(1)
        headers = json.loads(reply.body)["headers"]
        self.assertEqual((headers["host"], headers["x-added"]), ("backend.internal:8080", "1"))


class FailureTests(ProxyCase):
    @defer.inlineCallbacks
    def test_unreachable_upstream_is_502_with_an_event(self):
        listening = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        port = listening.getHost().port
        yield listening.stopListening()
        self.gateway, self.port = yield start_gateway(self, proxy_chain(port))
        client = yield self.client()
        client.send(request("GET", "/"))
        yield client.closed
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 502 Bad Gateway"), client.raw)
        self.assertIn(b"the upstream could not be reached", client.raw)
        self.assertNotIn(b"refused", client.raw.lower())  # the cause is for the event only
        events = self.gateway.events_text.getvalue()
        self.assertIn("BINDING_HTTP_REQUEST_REJECTED - 502 the upstream could not be reached (", events)

    @defer.inlineCallbacks
    def test_garbage_from_upstream_is_502(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("GET", "/garbage"))
        yield client.closed
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 502 "), client.raw)
        self.assertIn("not valid HTTP (malformed status line", self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_slow_upstream_is_504_on_a_clock(self):
        yield self.serve({"response-timeout": 20})
        clock = Clock()
        self.gateway.binding("http_client0").forwarder.reactor = clock
        client = yield self.client()
        client.send(request("GET", "/hang"))
        yield eventually(lambda: self.upstream.requests)
        clock.advance(19)
        self.assertEqual(client.raw, b"")
        clock.advance(2)
        yield client.closed
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 504 Gateway Timeout"), client.raw)
        self.assertIn("504 the upstream did not answer in time (no response within 20 s)",
                      self.gateway.events_text.getvalue())
        yield eventually(lambda: self.upstream.lost == 1)  # the upstream connection is not reused

    @defer.inlineCallbacks
    def test_stalled_request_body_is_408_on_a_clock(self):
        yield self.serve(server_options={"body-timeout": 5})
        clock = Clock()
        self.gateway.binding("http0").reactor = clock
        client = yield self.client()
        client.send(request("POST", "/count", None, {"Content-Length": "10"}) + b"abc")
        yield eventually(lambda: self.upstream.requests and self.upstream.requests[0]["size"] == 3)
        clock.advance(6)
        yield client.closed
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 408 "), client.raw)
        yield eventually(lambda: self.upstream.lost == 1)

    @defer.inlineCallbacks
    def test_client_leaving_mid_body_closes_the_upstream(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("POST", "/count", None, {"Content-Length": "1000000"}) + b"x" * 1000)
        yield self.upstream.first_body_bytes
        client.transport.abortConnection()
        yield eventually(lambda: self.upstream.lost == 1, timeout=1.0)

    @defer.inlineCallbacks
    def test_client_leaving_mid_response_closes_the_upstream(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("GET", "/big?100000000"))
        yield eventually(lambda: len(client.raw) > 100000)
        client.transport.abortConnection()
        yield eventually(lambda: self.upstream.lost == 1, timeout=1.0)

    @defer.inlineCallbacks
    def test_no_route_in_the_client_is_502_and_leaves_no_timer(self):
        """A refused request with a body: its body timer goes with it (trial checks)."""
        self.upstream = UpstreamFactory()
        config = proxy_chain(1)
        client_binding = config["bindings"]["http_client0"]
        del client_binding["exit"]
        client_binding["routes"] = [{"when": [{"headers": {":path": "/api/*"}}], "exit": "tcp_client0"}]
        self.gateway, self.port = yield start_gateway(self, config)
        client = yield self.client()
        client.send(request("POST", "/elsewhere", b"body"))
        yield client.closed
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 502 "), client.raw)
        self.assertIn("502 no upstream for this request", self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_request_without_host_refused(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("GET", "/count", version="HTTP/1.0", host=None))
        yield client.closed
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 400 "), client.raw)


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


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


PAUSE = 0.5  # seconds a slow reader stops reading


class LargeBodyTests(ProxyCase):
    SIZE = 200 * 1000 * 1000
    BOUND = 64 * 1024 * 1024  # RSS growth allowed for the whole process (gateway, client, upstream)

    def held_by_gateway(self) -> int:
        """Bytes the gateway holds in its own buffers: pipelined bytes and bodies waiting
        for an upstream (its sockets' write buffers are Twisted's, paced by the producers)."""
        held = 0
        for protocol in self.gateway.binding("http0").kept:
            if protocol.exchange is not None:
                held += len(protocol.exchange.pipelined)
                end = protocol.exchange.exit_end
                if end is not None:
                    held += end.early_size
        return held

    @defer.inlineCallbacks
    def watch(self, until: defer.Deferred) -> Any:
        baseline, peak, held = rss_bytes(), 0, 0
        while not until.called:
            peak = max(peak, rss_bytes() - baseline)
            held = max(held, self.held_by_gateway())
            yield deferred_later(0.05)
        return peak, held

    @defer.inlineCallbacks
    def test_200_mb_request_body_streams_through(self):
        yield self.serve()
        self.upstream.pause_after = 20 * 1000 * 1000  # a slow upstream, for a while
        client = yield self.client()
        client.send(request("POST", "/count", None, {"Transfer-Encoding": "chunked"}))
        sender = Sender(client.transport, self.SIZE, chunked=True)
        sender.start()
        sent_at_pause: list[int] = []
        self.upstream.paused.addCallback(lambda _: sent_at_pause.append(self.SIZE - sender.left))
        reply = client.responses(1)
        peak, held = yield self.watch(reply)
        (answer,) = yield reply
        # while the upstream read nothing, the client was paused: what it sent meanwhile sits
        # in socket buffers and the transports' (bounded) buffers, not in the gateway
        self.assertLess(sent_at_pause[0] - 20 * 1000 * 1000, self.BOUND)
        self.assertEqual(json.loads(answer.body)["size"], self.SIZE)
        self.assertLess(peak, self.BOUND)
        self.assertLessEqual(held, 1 << 20)

    @defer.inlineCallbacks
    def test_200_mb_response_body_streams_through(self):
        yield self.serve()
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                                       Counting(pause_after=20 * 1000 * 1000))
        client.transport.write(request("GET", f"/big?{self.SIZE}", headers={"Connection": "close"}))
        written_at_pause: list[int] = []
        client.paused.addCallback(lambda received: written_at_pause.append(
            self.upstream.generators[0].written - received))
        peak, held = yield self.watch(client.closed)
        # while the client read nothing, the upstream was paused: written but not received
        # is what socket and transport buffers hold (tens of MB at most), not the 180 MB to come
        self.assertLess(written_at_pause[0], self.BOUND)
        self.assertTrue(client.head.startswith(b"HTTP/1.1 200 OK"))
        self.assertGreater(client.received, self.SIZE)
        self.assertLess(client.received, self.SIZE + 1000)
        self.assertLess(peak, self.BOUND)
        self.assertLessEqual(held, 1 << 20)

    @defer.inlineCallbacks
    def test_first_bytes_arrive_before_the_last_are_sent(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("POST", "/echo", None, {"Content-Length": "10"}) + b"first")
        yield eventually(lambda: b"first" in client.raw)  # through the upstream and back
        client.send(b"-last")
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.body, b"first-last")


def deferred_later(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater
    return deferLater(reactor, seconds, lambda: None)


class HttpProxyExampleTests(unittest.TestCase):
    """conf/http.proxy.yaml over HTTP/1.1 (treq; test_h2_examples drives it over h2 as its README does),
    on free ports, the backend on 127.0.0.1 with the keystores generate-keystore.py makes."""

    @defer.inlineCallbacks
    def test_http_proxy_example(self):
        folder = Path(self.mktemp())
        (folder / "tls").mkdir(parents=True)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, [os.path.join(CONF, "tls", "generate-keystore.py"), str(folder / "tls")],
            env={**os.environ, "KEYSTORE_PASSWORD": "generated"}, reactor=reactor)
        self.assertEqual(code, 0, err)
        os.environ["KEYSTORE_PASSWORD"] = "generated"
        self.addCleanup(os.environ.pop, "KEYSTORE_PASSWORD")
        bundle = pkcs12.load_pkcs12((folder / "tls" / "backend.p12").read_bytes(), b"generated")
        backend = pki.Issued(bundle.key, bundle.cert.certificate)
        own = tssl.PrivateCertificate.loadPEM(backend.key_pem() + backend.cert_pem())
        options = tssl.CertificateOptions(privateKey=own.privateKey.original, certificate=own.original,
                                          acceptableProtocols=[b"http/1.1"])
        upstream = UpstreamFactory()
        listening: Any = reactor.listenSSL(0, upstream, options, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        port = free_port()
        text = Path(CONF, "http.proxy.yaml").read_text().replace("0.0.0.0", "127.0.0.1")
        for old, new in {"9090": str(port), "host: backend": "host: 127.0.0.1",
                         "port: 443": f"port: {listening.getHost().port}"}.items():
            self.assertIn(old, text)
            text = text.replace(old, new)
        (folder / "zilla.yaml").write_text(text)
        gateway, _ = yield start_gateway(self, str(folder / "zilla.yaml"))
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        ca = tssl.Certificate.loadPEM((folder / "tls" / "localhost.crt").read_bytes())
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca), pool=pool)
        for _ in range(3):
            # curl --cacert localhost.crt --http1.1 https://localhost:9090/demo.html (from a page elsewhere)
            response = yield treq.get(f"https://localhost:{port}/demo.html", agent=agent,
                                      headers={"Origin": "https://app.example"})
            self.assertEqual(response.code, 200)
            self.assertEqual((yield treq.content(response)), b"<html>/demo.html</html>")
            self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"), ["*"])
        self.assertEqual(len(upstream.connections), 1)  # kept alive upstream too
        self.assertEqual(upstream.requests[0]["headers"]["host"], f"localhost:{port}")
        handle = upstream.connections[0].transport.getHandle()
        self.assertEqual(handle.get_servername(), b"backend")  # SNI and verification: `backend`
        for connection in upstream.connections:
            connection.transport.loseConnection()
        yield eventually(lambda: upstream.lost == 1)
        self.assertIn(f"GET https://localhost:{port}/demo.html", gateway.events_text.getvalue())
