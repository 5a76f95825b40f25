"""HTTP/2 on the http server, end to end over loopback with a real HTTP/2 client (the `h2`
library driving a socket): h2c with prior knowledge and h2 over TLS by ALPN, Zilla's
http.echo, concurrent streams, flow control both ways, refusals, GOAWAY on drain, SETTINGS
limits, and the idle timeout on a Clock."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from zillatw.bindings.http import h2server, h2stream
from zillatw.test import pki
from zillatw.test.h2_support import H2Client, connect_h2c, h2_options
from zillatw.test.http_support import connect_http, plain_chain, request
from zillatw.test.pki import PASSWORD, ROLE, Signer, client_tls, guarded_config, tls_chain
from zillatw.test.support import OnAClock, eventually, start_gateway


class H2cTests(unittest.TestCase):
    """Cleartext HTTP/2 with prior knowledge, beside HTTP/1.1 on the same port."""

    @defer.inlineCallbacks
    def start(self, http_options: dict[str, Any] | None = None, routes: list[dict[str, Any]] | None = None) -> Any:
        config = plain_chain(http_options)
        if routes is not None:
            config["bindings"]["http0"]["routes"] = routes
        self.gateway, port = yield start_gateway(self, config)
        return port

    @defer.inlineCallbacks
    def test_echo_over_h2c_and_http11_on_the_same_port(self):
        port = yield self.start()
        client = yield connect_h2c(self, port)
        stream = client.request("POST", "/echo?access_token=secret", b"hello h2",
                                {"content-type": "text/plain"})
        yield eventually(lambda: client.done(stream))
        response = client.responses[stream]
        self.assertEqual(response["headers"][":status"], "200")
        self.assertEqual(response["headers"]["content-type"], "text/plain")
        self.assertEqual(response["body"], b"hello h2")
        events = self.gateway.events_text.getvalue()
        self.assertIn("POST http://localhost:80/echo?access_token=REDACTED", events)
        self.assertNotIn("secret", events)
        http11 = yield connect_http(port)  # the default versions take both
        http11.transport.write(request("POST", "/", b"plain"))
        replies = yield http11.responses(1)
        self.assertEqual(replies[0].body, b"plain")
        http11.transport.loseConnection()

    @defer.inlineCallbacks
    def test_many_concurrent_streams(self):
        port = yield self.start()
        client = yield connect_h2c(self, port)
        streams = {client.request("POST", f"/{n}", f"body {n}".encode() * 100, end=False): n for n in range(60)}
        for stream_id in streams:  # all open at once: then every body ends
            client.send_body(stream_id, b"!", end=True)
        yield eventually(lambda: all(client.done(s) for s in streams))
        for stream_id, n in streams.items():
            self.assertEqual(client.responses[stream_id]["body"], f"body {n}".encode() * 100 + b"!")

    @defer.inlineCallbacks
    def test_a_slow_reader_pauses_the_body_and_memory_stays_bounded(self):
        port = yield self.start()
        client = yield connect_h2c(self, port, acking=False)
        body = bytes(range(256)) * 4096  # 1 MiB, far beyond every window
        stream = client.request("POST", "/", headers={"content-length": str(len(body))}, end=False)
        rest = client.send_body(stream, body)
        yield eventually(lambda: len(client.responses.get(stream, {}).get("body", b"")) >= 65535)
        (server,) = self.gateway_http().h2_connections
        for _ in range(20):
            yield eventually(lambda: True)
        echoed = len(client.responses[stream]["body"])
        self.assertLessEqual(echoed, 65535)  # our window, never acknowledged
        held = sum(len(s.outbound) + sum(len(d) for d, _ in s.inbound) for s in server.streams.values())
        self.assertLessEqual(held, h2stream.SEND_BOUND + 2 * h2server.STREAM_WINDOW)
        self.assertGreater(len(rest), 0)  # the server gave no more window than it could hold
        client.ack_all()

        def pump() -> bool:
            nonlocal rest
            if rest:
                rest = client.send_body(stream, rest)
            return client.done(stream)
        yield eventually(pump, timeout=20)
        self.assertEqual(client.responses[stream]["body"], body)

    @defer.inlineCallbacks
    def test_a_stream_reset_with_unread_data_gives_its_window_back(self):
        port = yield self.start()
        client = yield connect_h2c(self, port, acking=False)
        stuck = client.request("POST", "/", end=False)
        unsent = client.send_body(stuck, b"x" * 400000, end=False)
        yield eventually(lambda: self.gateway_http().h2_connections)
        (server,) = self.gateway_http().h2_connections

        def fill() -> bool:  # until echo is paused (its answer unread) and our data waits unacknowledged
            nonlocal unsent
            unsent = client.send_body(stuck, unsent, end=False)
            return bool(server.streams[stuck].paused_by_exit and server.streams[stuck].inbound)
        yield eventually(fill)
        client.h2.reset_stream(stuck)
        client.ack_all()  # what it read of the reset stream: the server's window back
        body = b"y" * 200000  # more than the connection's window: it must have been given back
        stream = client.request("POST", "/", end=False)
        rest = client.send_body(stream, body)

        def pump() -> bool:
            nonlocal rest
            if rest:
                rest = client.send_body(stream, rest)
            return client.done(stream)
        yield eventually(pump, timeout=10)
        self.assertEqual(client.responses[stream]["body"], body)

    def gateway_http(self) -> Any:
        return next(b for b in self.gateway.generation.bindings.values() if hasattr(b, "h2_connections"))

    @defer.inlineCallbacks
    def test_refusals_on_the_stream(self):
        port = yield self.start(routes=[{"when": [{"headers": {":path": "/open*"}}], "exit": "echo0"}])
        client = yield connect_h2c(self, port)
        missing = client.request("GET", "/closed")
        connect = client.h2.get_next_available_stream_id()
        client.h2.send_headers(connect, [(":method", "CONNECT"), (":authority", "localhost:443")])
        client.flush()
        ok = client.request("GET", "/open")
        yield eventually(lambda: all(client.done(s) for s in (missing, connect, ok)))
        self.assertEqual(client.responses[missing]["headers"][":status"], "404")
        self.assertEqual(client.responses[missing]["body"], b"no route for GET /closed\n")
        self.assertEqual(client.responses[connect]["headers"][":status"], "501")
        self.assertEqual(client.responses[ok]["headers"][":status"], "200")
        self.assertIsNone(client.goaway())  # stream refusals leave the connection be

    @defer.inlineCallbacks
    def test_a_refused_header_value_is_not_written_to_the_events(self):
        """h2 quotes a refused value in its error: an authorization with a NUL in it would
        reach the event log."""
        port = yield self.start()
        client = yield connect_h2c(self, port)
        stream = client.h2.get_next_available_stream_id()
        client.h2.config.validate_outbound_headers = False  # h2 would refuse to send it
        client.h2.send_headers(stream, [(":method", "GET"), (":scheme", "http"), (":authority", "localhost"),
                                        (":path", "/"), ("authorization", "Bearer sekret-token\x00")], end_stream=True)
        client.h2.config.validate_outbound_headers = True
        client.flush()
        yield eventually(lambda: client.done(stream))
        self.assertEqual(client.responses[stream]["reset"], h2.errors.ErrorCodes.PROTOCOL_ERROR)
        events = self.gateway.events_text.getvalue()
        self.assertIn("400 malformed request on stream 1: Illegal character (not shown) in header value: (not shown)",
                      events)
        self.assertNotIn("sekret", events)

    @defer.inlineCallbacks
    def test_a_get_to_a_websocket_route_is_not_an_upgrade(self):
        port = yield self.start(routes=[{"exit": "ws0"}])
        client = yield connect_h2c(self, port)
        stream = client.request("GET", "/")
        yield eventually(lambda: client.done(stream))
        # as HTTP/1.1's GET without Upgrade; the WebSocket's extended CONNECT is test_h2_websocket's
        self.assertEqual(client.responses[stream]["headers"][":status"], "400")
        self.assertIn(b"RFC 8441", client.responses[stream]["body"])

    @defer.inlineCallbacks
    def test_goaway_on_drain_serves_the_open_stream(self):
        port = yield self.start()
        client = yield connect_h2c(self, port)
        stream = client.request("POST", "/", b"first", end=False)
        yield eventually(lambda: self.gateway_http().h2_connections)
        self.gateway_http().going_away()
        yield eventually(lambda: client.goaway() is not None)
        self.assertEqual(client.goaway().last_stream_id, stream)
        self.assertEqual(client.goaway().error_code, 0)
        client.send_body(stream, b"-last")
        yield eventually(lambda: client.done(stream) and client.lost)
        self.assertEqual(client.responses[stream]["body"], b"first-last")

    @defer.inlineCallbacks
    def test_too_many_streams_is_a_protocol_error(self):
        port = yield self.start()
        client = yield connect_h2c(self, port)
        # sent before the server's SETTINGS is read, so our client does not hold them back
        for n in range(h2server.MAX_CONCURRENT_STREAMS + 1):
            client.request("POST", f"/{n}", end=False)
        yield eventually(lambda: client.goaway() is not None)
        self.assertEqual(client.goaway().error_code, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        settings = next(e for e in client.events if isinstance(e, h2.events.RemoteSettingsChanged))
        limits = {code: change.new_value for code, change in settings.changed_settings.items()}
        self.assertEqual(limits[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS], 100)
        self.assertEqual(limits[h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE], 8192)
        self.assertEqual(limits[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE], h2server.STREAM_WINDOW)

    @defer.inlineCallbacks
    def test_a_header_list_beyond_the_limit_ends_the_connection(self):
        port = yield self.start()
        client = yield connect_h2c(self, port)
        first = client.request("GET", "/")
        yield eventually(lambda: client.done(first))  # our ACK of its SETTINGS has reached it
        big = client.request("GET", "/", headers={"x-big": "a" * 9000})
        yield eventually(lambda: client.goaway() is not None or client.done(big))
        self.assertFalse(client.done(big))
        self.assertEqual(client.goaway().error_code, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    @defer.inlineCallbacks
    def test_h2_only_refuses_http11(self):
        port = yield self.start(h2_options(["h2"]))
        http11 = yield connect_http(port)
        http11.transport.write(request("GET", "/"))
        replies = yield http11.responses(1)
        self.assertEqual(replies[0].status, 505)
        client = yield connect_h2c(self, port)
        stream = client.request("GET", "/")
        yield eventually(lambda: client.done(stream))
        self.assertEqual(client.responses[stream]["headers"][":status"], "200")

    @defer.inlineCallbacks
    def test_http11_only_does_not_take_the_preface(self):
        port = yield self.start(h2_options(["http/1.1"]))
        raw = yield connect_http(port)
        raw.transport.write(h2server.PREFACE)
        replies = yield raw.responses(1)
        self.assertEqual(replies[0].status, 505)  # read as HTTP/1.1: `PRI * HTTP/2.0`


class H2IdleTimeoutTests(unittest.TestCase):
    def test_an_idle_connection_gets_goaway_and_closes(self):
        gateway = OnAClock(plain_chain({"idle-timeout": 5}))
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        server = _, transport = gateway.connect(client_port=40001)
        server[0].dataReceived(client.data_to_send())
        client.receive_data(transport.value())
        transport.clear()
        gateway.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        gateway.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        (event,) = [e for e in client.receive_data(transport.value()) if isinstance(e, h2.events.ConnectionTerminated)]
        self.assertEqual(event.error_code, 0)


    def test_a_stalled_request_body_costs_its_stream_not_the_connection(self):
        gateway = OnAClock(plain_chain({"body-timeout": 3, "idle-timeout": 60}))
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        protocol, transport = gateway.connect()
        stalled = client.get_next_available_stream_id()
        client.send_headers(stalled, [(":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                                      (":path", "/")])
        client.send_data(stalled, b"part")
        protocol.dataReceived(client.data_to_send())
        gateway.clock.advance(2)
        client.send_data(stalled, b"more")  # progress: the wait starts again
        protocol.dataReceived(client.data_to_send())
        gateway.clock.advance(2.9)
        events = client.receive_data(transport.value())
        transport.clear()
        self.assertFalse(any(isinstance(e, h2.events.StreamEnded) for e in events))
        gateway.clock.advance(0.2)
        events = client.receive_data(transport.value())
        # echo had answered at once: the response is cut off with RST_STREAM
        (reset,) = [e for e in events if isinstance(e, h2.events.StreamReset)]
        self.assertEqual((reset.stream_id, reset.error_code), (stalled, h2.errors.ErrorCodes.INTERNAL_ERROR))
        self.assertFalse(transport.disconnecting)
        self.assertIn("408 request body stalled for 3 s", gateway.events.getvalue())


class H2OverTlsTests(unittest.TestCase):
    """h2 by ALPN on a tls server in front of the http server (alpn: [h2, http/1.1])."""

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        self.ca = pki.make_ca()
        localhost = pki.issue(self.ca, "localhost", dns=["localhost"], ips=["127.0.0.1"])
        self.store = pki.write(folder / "localhost.p12", localhost.p12("localhost", PASSWORD))

    @defer.inlineCallbacks
    def start(self) -> Any:
        config = tls_chain({"keys": {"store": self.store, "password": PASSWORD}},
                           {"keys": ["localhost"], "alpn": ["h2", "http/1.1"]},
                           http_routes=[{"exit": "echo"}])
        _, port = yield start_gateway(self, config)
        return port

    @defer.inlineCallbacks
    def test_h2_negotiated_by_alpn(self):
        port = yield self.start()
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, client_tls(self.ca, alpn=["h2", "http/1.1"]))
        client = yield connectProtocol(endpoint, H2Client())
        self.addCleanup(lambda: client.transport.abortConnection())
        stream = client.request("POST", "/tls", b"over tls", scheme="https")
        yield eventually(lambda: client.done(stream))
        self.assertEqual(client.transport.negotiatedProtocol, b"h2")
        self.assertEqual(client.responses[stream]["headers"][":status"], "200")
        self.assertEqual(client.responses[stream]["body"], b"over tls")

    @defer.inlineCallbacks
    def test_http11_negotiated_by_alpn_still_works(self):
        port = yield self.start()
        from zillatw.test.http_support import HttpClientConn
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, client_tls(self.ca, alpn=["http/1.1"]))
        client = yield connectProtocol(endpoint, HttpClientConn())
        self.addCleanup(lambda: client.transport.abortConnection())
        client.transport.write(request("POST", "/", b"one"))
        replies = yield client.responses(1)
        self.assertEqual(client.transport.negotiatedProtocol, b"http/1.1")
        self.assertEqual(replies[0].body, b"one")


class H2AdmissionTests(unittest.TestCase):
    """The rules an HTTP/1.1 request goes through apply to each HTTP/2 stream."""

    CROSS = {"access-control": {"policy": "cross-origin", "allow": {"origins": ["https://app.example"]}}}

    @defer.inlineCallbacks
    def exchange(self, config: dict[str, Any], *requests: dict[str, Any]) -> Any:
        self.gateway, port = yield start_gateway(self, config)
        client = yield connect_h2c(self, port)
        streams = [client.request(**r) for r in requests]
        yield eventually(lambda: all(client.done(s) for s in streams))
        return [client.responses[s] for s in streams], client

    @defer.inlineCallbacks
    def test_access_control_and_preflight(self):
        (preflight, foreign, allowed), client = yield self.exchange(
            plain_chain(copy.deepcopy(self.CROSS)),
            {"method": "OPTIONS", "headers": {"origin": "https://app.example",
                                              "access-control-request-method": "POST"}},
            {"method": "POST", "body": b"x", "headers": {"origin": "https://evil.example"}},
            {"method": "POST", "body": b"then", "headers": {"origin": "https://app.example"}})
        self.assertEqual(preflight["headers"][":status"], "204")
        self.assertEqual(preflight["headers"]["access-control-allow-origin"], "https://app.example")
        self.assertEqual(foreign["headers"][":status"], "403")
        self.assertEqual(allowed["body"], b"then")
        self.assertEqual(allowed["headers"]["access-control-allow-origin"], "https://app.example")
        self.assertIsNone(client.goaway())

    @defer.inlineCallbacks
    def test_max_request_body(self):
        (declared, streamed), _ = yield self.exchange(
            plain_chain({"max-request-body": 10}),
            {"method": "POST", "body": b"x" * 11, "headers": {"content-length": "11"}},
            {"method": "POST", "body": b"y" * 11})
        self.assertEqual(declared["headers"][":status"], "413")
        # echo had answered at once: the over-long body cuts its response off
        self.assertEqual(streamed.get("reset"), h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.assertEqual(streamed["body"], b"")
        self.assertIn("413 the request body exceeds 10 bytes", self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_the_guard_authorizes_each_stream(self):
        signer = Signer()
        config = guarded_config([signer.jwk])
        config["bindings"]["http0"]["routes"] = [{"guarded": {"jwt0": [ROLE]}, "exit": "echo0"}]
        config["bindings"]["echo0"] = {"type": "echo", "kind": "server"}
        (anonymous, bearer, query), _ = yield self.exchange(
            config,
            {"method": "POST", "body": b"no"},
            {"method": "POST", "body": b"yes", "headers": {"authorization": f"Bearer {signer.token()}"}},
            {"method": "POST", "path": f"/?access_token={signer.token()}", "body": b"query"})
        self.assertEqual(anonymous["headers"][":status"], "401")
        self.assertEqual(anonymous["headers"]["www-authenticate"], "Bearer")
        self.assertEqual(bearer["body"], b"yes")
        self.assertEqual(query["body"], b"query")
        events = self.gateway.events_text.getvalue()
        self.assertIn("alice POST http://localhost:80/?access_token=REDACTED", events)
        self.assertNotIn(signer.token().split(".")[0] + "." + signer.token().split(".")[1], events)
