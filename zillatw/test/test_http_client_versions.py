"""An http client with `versions: [http/1.1, h2]` (zillatw.bindings.http.clientversions), as
Zilla's http.json.schema example has it: over cleartext an h2c upgrade offered, which an
HTTP/1.1-only web server (twisted.web) ignores and an h2c server (one written here with the
h2 library) takes; over tls the version ALPN chose (h2, or http/1.1), to an upstream that is
a second tls + http server of the same gateway in front of echo. Response validation on
either: an invalid response is cut off, its h2 stream reset (the upstream connection serves
on) or its HTTP/1.1 connection closed."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from zillatw.test import pki
from zillatw.test.http_support import connect_http, request
from zillatw.test.pki import PASSWORD, TlsTestCase
from zillatw.test.support import eventually, free_port, start_gateway

BOTH = ["http/1.1", "h2"]
SCHEMA = '{"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}'
CATALOGS = {"my_catalog": {"type": "inline", "options": {"subjects": {"item": {"schema": SCHEMA}}}}}
TYPED = [{"path": "/item", "responses": [{"status": 200, "content-type": ["application/json"], "content": {
    "model": "json", "catalog": {"my_catalog": [{"subject": "item"}]}}}]}]


def chain(upstream_port: int, client_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """tcp0 (port 0) -> http0 -> client0 (both versions) -> tcpc -> upstream_port."""
    return {"name": "test", "catalogs": CATALOGS, "bindings": {
        "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 0}, "exit": "http0"},
        "http0": {"type": "http", "kind": "server", "exit": "client0"},
        "client0": {"type": "http", "kind": "client", "options": {"versions": BOTH, **(client_options or {})},
                    "exit": "tcpc"},
        "tcpc": {"type": "tcp", "kind": "client", "options": {"host": "127.0.0.1", "port": upstream_port}},
    }, "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}


@defer.inlineCallbacks
def exchange(port: int, raw: bytes, count: int = 1) -> Any:
    client = yield connect_http(port)
    client.send(raw)
    replies = yield client.responses(count)
    client.transport.loseConnection()
    return replies


class H2cServer(Protocol):
    """An upstream that takes the h2c upgrade (RFC 7540 §3.2): it answers 101, then every
    request (the upgraded one on stream 1) with `h2 <path> <body>`, recording the heads."""

    transport: Any

    def __init__(self, heads: list[bytes]):
        self.heads = heads
        self.buffer = b""
        self.h2: Any = None
        self.requests: dict[int, list[bytes]] = {}

    def dataReceived(self, data: bytes) -> None:
        if self.h2 is None:
            self.buffer += data
            head, found, data = self.buffer.partition(b"\r\n\r\n")
            if not found:
                return
            self.heads.append(head)
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
            self.h2.initiate_upgrade_connection(fields[b"http2-settings"])
            self.answer(1, head.split(b" ")[1], b"")
        for event in self.h2.receive_data(data) if data else ():
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = [dict(event.headers)[b":path"]]
            elif isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id].append(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                path, *body = self.requests.pop(event.stream_id)
                self.answer(event.stream_id, path, b"".join(body))
        self.transport.write(self.h2.data_to_send())

    def answer(self, stream_id: int, path: bytes, body: bytes) -> None:
        payload = b"h2 " + path + b" " + body
        self.h2.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"text/plain"),
                                         (b"content-length", str(len(payload)).encode())])
        self.h2.send_data(stream_id, payload, end_stream=True)
        self.transport.write(self.h2.data_to_send())


class CleartextTests(TlsTestCase):
    @defer.inlineCallbacks
    def test_http11_to_an_http11_only_web_server_that_ignores_the_h2c_offer(self):
        root = Resource()
        root.putChild(b"valid.json", Data(b'{"id": 42}', "application/json"))
        site = Site(root)
        site.log = lambda request: None  # type: ignore[method-assign]
        upstream = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(upstream.stopListening)
        gateway, port = yield start_gateway(self, chain(upstream.getHost().port))
        replies = yield exchange(port, request("GET", "/valid.json") + request("GET", "/valid.json"), 2)
        self.assertEqual([(r.status, r.body) for r in replies], [(200, b'{"id": 42}')] * 2)
        forwarder = gateway.binding("client0").forwarder
        self.assertEqual(list(forwarder.spoken.values()), ["http/1.1"])
        (pool,) = forwarder.pools.values()
        self.assertEqual(pool.opened, 1)  # the connection that told the version served both
        self.assertEqual(forwarder.h2_pools, {})

    @defer.inlineCallbacks
    def test_an_h2c_server_that_takes_the_upgrade_is_spoken_to_in_http2(self):
        heads: list[bytes] = []
        upstream = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: H2cServer(heads)))
        self.addCleanup(upstream.stopListening)
        gateway, port = yield start_gateway(self, chain(upstream.getHost().port))
        clients = []
        for path, body in (("/first", None), ("/second", b"waited for the 101")):
            client = yield connect_http(port)  # both before the upgrade's answer
            self.addCleanup(client.transport.loseConnection)
            client.send(request("POST" if body else "GET", path, body))
            clients.append(client)
        replies = []
        for client in clients:
            (reply,) = yield client.responses(1)
            replies.append((reply.status, reply.body))
        self.assertEqual(replies, [(200, b"h2 /first "), (200, b"h2 /second waited for the 101")])
        (head,) = heads  # one HTTP/1.1 request, with the offer; the second went as stream 3
        self.assertIn(b"upgrade: h2c", head)
        self.assertIn(b"connection: Upgrade, HTTP2-Settings", head)
        forwarder = gateway.binding("client0").forwarder
        self.assertEqual(list(forwarder.spoken.values()), ["h2"])
        (h2_pool,) = forwarder.h2_pools.values()
        self.assertEqual(h2_pool.opened, 1)
        self.assertEqual([pool.total for pool in forwarder.pools.values()], [0])  # it left the HTTP/1.1 pool
        replies = yield exchange(port, request("GET", "/third"))
        self.assertEqual([(r.status, r.body) for r in replies], [(200, b"h2 /third ")])
        self.assertEqual(h2_pool.opened, 1)


class OverTlsTests(TlsTestCase):
    """The client's tls client offers [h2, http/1.1]; the upstream's tls server chooses."""

    def config(self, upstream_alpn: list[str]) -> dict[str, Any]:
        upstream_port = free_port()
        config = chain(upstream_port, {"requests": TYPED})
        trust = pki.write(self.folder / "truststore.p12",
                          pki.truststore_p12({"backend": self.pki.ca.certificate}, PASSWORD))
        config["vaults"] = {
            "server": {"type": "filesystem", "options": {"keys": {"store": self.keystore(), "password": PASSWORD}}},
            "clients": {"type": "filesystem", "options": {"trust": {"store": trust, "password": PASSWORD}}}}
        config["bindings"]["client0"]["exit"] = "tlsc"
        config["bindings"].update({
            "tlsc": {"type": "tls", "kind": "client", "vault": "clients", "exit": "tcpc",
                     "options": {"trust": ["backend"], "sni": ["localhost"], "alpn": ["h2", "http/1.1"]}},
            "tcp1": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": upstream_port},
                     "exit": "tls1"},
            "tls1": {"type": "tls", "kind": "server", "vault": "server", "exit": "http1",
                     "options": {"keys": ["localhost"], "alpn": upstream_alpn}},
            "http1": {"type": "http", "kind": "server", "options": {"versions": BOTH}, "exit": "echo0"},
            "echo0": {"type": "echo", "kind": "server"},
        })
        return config

    @defer.inlineCallbacks
    def serve(self, upstream_alpn: list[str]) -> Any:
        self.gateway, port = yield start_gateway(self, self.config(upstream_alpn))
        self.forwarder = self.gateway.binding("client0").forwarder
        return port

    @defer.inlineCallbacks
    def concurrent(self, port: int, count: int) -> Any:
        """`count` requests at once, each on a connection of its own (all before the probe connects)."""
        clients = []
        for _ in range(count):
            client = yield connect_http(port)
            self.addCleanup(client.transport.loseConnection)
            clients.append(client)
        for n, client in enumerate(clients):
            client.send(request("POST", "/echo", f"body {n}".encode(), {"Content-Type": "text/plain"}))
        replies = []
        for client in clients:
            (reply,) = yield client.responses(1)
            replies.append((reply.status, reply.body))
        return replies

    @defer.inlineCallbacks
    def test_alpn_choosing_h2_speaks_http2_on_the_connection_that_told_it(self):
        port = yield self.serve(["h2", "http/1.1"])
        replies = yield self.concurrent(port, 3)
        self.assertEqual(replies, [(200, f"body {n}".encode()) for n in range(3)])
        self.assertEqual(list(self.forwarder.spoken.values()), ["h2"])
        (h2_pool,) = self.forwarder.h2_pools.values()
        self.assertEqual(h2_pool.opened, 1)  # three streams of the probe's connection
        self.assertEqual(self.forwarder.pools, {})
        (upstream,) = self.gateway.binding("http1").h2_connections
        self.assertEqual(upstream.transport.negotiatedProtocol, b"h2")
        replies = yield self.concurrent(port, 1)  # the version known: straight to the connection
        self.assertEqual((replies, h2_pool.opened), ([(200, b"body 0")], 1))

    @defer.inlineCallbacks
    def test_alpn_choosing_http11_speaks_http11(self):
        port = yield self.serve(["http/1.1"])
        replies = yield self.concurrent(port, 2)
        self.assertEqual(replies, [(200, b"body 0"), (200, b"body 1")])
        self.assertEqual(list(self.forwarder.spoken.values()), ["http/1.1"])
        (pool,) = self.forwarder.pools.values()
        self.assertEqual(pool.opened, 2)  # the probe's, then one more for the second request
        self.assertEqual((self.forwarder.h2_pools, self.gateway.binding("http1").h2_connections), ({}, set()))

    @defer.inlineCallbacks
    def invalid_then_valid(self) -> Any:
        """An invalid response is cut off (head sent, body never); then a valid one is whole."""
        client = yield connect_http(port := self.port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/item", b'{"id": "not a number"}', {"Content-Type": "application/json"}))
        yield eventually(lambda: client.is_closed)
        head, _, body = client.raw.partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", head)
        self.assertEqual(body, b"")
        self.assertIn("MODEL_JSON_VALIDATION_FAILED - POST /item response content", self.gateway.events_text.getvalue())
        replies = yield exchange(port, request("POST", "/item", b'{"id": 7}', {"Content-Type": "application/json"}))
        self.assertEqual([(r.status, r.body) for r in replies], [(200, b'{"id": 7}')])

    @defer.inlineCallbacks
    def test_an_invalid_response_over_h2_resets_its_stream_only(self):
        self.port = yield self.serve(["h2"])
        yield self.invalid_then_valid()
        (h2_pool,) = self.forwarder.h2_pools.values()
        self.assertEqual(h2_pool.opened, 1)  # the stream was reset, the connection served on
        self.assertEqual(len(self.gateway.binding("http1").h2_connections), 1)

    @defer.inlineCallbacks
    def test_an_invalid_response_over_http11_closes_its_connection(self):
        self.port = yield self.serve(["http/1.1"])
        yield self.invalid_then_valid()
        (pool,) = self.forwarder.pools.values()
        self.assertEqual(pool.opened, 2)  # the invalid response's connection was closed
