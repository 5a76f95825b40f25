"""Long Content-Length bodies through the plain HTTP proxy move socket to socket in the
kernel (zillatw.twistedcompat.Splice, splice(2)): a request's body to the upstream, a
response's to the client. Each test checks the splice ran (a recording subclass) and that
nothing differs from the Python path: the bytes, keep-alive reuse, what follows the body
on the connection, the metrics' counts, back-pressure both ways with bounded memory, the
body timer (on a Clock), and either side leaving mid-body."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater

from zillatw import twistedcompat
from zillatw.bindings.http import client as http_client
from zillatw.bindings.http import plain, splicing
from zillatw.test.http_support import Counting, ProxyCase, Sender, request, rss_bytes, sample
from zillatw.test.support import eventually
from zillatw.test.support import http_get as get

MB = 1000 * 1000
BOUND = 64 * 1024 * 1024  # RSS growth allowed for the whole process (gateway, client, upstream)


class SpliceCase(ProxyCase):
    def setUp(self) -> None:
        if not twistedcompat.CAN_SPLICE:  # pragma: no cover - Linux has it
            raise AssertionError("os.splice is missing: these tests are for Linux")
        self.splices: list[Any] = []
        splices = self.splices

        class Recorded(twistedcompat.Splice):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                splices.append(self)

        self.patch(splicing, "Splice", Recorded)

    def spliced(self, kind: type) -> list[Any]:
        """The splices an exchange of `kind` owned (ServerExchange: request bodies)."""
        return [s for s in self.splices if type(s.owner) is kind]

    def assertSplicedAndOver(self, requests: int, responses: int) -> None:
        self.assertEqual((len(self.spliced(plain.ServerExchange)), len(self.spliced(http_client.UpstreamExchange))),
                         (requests, responses))
        self.assertTrue(all(s.over for s in self.splices))


class SplicedBodyTests(SpliceCase):
    @defer.inlineCallbacks
    def test_echoed_body_intact_both_ways_then_the_connections_kept(self):
        """/echo answers as the body comes (Content-Length both ways): both directions are
        spliced at once, through one client connection and one upstream connection."""
        yield self.serve()
        client = yield self.client()
        payload = os.urandom(5 * MB)
        client.send(request("POST", "/echo", None, {"Content-Length": str(len(payload))}) + payload)
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.status, 200)
        self.assertEqual(hashlib.sha256(reply.body).hexdigest(), hashlib.sha256(payload).hexdigest())
        self.assertSplicedAndOver(1, 1)
        client.send(request("POST", "/count", b"after"))
        replies = yield client.responses(2)
        self.assertEqual(json.loads(replies[1].body)["size"], 5)
        self.assertEqual(len(self.upstream.connections), 1)  # kept alive after both splices

    @defer.inlineCallbacks
    def test_what_follows_a_spliced_body_is_the_next_request(self):
        """The splice takes exactly the body's length: a pipelined request after it is read
        by the server as usual, and answered in order."""
        yield self.serve()
        client = yield self.client()
        payload = b"p" * (2 * MB)
        client.send(request("POST", "/count", None, {"Content-Length": str(len(payload))}) + payload
                    + request("GET", "/next"))
        first, second = yield client.responses(2)
        self.assertEqual(json.loads(first.body)["size"], len(payload))
        self.assertEqual(second.body, b"<html>/next</html>")
        self.assertSplicedAndOver(1, 0)

    @defer.inlineCallbacks
    def test_spliced_bytes_counted_by_the_metrics(self):
        """stream.data.* of the metered http server count the wire bytes, and
        http.request.size / http.response.size the bodies, as if read by Python."""
        def metered(config: dict[str, Any]) -> None:
            config["telemetry"] = {
                "metrics": ["stream.data.received", "stream.data.sent", "http.request.size", "http.response.size"],
                "exporters": {"stdout": {"type": "stdout"}, "prom": {
                    "type": "prometheus", "options": {"endpoints": [{"scheme": "http", "port": 0}]}}}}
            config["bindings"]["http0"]["telemetry"] = {"metrics": ["stream.*", "http.*"]}
            config["bindings"]["tcp0"]["telemetry"] = {"metrics": ["stream.*"]}
        yield self.serve(edit=metered)
        client = yield self.client()
        size = 3 * MB
        sent = request("POST", "/echo", None, {"Content-Length": str(size)}) + b"e" * size
        client.send(sent)
        (reply,) = yield client.responses(1)
        self.assertEqual(len(reply.body), size)
        self.assertSplicedAndOver(1, 1)
        code, text = yield get(self.gateway.metrics_ports()[0])
        base = {"binding": "http0", "namespace": "test"}
        for binding in ("tcp0", "http0"):  # the wire bytes each way, as the client sent and got them
            labels = {"binding": binding, "namespace": "test"}
            self.assertEqual(sample(text, "stream_data_received_bytes_total", **labels), len(sent), binding)
            self.assertEqual(sample(text, "stream_data_sent_bytes_total", **labels), len(client.raw), binding)
        self.assertEqual(sample(text, "http_request_size_bytes_sum", **base), size)
        self.assertEqual(sample(text, "http_response_size_bytes_sum", **base), size)


    @defer.inlineCallbacks
    def test_100_continue_then_a_spliced_body(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("POST", "/count", None, {"Content-Length": str(2 * MB), "Expect": "100-continue"}))
        yield eventually(lambda: client.raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"))
        client.send(b"c" * (2 * MB))
        yield eventually(lambda: b"HTTP/1.1 200 OK" in client.raw)
        yield eventually(lambda: self.upstream.requests and self.upstream.requests[0]["size"] == 2 * MB)
        self.assertNotIn("expect", self.upstream.requests[0]["headers"])
        self.assertSplicedAndOver(1, 0)

    @defer.inlineCallbacks
    def test_an_answer_before_the_body_ends_the_splice_and_the_connection(self):
        """RFC 9112 §9.6: the response is whole, the request is not read to its end: the
        connection closes after the answer, its splice dropped, the upstream not reused."""
        yield self.serve()
        client = yield self.client()
        client.send(request("POST", "/early", None, {"Content-Length": str(10 * MB)}) + b"x" * 1000)
        client.send(b"y" * 300_000)
        yield client.closed
        (reply,) = client.replies
        self.assertEqual((reply.status, reply.body), (200, b"early"))
        yield eventually(lambda: self.upstream.lost == 1)
        self.assertEqual(len(self.spliced(plain.ServerExchange)), 1)  # begun with the first read
        self.assertTrue(all(s.over for s in self.splices))


class SplicedBackPressureTests(SpliceCase):
    SIZE = 100 * MB

    @defer.inlineCallbacks
    def watch(self, until: defer.Deferred) -> Any:
        baseline, peak = rss_bytes(), 0
        while not until.called:
            peak = max(peak, rss_bytes() - baseline)
            yield deferLater(reactor, 0.05, lambda: None)
        return peak

    @defer.inlineCallbacks
    def test_slow_upstream_pauses_the_client_with_bounded_memory(self):
        yield self.serve()
        self.upstream.pause_after = 10 * MB  # the upstream reads nothing for a while
        client = yield self.client()
        client.send(request("POST", "/count", None, {"Content-Length": str(self.SIZE)}))
        sender = Sender(client.transport, self.SIZE, chunked=False)
        sender.start()
        sent_at_pause: list[int] = []
        self.upstream.paused.addCallback(lambda _: sent_at_pause.append(self.SIZE - sender.left))
        reply = client.responses(1)
        peak = yield self.watch(reply)
        (answer,) = yield reply
        self.assertEqual(json.loads(answer.body)["size"], self.SIZE)
        self.assertLess(sent_at_pause[0] - 10 * MB, BOUND)  # socket buffers and one pipe, not the body
        self.assertLess(peak, BOUND)
        self.assertSplicedAndOver(1, 0)
        blocked = self.spliced(plain.ServerExchange)[0]
        self.assertFalse(blocked._blocked)

    @defer.inlineCallbacks
    def test_slow_client_pauses_the_upstream_with_bounded_memory(self):
        yield self.serve()
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                                       Counting(pause_after=10 * MB))
        self.addCleanup(lambda: client.transport.loseConnection())
        client.transport.write(request("GET", f"/big?{self.SIZE}", headers={"Connection": "close"}))
        written_at_pause: list[int] = []
        client.paused.addCallback(lambda received: written_at_pause.append(
            self.upstream.generators[0].written - received))
        peak = yield self.watch(client.closed)
        self.assertTrue(client.head.startswith(b"HTTP/1.1 200 OK"))
        self.assertGreater(client.received, self.SIZE)
        self.assertLess(client.received, self.SIZE + 1000)
        self.assertLess(written_at_pause[0], BOUND)
        self.assertLess(peak, BOUND)
        self.assertSplicedAndOver(0, 1)


class SplicedFailureTests(SpliceCase):
    @defer.inlineCallbacks
    def test_stalled_spliced_body_is_408_on_a_clock(self):
        yield self.serve(server_options={"body-timeout": 5})
        clock = Clock()
        self.gateway.binding("http0").reactor = clock
        client = yield self.client()
        client.send(request("POST", "/count", None, {"Content-Length": str(MB)}) + b"a" * 1000)
        yield eventually(lambda: self.upstream.requests and self.upstream.requests[0]["size"] == 1000)
        client.send(b"b" * 300_000)  # moved by the splice: progress at the clock's 1 s
        clock.advance(1)
        yield eventually(lambda: self.upstream.requests[0]["size"] == 301_000)
        self.assertEqual(len(self.spliced(plain.ServerExchange)), 1)
        clock.advance(5.5)  # 5.5 s since the last progress, 6.5 since the first bytes
        clock.advance(0)
        yield eventually(lambda: client.is_closed)
        self.assertTrue(client.raw.startswith(b"HTTP/1.1 408 "), client.raw[:80])
        yield eventually(lambda: self.upstream.lost == 1)
        self.assertTrue(all(s.over for s in self.splices))

    @defer.inlineCallbacks
    def test_progress_keeps_a_spliced_body_alive_on_a_clock(self):
        yield self.serve(server_options={"body-timeout": 5})
        clock = Clock()
        self.gateway.binding("http0").reactor = clock
        client = yield self.client()
        client.send(request("POST", "/count", None, {"Content-Length": str(2 * MB)}) + b"a" * 1000)
        yield eventually(lambda: self.upstream.requests and self.upstream.requests[0]["size"] == 1000)
        moved = 1000
        for _ in range(4):  # 4 s apart: never 5 s without progress
            clock.advance(4)
            client.send(b"b" * 100_000)
            moved += 100_000
            yield eventually(lambda expected=moved: self.upstream.requests[0]["size"] == expected)
        client.send(b"c" * (2 * MB - moved))
        (answer,) = yield client.responses(1)
        self.assertEqual(json.loads(answer.body)["size"], 2 * MB)
        self.assertSplicedAndOver(1, 0)

    @defer.inlineCallbacks
    def test_client_leaving_mid_spliced_body_closes_the_upstream(self):
        yield self.serve()
        client = yield self.client()
        client.send(request("POST", "/count", None, {"Content-Length": str(10 * MB)}) + b"x" * 1000)
        yield eventually(lambda: self.upstream.requests and self.upstream.requests[0]["size"] == 1000)
        client.send(b"y" * 500_000)
        yield eventually(lambda: self.upstream.requests[0]["size"] == 501_000)
        self.assertEqual(len(self.spliced(plain.ServerExchange)), 1)
        client.transport.abortConnection()
        yield eventually(lambda: self.upstream.lost == 1)
        self.assertTrue(all(s.over for s in self.splices))

    @defer.inlineCallbacks
    def test_upstream_leaving_mid_spliced_response_cuts_the_client_off(self):
        yield self.serve()
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                                       Counting(pause_after=None))
        self.addCleanup(lambda: client.transport.loseConnection())
        client.transport.write(request("GET", f"/big?{1000 * MB}"))
        yield eventually(lambda: client.received > 5 * MB)
        self.assertEqual(len(self.spliced(http_client.UpstreamExchange)), 1)
        self.upstream.generators[0].stopProducing()
        self.upstream.connections[0].transport.abortConnection()
        yield client.closed
        self.assertLess(client.received, 1000 * MB)
        self.assertTrue(all(s.over for s in self.splices))
