"""The http client speaking HTTP/2 upstream (`versions: [h2]`): requests from HTTP/1.1 and
HTTP/2 clients forwarded as streams of one upstream connection, here to a second http
server of the same gateway that speaks h2 only (h2c prior knowledge) in front of echo."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from zillatw.test import pki
from zillatw.test.h2_support import connect_h2c
from zillatw.test.http_support import connect_http, request
from zillatw.test.pki import PASSWORD, TlsTestCase
from zillatw.test.support import eventually, free_port, start_gateway


def h2_proxy_chain(upstream_port: int, upstream_up: bool = True) -> dict[str, Any]:
    """tcp0 (port 0) -> http0 -> http client (h2) -> tcp client -> [tcp1 -> http1 (h2 only) -> echo]."""
    bindings: dict[str, Any] = {
        "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 0}, "exit": "http0"},
        "http0": {"type": "http", "kind": "server", "exit": "client0"},
        "client0": {"type": "http", "kind": "client", "options": {"versions": ["h2"]}, "exit": "tcpc"},
        "tcpc": {"type": "tcp", "kind": "client", "options": {"host": "127.0.0.1", "port": upstream_port}},
    }
    if upstream_up:
        bindings.update({
            "tcp1": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": upstream_port},
                     "exit": "http1"},
            "http1": {"type": "http", "kind": "server", "options": {"versions": ["h2"]}, "exit": "echo0"},
            "echo0": {"type": "echo", "kind": "server"},
        })
    return {"name": "test", "bindings": bindings, "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}


class H2ClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, **kwargs: Any) -> Any:
        self.gateway, port = yield start_gateway(self, h2_proxy_chain(free_port(), **kwargs))
        return port

    def forwarder(self) -> Any:
        return self.gateway.binding("client0").forwarder

    @defer.inlineCallbacks
    def test_http11_requests_become_streams_of_one_upstream_connection(self):
        port = yield self.start()
        clients = []
        for n in range(5):
            client = yield connect_http(port)
            self.addCleanup(client.transport.loseConnection)
            client.send(request("POST", f"/{n}", f"body {n}".encode(), {"Content-Type": "text/plain"}))
            clients.append(client)
        for n, client in enumerate(clients):
            (reply,) = yield client.responses(1)
            self.assertEqual(reply.status, 200)
            self.assertEqual(reply.body, f"body {n}".encode())
            self.assertEqual(reply.headers["content-type"], "text/plain")
        (pool,) = self.forwarder().h2_pools.values()
        self.assertEqual(pool.opened, 1)  # multiplexed: one connection for all five
        self.assertEqual(len(self.gateway.binding("http1").h2_connections), 1)

    @defer.inlineCallbacks
    def test_a_large_body_both_ways_with_flow_control(self):
        port = yield self.start()
        client = yield connect_h2c(self, port)
        body = bytes(range(256)) * 4096  # 1 MiB: many windows on both legs
        stream = client.request("POST", "/", end=False)
        rest = client.send_body(stream, body)

        def pump() -> bool:
            nonlocal rest
            if rest:
                rest = client.send_body(stream, rest)
            return client.done(stream)
        yield eventually(pump, timeout=20)
        self.assertEqual(client.responses[stream]["headers"][":status"], "200")
        self.assertEqual(client.responses[stream]["body"], body)

    @defer.inlineCallbacks
    def test_a_slow_client_does_not_stall_the_other_streams_upstream(self):
        port = yield self.start()
        slow = yield connect_h2c(self, port, acking=False)
        stream = slow.request("POST", "/", end=False)
        unsent = slow.send_body(stream, b"s" * 400000, end=False)

        def fill() -> bool:  # until the slow reader's answer has stalled its upstream stream
            nonlocal unsent
            unsent = slow.send_body(stream, unsent, end=False)
            pools = list(self.forwarder().h2_pools.values())
            exchanges = pools[0].connection.streams.values() if pools and pools[0].connection else []
            return sum(sum(e.unacked) for e in exchanges) >= 60000
        yield eventually(fill)
        other = yield connect_http(port)
        self.addCleanup(other.transport.loseConnection)
        body = b"o" * 200000  # more than one 64 KiB window: the upstream connection must not be stalled
        other.send(request("POST", "/", body))
        answered = other.responses(1)
        # well before the slow stream's body-timeout (30 s), which would free the window anyway
        yield eventually(lambda: answered.called, timeout=10)
        (reply,) = yield answered
        self.assertEqual(reply.body, body)
        (pool,) = self.forwarder().h2_pools.values()
        self.assertEqual(pool.opened, 1)  # the same upstream connection carried both

    @defer.inlineCallbacks
    def test_an_unreachable_upstream_is_502(self):
        port = yield self.start(upstream_up=False)
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("GET", "/"))
        (reply,) = yield client.responses(1)
        self.assertEqual(reply.status, 502)
        self.assertIn("the upstream could not be reached", self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_after_the_upstreams_goaway_a_new_connection_serves(self):
        port = yield self.start()
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/", b"one"))
        (reply,) = yield client.responses(1)
        upstream = self.gateway.binding("http1")
        (connection,) = upstream.h2_connections
        upstream.going_away()  # GOAWAY: the idle connection closes
        yield eventually(lambda: not upstream.h2_connections)
        upstream.shutting_down = False  # as if it came back
        (pool,) = self.forwarder().h2_pools.values()
        yield eventually(lambda: pool.total == 0)
        client.send(request("POST", "/", b"two"))
        replies = yield client.responses(2)
        self.assertEqual([r.body for r in replies], [b"one", b"two"])
        self.assertEqual(pool.opened, 2)

    @defer.inlineCallbacks
    def test_shutdown_closes_the_idle_upstream_connection(self):
        port = yield self.start()
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("GET", "/"))
        yield client.responses(1)
        (pool,) = self.forwarder().h2_pools.values()
        self.assertEqual(self.forwarder().connection_count(), 1)
        self.gateway.binding("client0").going_away()
        yield eventually(lambda: pool.total == 0 and not self.gateway.binding("http1").h2_connections)


class H2ClientOverTlsTests(TlsTestCase):
    """An h2 http client over a tls client offering h2 by ALPN, to a tls + http server."""

    def chain(self, client_alpn: list[str], upstream_alpn: list[str], upstream_versions: list[str]) -> dict[str, Any]:
        upstream_port = free_port()
        config = h2_proxy_chain(upstream_port, upstream_up=False)
        store = self.keystore()
        trust = pki.write(self.folder / "truststore.p12",
                          pki.truststore_p12({"backend": self.pki.ca.certificate}, PASSWORD))
        config["vaults"] = {
            "server": {"type": "filesystem", "options": {"keys": {"store": store, "password": PASSWORD}}},
            "clients": {"type": "filesystem", "options": {"trust": {"store": trust, "password": PASSWORD}}}}
        config["bindings"]["client0"]["exit"] = "tlsc"
        config["bindings"].update({
            "tlsc": {"type": "tls", "kind": "client", "vault": "clients", "exit": "tcpc",
                     "options": {"trust": ["backend"], "sni": ["localhost"], "alpn": client_alpn}},
            "tcp1": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": upstream_port},
                     "exit": "tls1"},
            "tls1": {"type": "tls", "kind": "server", "vault": "server", "exit": "http1",
                     "options": {"keys": ["localhost"], "alpn": upstream_alpn}},
            "http1": {"type": "http", "kind": "server", "options": {"versions": upstream_versions}, "exit": "echo0"},
            "echo0": {"type": "echo", "kind": "server"},
        })
        return config

    @defer.inlineCallbacks
    def exchange(self, config: dict[str, Any], body: bytes) -> Any:
        self.gateway, port = yield start_gateway(self, config)
        client = yield connect_http(port)
        self.addCleanup(client.transport.loseConnection)
        client.send(request("POST", "/", body))
        (reply,) = yield client.responses(1)
        return reply

    @defer.inlineCallbacks
    def test_h2_negotiated_upstream(self):
        config = self.chain(["h2"], ["h2"], ["h2"])
        reply = yield self.exchange(config, b"over h2 and tls")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, b"over h2 and tls")
        (connection,) = self.gateway.binding("http1").h2_connections
        self.assertEqual(connection.transport.negotiatedProtocol, b"h2")

    @defer.inlineCallbacks
    def test_an_upstream_choosing_http11_is_502(self):
        reply = yield self.exchange(self.chain(["h2", "http/1.1"], ["http/1.1"], ["http/1.1"]), b"x")
        self.assertEqual(reply.status, 502)
        self.assertIn("the upstream does not speak HTTP/2 (ALPN chose b'http/1.1')",
                      self.gateway.events_text.getvalue())
