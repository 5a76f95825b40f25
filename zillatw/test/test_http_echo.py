"""http.echo: echo behind an http server answers each plain request with its body and
content-type (Zilla's http.echo example, conf/http.echo.yaml, driven as its README does
with curl: here treq, over http and https)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet import ssl as tssl
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from zillatw.bindings.echo.binding import EchoServer
from zillatw.stream import HttpHead, IHttpRequestExit
from zillatw.test.http_support import connect_http, plain_chain, request
from zillatw.test.netns import ExampleNetwork
from zillatw.test.process_support import generate_keystores
from zillatw.test.support import eventually, start_gateway


class Recorder:
    """A server end that records what echo answers (pausing is recorded too)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def exchange_head(self, head: HttpHead) -> None:
        self.calls.append(("head", head.headers, head.length))

    def exchange_data(self, data: bytes) -> None:
        self.calls.append(("data", data))

    def exchange_end(self) -> None:
        self.calls.append(("end",))

    def exchange_abort(self, status: int, reason: str, detail: str) -> None:
        self.calls.append(("abort", status))

    def pauseProducing(self) -> None:
        self.calls.append(("pause",))

    def resumeProducing(self) -> None:
        self.calls.append(("resume",))

    def stopProducing(self) -> None:
        self.calls.append(("stop",))


class EchoExchangeTests(unittest.TestCase):
    def test_echo_answers_with_the_request(self):
        echo = EchoServer()
        self.assertTrue(IHttpRequestExit.providedBy(echo))
        peer = Recorder()
        end = echo.open_request(HttpHead({":method": "POST", "content-type": "text/plain", "x-other": "1"}, 5),
                                peer, 1)
        end.exchange_data(b"hel")
        end.pauseProducing()
        end.exchange_data(b"lo")
        end.exchange_end()
        self.assertEqual(peer.calls, [("head", {":status": "200", "content-type": "text/plain"}, 5),
                                      ("data", b"hel"), ("pause",), ("data", b"lo"), ("end",)])

    def test_bodiless_request_answered_at_once(self):
        peer = Recorder()
        EchoServer().open_request(HttpHead({":method": "GET"}, 0), peer, 1)
        self.assertEqual(peer.calls, [("head", {":status": "200"}, 0), ("end",)])

    def test_streamed_request_streams_back(self):
        peer = Recorder()
        EchoServer().open_request(HttpHead({":method": "POST"}, None), peer, 1)
        self.assertEqual(peer.calls, [("head", {":status": "200"}, None)])

    @defer.inlineCallbacks
    def test_response_starts_before_the_request_ends(self):
        gateway, port = yield start_gateway(self, plain_chain())
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/", None, {"Transfer-Encoding": "chunked"}) + b"6\r\nfirst \r\n")
        yield eventually(lambda: b"first " in client.raw)
        client.send(b"4\r\nlast\r\n0\r\n\r\n")
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.body, b"first last")


class HttpEchoExampleTests(unittest.TestCase):
    """conf/http.echo.yaml unchanged, on 7114 and 7143 in a network namespace of the test's own
    (zillatw.test.netns), with the keystores conf/tls/generate-keystore.py makes."""

    @defer.inlineCallbacks
    def setUp(self):
        self.network = ExampleNetwork(self)
        self.folder = Path(self.mktemp())
        yield generate_keystores(self, self.folder / "tls")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(self.pool.closeCachedConnections)

    @defer.inlineCallbacks
    def test_http_echo_as_its_readme_shows(self):
        http_port, https_port = self.network.port(7114), self.network.port(7143)
        gateway, _ = yield start_gateway(self, self.network.config("http.echo.yaml", self.folder))
        server = gateway.binding("north_http_server")
        connections: list[Any] = []
        build = server.buildProtocol
        server.buildProtocol = lambda addr: connections.append(addr) or build(addr)
        ca = tssl.Certificate.loadPEM((self.folder / "tls" / "localhost.crt").read_bytes())
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca), pool=self.pool)
        for url in (f"http://localhost:{http_port}/", f"https://localhost:{https_port}/"):
            # curl -d "Hello, world" -H "Content-Type: text/plain" -X "POST" URL
            for _ in range(2):  # twice: the second request rides the kept-alive connection
                response = yield treq.request("POST", url, data=b"Hello, world",
                                              headers={"Content-Type": "text/plain"}, agent=agent)
                self.assertEqual(response.code, 200)
                self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/plain"])
                self.assertEqual((yield treq.content(response)), b"Hello, world")
        events = gateway.events_text.getvalue()
        self.assertEqual(events.count("BINDING_HTTP_REQUEST_ACCEPTED"), 4)
        self.assertIn(f"POST https://localhost:{https_port}/", events)
        self.assertEqual(len(connections), 2)  # one per scheme: kept alive for the second request

    @defer.inlineCallbacks
    def test_a_request_for_another_authority_is_404(self):
        http_port = self.network.port(7114)
        yield start_gateway(self, self.network.config("http.echo.yaml", self.folder))
        response = yield treq.request("POST", f"http://127.0.0.1:{http_port}/", data=b"x",
                                      agent=Agent(reactor, pool=self.pool))
        self.assertEqual(response.code, 404)
        yield treq.content(response)


class MeteredEchoTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_echo_recording_metrics_still_answers_plain_requests(self):
        config = plain_chain()
        config["telemetry"]["metrics"] = ["stream.opens.received", "stream.active.received",
                                          "http.active.requests", "http.duration"]
        config["bindings"]["echo0"]["telemetry"] = {"metrics": ["stream.*"]}
        config["bindings"]["http0"]["telemetry"] = {"metrics": ["stream.*", "http.*"]}
        gateway, port = yield start_gateway(self, config)
        self.assertTrue(IHttpRequestExit.providedBy(gateway.graph.exit("test:echo0", gateway.config.binding(
            "test:http0"))))
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/", b"metered"))
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.body, b"metered")


class EchoBackPressureTests(unittest.TestCase):
    SIZE = 200 * 1000 * 1000
    BOUND = 64 * 1024 * 1024

    @defer.inlineCallbacks
    def test_a_client_not_reading_its_echo_stops_being_read(self):
        """200 MB sent to echo by a client that reads nothing for a second: the gateway
        stops reading it (what was sent meanwhile is bounded by socket buffers), then the
        whole body comes back once it reads."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.task import deferLater

        from zillatw.test.http_support import Counting, Sender
        gateway, port = yield start_gateway(self, plain_chain())
        client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Counting(pause_after=None))
        client.transport.pauseProducing()
        client.transport.write(request("POST", "/", None, {"Content-Length": str(self.SIZE), "Connection": "close"}))
        sender = Sender(client.transport, self.SIZE, chunked=False)
        sender.start()
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertLess(self.SIZE - max(sender.left, 0), self.BOUND)
        client.transport.resumeProducing()
        yield client.closed
        self.assertTrue(client.head.startswith(b"HTTP/1.1 200 OK"))
        self.assertGreater(client.received, self.SIZE)
        self.assertLess(client.received, self.SIZE + 200)
