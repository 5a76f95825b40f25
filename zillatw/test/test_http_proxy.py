"""Plain HTTP through an http client: tcp -> http server -> http client -> tcp client -> a
real upstream (the small server below, on loopback). Keep-alive reuse counted by upstream
connections, bodies both ways in both framings, hop-by-hop headers, 502 and 504 (on a
Clock), a client that leaves mid-body, back-pressure, and 200 MB each way with bounded
memory."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock

from zillatw.test.http_support import (
    Counting,
    ProxyCase,
    Sender,
    UpstreamFactory,
    proxy_chain,
    request,
    rss_bytes,
)
from zillatw.test.support import eventually, start_gateway
from zillatw.wire.http1body import LAST_CHUNK, chunk


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
    def test_pooled_connection_closed_after_the_idle_timeout_on_a_clock(self):
        yield self.serve({"idle-timeout": 8})
        clock = Clock()
        self.gateway.binding("http_client0").forwarder.reactor = clock
        client = yield self.client()
        client.send(request("GET", "/count"))
        yield client.responses(1)
        clock.advance(7)
        client.send(request("GET", "/count"))  # reused before the timeout: its clock starts again
        yield client.responses(2)
        self.assertEqual(len(self.upstream.connections), 1)
        clock.advance(7)
        self.assertEqual(self.upstream.lost, 0)
        clock.advance(2)
        yield eventually(lambda: self.upstream.lost == 1)
        self.assertEqual(self.gateway.binding("http_client0").open_count(), 0)
        client.send(request("GET", "/count"))  # the next request opens a new one
        yield client.responses(3)
        self.assertEqual(len(self.upstream.connections), 2)

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
        # Zilla's default versions, http/1.1 and h2: the first request to a cleartext upstream
        # offers h2c; this HTTP/1.1 upstream ignores it, and it is not offered again.
        client.send(request("GET", "/count", host="localhost:9090"))  # per upstream: exit and authority
        yield client.responses(1)
        first = self.upstream.requests[0]["headers"]
        self.assertEqual((first["upgrade"], first["connection"]), ("h2c", "Upgrade, HTTP2-Settings"))
        client.send(request("POST", "/count", b"12345", {
            "Connection": "keep-alive, X-Private", "X-Private": "p", "Keep-Alive": "timeout=1", "TE": "trailers",
            "Proxy-Authorization": "Basic eA==", "Upgrade": "h2c", "X-End": "e", "Expect": "100-continue"},
            host="localhost:9090"))
        reply = (yield client.responses(2))[1]
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
    def test_slow_upstream_on_a_pooled_connection_is_504_on_a_clock(self):
        """A reused connection's one timer watches the response (no timer per request): it is
        moved sooner when the response is due before the idle timeout."""
        yield self.serve({"response-timeout": 20, "idle-timeout": 60})
        clock = Clock()
        self.gateway.binding("http_client0").forwarder.reactor = clock
        client = yield self.client()
        client.send(request("GET", "/count"))
        yield client.responses(1)
        clock.advance(5)
        client.send(request("GET", "/hang"))
        yield eventually(lambda: len(self.upstream.requests) == 2)
        self.assertEqual(len(self.upstream.connections), 1)  # the pooled one
        clock.advance(19)
        self.assertEqual(len(client.replies), 1)
        clock.advance(2)
        yield client.closed
        self.assertIn(b"HTTP/1.1 504 Gateway Timeout", client.raw)
        self.assertIn("(no response within 20 s)", self.gateway.events_text.getvalue())

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
