"""The http proxy's express lane (zillatw.bindings.http.express) on real loopback sockets:
which requests take it, that the client and the upstream see the very bytes the general
path gives them, and that every unusual turn (a response in pieces, chunked, closing, an
upstream that goes away, a timeout on a Clock, pipelined bytes, a client that leaves) is
handed to the general path and answered as it answers it."""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from zillatw.test.http_support import GatewayCase, proxy_chain, request
from zillatw.test.support import eventually, start_gateway

# What the recording upstream answers, by path (each a whole response in one write).
ANSWERS = {
    "/plain": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello",
    "/hop": (b"HTTP/1.1 201 Whatever\r\nKeep-Alive: timeout=5\r\nX-Dup: a\r\nX-Dup:  b \r\n"
             b"Proxy-Authenticate: Basic\r\nTrailer: x\r\nContent-Length: 2\r\n\r\nok"),
    "/empty": b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    "/chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    "/close": b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
    "/nocontent": b"HTTP/1.1 204 No Content\r\n\r\n",
    "/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nyes",
    "/until-close": b"HTTP/1.1 200 OK\r\n\r\nall of it",
}
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


class Recorder(Protocol):
    """An upstream that records what it receives and answers each whole request by its
    path: from ANSWERS, `/split` in two writes, `/hang` never, `/drop` by closing."""

    factory: "RecorderFactory"
    transport: Any

    def connectionMade(self) -> None:
        self.buffer = b""
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            match = _LENGTH.search(self.buffer[:end + 2])
            total = end + 4 + (int(match.group(1)) if match else 0)
            if b"transfer-encoding: chunked" in self.buffer[:end].lower():
                last = self.buffer.find(b"0\r\n\r\n", end + 4)
                if last < 0:
                    return
                total = last + 5
            if len(self.buffer) < total:
                return
            whole, self.buffer = self.buffer[:total], self.buffer[total:]
            self.factory.requests.append(whole)
            self.answer(whole.split(b" ")[1].decode())

    def answer(self, target: str) -> None:
        path = target.split("?")[0]
        if path == "/split":
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nfir")
            self.factory.split_sent.callback(self)
        elif path == "/drop":
            self.transport.loseConnection()
        elif path == "/until-close":
            self.transport.write(ANSWERS[path])
            self.transport.loseConnection()
        elif path != "/hang":
            self.transport.write(ANSWERS.get(path, ANSWERS["/plain"]))

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost += 1


class RecorderFactory(Factory):  # type: ignore[type-arg]
    protocol = Recorder  # type: ignore[assignment]

    def __init__(self) -> None:
        self.connections: list[Recorder] = []
        self.requests: list[bytes] = []
        self.lost = 0
        self.split_sent: defer.Deferred = defer.Deferred()


class ExpressCase(GatewayCase):
    @defer.inlineCallbacks
    def serve(self, express: bool = True, server_options: dict[str, Any] | None = None, edit: Any = None) -> Any:
        self.upstream = RecorderFactory()
        listening: Any = reactor.listenTCP(0, self.upstream, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(listening.stopListening)
        self.addCleanup(lambda: [c.transport.loseConnection() for c in self.upstream.connections])
        config = proxy_chain(listening.getHost().port, server_options=server_options)
        if edit is not None:
            edit(config)
        self.gateway, self.port = yield start_gateway(self, config)
        self.lane = self.gateway.binding("http0").express
        if not express:
            self.gateway.binding("http0").express = None
        return self.port

    @defer.inlineCallbacks
    def warm(self, client: Any) -> Any:
        """One request through the general path: the upstream connection it opens is pooled."""
        client.send(request("GET", "/plain"))
        yield client.responses(len(client.replies) + 1)


# Requests whose bytes both paths must forward alike (and answer alike).
SAME_BYTES_REQUESTS = [
    request("GET", "/plain"),
    request("POST", "/plain", b"a body", {"Content-Type": "text/plain"}),
    request("POST", "/empty", b""),
    request("DELETE", "/hop?access_token=secret&x=1", None, {"X-Dup": "1", "x-dup": "2", "Keep-Alive": "300",
                                                            "Proxy-Authorization": "Basic x", "TE": "trailers",
                                                            "X-Spaced": " \tpadded\t "}),
    request("PUT", "/plain", b"x" * 3000, {"Host": "localhost:80"}, host=None),
    request("OPTIONS", "/plain"),
    request("PATCH", "/hop", b"{}"),
]


class SameBytesTests(ExpressCase):
    @defer.inlineCallbacks
    def exchange_all(self, express: bool) -> Any:
        """What the upstream received and the client got, after a warm-up request."""
        yield self.serve(express)
        client = yield self.client()
        yield self.warm(client)
        for index, raw in enumerate(SAME_BYTES_REQUESTS):
            client.send(raw)
            yield client.responses(index + 2)
        self.assertEqual(len(self.upstream.connections), 1)  # all on the pooled connection
        events = [line[line.index("BINDING_"):] for line in self.gateway.events_text.getvalue().splitlines()
                  if "REQUEST_ACCEPTED" in line]  # without the time and the trace id
        return self.upstream.requests[1:], client.raw, events, self.lane.served

    @defer.inlineCallbacks
    def test_client_and_upstream_see_the_same_bytes_either_way(self):
        express = yield self.exchange_all(True)
        general = yield self.exchange_all(False)
        self.assertEqual(express[3], len(SAME_BYTES_REQUESTS))  # each took the lane...
        self.assertEqual(general[3], 0)                        # ...and none did here
        self.assertEqual(express[0], general[0])  # the upstream's bytes
        self.assertEqual(express[1], general[1])  # the client's
        self.assertEqual(express[2], general[2])  # the accepted events (the target redacted)
        self.assertIn("/hop?access_token=REDACTED&x=1", " ".join(express[2]))
        forwarded = express[0][3]
        self.assertIn(b"x-dup: 1, 2\r\n", forwarded)
        self.assertNotIn(b"keep-alive", forwarded.lower())
        self.assertIn(b"HTTP/1.1 201 Created\r\nx-dup: a, b\r\nContent-Length: 2\r\n\r\nok", express[1])


# Requests the general path refuses: the lane must leave each to it (same answer with it on).
REFUSED_REQUESTS = [
    b"POST /plain HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"POST /plain HTTP/1.1\r\nHost: localhost\r\nContent-Length: +3\r\n\r\nabc",
    b"POST /plain HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
    b"GET /plain HTTP/1.1\r\nHost: localhost\r\nHost: elsewhere\r\n\r\n",
    b"GET /plain HTTP/1.1\r\nHost : localhost\r\n\r\n",
    b"GET /plain HTTP/1.1\r\nHost: localhost\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET /plain#frag HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET http://elsewhere/plain HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /plain HTTP/1.1\r\nHost: user@localhost\r\n\r\n",
    b"GET /plain HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"x" * 9000 + b"\r\n\r\n",
    b"GET /" + b"a" * 8178 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",  # its LF one past the line limit: 414
    b"GET /plain HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"x" * (8192 - 25) + b"\r\n\r\n",  # one past: 431
    b"GET /plain HTTP/1.1\r\nHost: localhost\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n",
    b"GET /plain HTTP/1.1\r\n\r\n",
    b"BREW /plain HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /plain HTTP/1.1\r\nHost: localhost\r\nX-Ctl: a\x01b\r\n\r\n",
]


class RefusalTests(ExpressCase):
    @defer.inlineCallbacks
    def answers(self, express: bool) -> Any:
        yield self.serve(express)
        answers, served = [], 0
        for raw in REFUSED_REQUESTS:
            client = yield self.client()
            yield self.warm(client)  # the lane's, after the first: the pool has a connection
            before = self.lane.served
            client.send(raw)
            yield client.closed
            served += self.lane.served - before
            answers.append(client.raw.split(b"hello", 1)[1].split(b"\r\n")[0])
        return answers, served

    @defer.inlineCallbacks
    def test_what_the_general_path_refuses_is_left_to_it(self):
        with_lane, served = yield self.answers(True)
        without, _ = yield self.answers(False)
        self.assertEqual(with_lane, without)
        self.assertEqual(served, 0)
        self.assertTrue(all(line.startswith(b"HTTP/1.1 4") or line.startswith(b"HTTP/1.1 5") for line in with_lane),
                        with_lane)


class LaneTests(ExpressCase):
    @defer.inlineCallbacks
    def test_only_simple_requests_take_the_lane(self):
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)  # the first: no pooled connection yet
        self.assertEqual(self.lane.served, 0)
        detours = [
            request("GET", "/plain", None, {"Origin": "http://localhost"}),  # same origin: served
            request("GET", "/plain", None, {"Connection": "keep-alive"}),
            request("POST", "/plain", b"x", {"Expect": "100-continue"}),
            request("POST", "/plain", b"3\r\nabc\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}),
            b"GET /plain HTTP/1.1\nHost: localhost\n\n",  # bare LF lines
            request("GET", "/plain", version="HTTP/1.0").replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n"),
        ]
        for index, raw in enumerate(detours):
            client.send(raw)
            replies = yield client.responses(index + 2)
            self.assertEqual(replies[-1].status, 200, raw)
        self.assertEqual(self.lane.served, 0)
        client.send(request("GET", "/plain"))
        yield client.responses(len(detours) + 2)
        self.assertEqual(self.lane.served, 1)
        self.assertEqual(len(self.upstream.connections), 1)

    @defer.inlineCallbacks
    def test_a_request_in_two_reads_and_two_at_once_take_the_general_path(self):
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)
        raw = request("POST", "/plain", b"body")
        client.send(raw[:10])
        server = self.gateway.binding("http0")
        yield eventually(lambda: any(not reading._parser.idle for reading in server.pending))
        client.send(raw[10:])
        yield client.responses(2)
        self.assertEqual(self.lane.served, 0)
        client.send(raw + raw)  # pipelined: both in one read
        replies = yield client.responses(4)
        self.assertEqual([r.body for r in replies], [b"hello"] * 4)
        # the first by the general path; the second, alone in what is left once the first
        # is answered, is the lane's
        self.assertEqual(self.lane.served, 1)

    @defer.inlineCallbacks
    def test_a_server_routing_by_header(self):
        """Its routes pick the exit per request: a request they send to the client takes the
        lane, one no route takes gets the general path's 404."""
        def by_path(config: dict[str, Any]) -> None:
            server = config["bindings"]["http0"]
            del server["exit"]
            server["routes"] = [{"when": [{"headers": {":path": "/plain*"}}], "exit": "http_client0"}]
        yield self.serve(edit=by_path)
        client = yield self.client()
        yield self.warm(client)
        client.send(request("GET", "/plain?x=1"))
        replies = yield client.responses(2)
        self.assertEqual((replies[1].body, self.lane.served), (b"hello", 1))
        client.send(request("GET", "/other"))
        yield client.closed
        self.assertIn(b"HTTP/1.1 404 Not Found", client.raw)
        self.assertEqual(self.lane.served, 1)

    @defer.inlineCallbacks
    def test_guarded_or_overriding_servers_have_no_lane(self):
        yield self.serve(server_options={"overrides": {":authority": "example.com:80"}})
        self.assertIsNone(self.lane)


class PromotionTests(ExpressCase):
    """Responses the lane does not answer itself: the general path's exchanges take over."""

    @defer.inlineCallbacks
    def answered(self, path: str, raw: bytes | None = None) -> Any:
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)
        client.send(raw or request("GET", path))
        replies = yield client.responses(2)
        self.assertEqual((self.lane.served, self.lane.promoted), (1, 1))
        return client, replies[1]

    @defer.inlineCallbacks
    def test_a_response_in_two_reads(self):
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)
        client.send(request("GET", "/split"))
        upstream = yield self.upstream.split_sent
        yield eventually(lambda: b"fir" in client.raw)
        upstream.transport.write(b"st")
        yield eventually(lambda: b"firs" in client.raw)
        upstream.transport.write(b"!")
        replies = yield client.responses(2)
        self.assertEqual(replies[1].body, b"first!")
        self.assertEqual((self.lane.served, self.lane.promoted), (1, 1))
        client.send(request("GET", "/plain"))  # the connection went back to the pool
        yield client.responses(3)
        self.assertEqual((self.lane.served, self.lane.promoted), (2, 1))
        self.assertEqual(len(self.upstream.connections), 1)

    @defer.inlineCallbacks
    def test_a_chunked_response(self):
        client, reply = yield self.answered("/chunked")
        self.assertEqual(reply.body, b"abc")
        self.assertEqual(reply.headers["transfer-encoding"], "chunked")

    @defer.inlineCallbacks
    def test_an_interim_response(self):
        client, reply = yield self.answered("/interim")
        self.assertEqual((reply.status, reply.body), (200, b"yes"))

    @defer.inlineCallbacks
    def test_a_204(self):
        client, reply = yield self.answered("/nocontent")
        self.assertEqual(reply.status, 204)
        self.assertNotIn("content-length", reply.headers)

    @defer.inlineCallbacks
    def test_a_closing_response_is_not_pooled(self):
        client, reply = yield self.answered("/close")
        self.assertEqual(reply.body, b"ok")
        yield eventually(lambda: self.upstream.lost == 1)
        client.send(request("GET", "/plain"))
        yield client.responses(3)
        self.assertEqual(len(self.upstream.connections), 2)

    @defer.inlineCallbacks
    def test_a_response_until_close(self):
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)
        client.send(request("GET", "/until-close"))
        replies = yield client.responses(2)  # re-framed for the HTTP/1.1 client: chunked
        self.assertEqual((replies[1].body, replies[1].headers["transfer-encoding"]), (b"all of it", "chunked"))
        self.assertEqual((self.lane.served, self.lane.promoted), (1, 1))

    @defer.inlineCallbacks
    def test_an_upstream_gone_before_answering_a_bodiless_request_is_retried(self):
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)
        self.upstream.connections[0].answer = lambda target: self.upstream.connections[0].transport.loseConnection()
        client.send(request("GET", "/plain"))
        replies = yield client.responses(2)
        self.assertEqual(replies[1].body, b"hello")  # on a fresh connection
        self.assertEqual(len(self.upstream.connections), 2)
        self.assertEqual(self.lane.promoted, 1)

    @defer.inlineCallbacks
    def test_an_upstream_gone_before_answering_a_request_with_a_body_is_502(self):
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)
        client.send(request("POST", "/drop", b"not retried"))
        yield client.closed
        self.assertTrue(client.raw.split(b"hello", 1)[1].startswith(b"HTTP/1.1 502 Bad Gateway"), client.raw)
        self.assertIn("the upstream closed the connection before its response was complete",
                      self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_no_response_in_time_is_504_on_a_clock(self):
        yield self.serve()
        clock = Clock()
        forwarder = self.gateway.binding("http_client0").forwarder
        client = yield self.client()
        yield self.warm(client)
        forwarder.reactor = clock
        for pool in forwarder.pools.values():
            for connection in pool.idle:
                connection._idle_timer.cancel()  # its timer is re-armed on the Clock by the lane
                connection._idle_timer = None
        client.send(request("GET", "/hang"))
        yield eventually(lambda: len(self.upstream.requests) == 2)
        self.assertEqual(self.lane.served, 1)
        clock.advance(forwarder.limits.response_timeout - 1)
        self.assertEqual(len(client.replies), 1)
        clock.advance(2)
        yield client.closed
        self.assertIn(b"HTTP/1.1 504 Gateway Timeout", client.raw)
        self.assertEqual(self.lane.promoted, 1)
        yield eventually(lambda: self.upstream.lost == 1)

    @defer.inlineCallbacks
    def test_pipelined_bytes_while_waiting_are_served_in_order(self):
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)
        client.send(request("GET", "/split"))
        upstream = yield self.upstream.split_sent
        client.send(request("GET", "/empty"))
        yield eventually(lambda: self.lane.promoted == 1)
        upstream.transport.write(b"st!")
        replies = yield client.responses(3)
        self.assertEqual([r.body for r in replies[1:]], [b"first!", b""])

    @defer.inlineCallbacks
    def test_a_client_leaving_while_waiting_closes_the_upstream_connection(self):
        yield self.serve()
        client = yield self.client()
        yield self.warm(client)
        client.send(request("GET", "/hang"))
        yield eventually(lambda: len(self.upstream.requests) == 2)
        client.transport.abortConnection()
        yield eventually(lambda: self.upstream.lost == 1)
        self.assertEqual((self.lane.served, self.lane.promoted), (1, 1))
        self.assertEqual(self.gateway.binding("http0").kept, set())
