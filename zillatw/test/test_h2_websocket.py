"""WebSocket over HTTP/2 (RFC 8441) on the http server, end to end over loopback: a real
HTTP/2 client (the `h2` library) opens extended CONNECT streams and exchanges masked frames
made by the `websockets` library's sans-IO protocol with the ws server's echo exit, over
h2c with prior knowledge and over TLS by ALPN; refusals on HEADERS, malformed requests as
stream errors, back-pressure on the windows, multiplexing, and GOAWAY on drain."""

from __future__ import annotations

import copy
import time
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
from websockets.frames import Opcode

from zillatw.bindings.http import h2websocket
from zillatw.config.plugins import IDrainsGracefully
from zillatw.test import pki
from zillatw.test.h2_support import H2Client, H2WebSocket, connect_h2c
from zillatw.test.http_support import plain_chain
from zillatw.test.pki import PASSWORD, Signer, client_tls, guarded_config, tls_chain
from zillatw.test.support import (
    OnAClock,
    eventually,
    free_port,
    metered,
    proxy_config,
    start_gateway,
    start_upstream,
    value,
)
from zillatw.test.wire_support import close_payload, raw_frame, read_frames

CROSS = {"access-control": {"policy": "cross-origin", "allow": {"origins": ["https://app.example"]}}}


def texts(ws: H2WebSocket) -> list[tuple[Opcode, bytes, bool]]:
    return [(f.opcode, bytes(f.data), f.fin) for f in ws.data_frames()]


class H2WebSocketTests(unittest.TestCase):
    """h2c with prior knowledge: tcp -> http -> (upgrade: websocket) ws -> echo."""

    @defer.inlineCallbacks
    def start(self, config: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        self.gateway, port = yield start_gateway(self, config or plain_chain())
        client = yield connect_h2c(self, port, **kwargs)
        yield eventually(lambda: client.h2.remote_settings.enable_connect_protocol == 1)
        return client

    @defer.inlineCallbacks
    def opened(self, client: H2Client, **kwargs: Any) -> Any:
        ws = H2WebSocket(client, **kwargs)
        yield eventually(ws.answered)
        return ws

    def binding(self, name: str) -> Any:
        return self.gateway.generation.bindings[f"test:{name}"]

    @defer.inlineCallbacks
    def test_text_binary_fragments_ping_and_the_closing_handshake(self):
        client = yield self.start()
        ws = yield self.opened(client, path="/chat")
        self.assertEqual(ws.status, "200")
        self.assertNotIn("sec-websocket-accept", ws.response["headers"])  # RFC 8441 §5: no key, no accept
        ws.send_text("hello h2")
        ws.send_binary(b"\x00\x01\xff")
        ws.send_text("frag", fin=False)
        ws.send_continuation(b"mented", fin=True)
        ws.send_ping(b"are you there")
        yield eventually(lambda: len(ws.data_frames()) >= 4 and any(f.opcode is Opcode.PONG for f in ws.frames))
        self.assertEqual(texts(ws)[:2], [(Opcode.TEXT, b"hello h2", True), (Opcode.BINARY, b"\x00\x01\xff", True)])
        self.assertEqual(b"".join(data for _, data, _ in texts(ws)[2:]), b"fragmented")
        self.assertTrue(texts(ws)[-1][2])
        self.assertEqual(next(bytes(f.data) for f in ws.frames if f.opcode is Opcode.PONG), b"are you there")
        ws.send_close(1000, "bye")
        yield eventually(lambda: client.done(ws.stream_id))
        close = next(f for f in ws.frames if f.opcode is Opcode.CLOSE)
        self.assertEqual(close.data[:2], (1000).to_bytes(2, "big"))
        self.assertTrue(client.responses[ws.stream_id]["ended"])  # END_STREAM, not a reset
        self.assertNotIn("reset", client.responses[ws.stream_id])
        yield eventually(lambda: not self.binding("ws0").connections)
        self.assertIsNone(client.goaway())  # the connection stays for more streams
        events = self.gateway.events_text.getvalue()
        self.assertIn("GET http://localhost:80/chat", events)

    @defer.inlineCallbacks
    def test_permessage_deflate_is_negotiated_and_compresses(self):
        client = yield self.start()
        ws = yield self.opened(client, deflate=True)
        self.assertEqual(ws.status, "200")
        self.assertIn("permessage-deflate", ws.response["headers"]["sec-websocket-extensions"])
        message = "zilla " * 2000
        ws.send_text(message)
        yield eventually(lambda: ws.data_frames())
        self.assertEqual(bytes(ws.data_frames()[0].data), message.encode())
        self.assertLess(len(client.responses[ws.stream_id]["body"]), len(message) // 10)  # compressed on the wire

    @defer.inlineCallbacks
    def test_a_subprotocol_is_chosen_by_the_ws_routes(self):
        config = plain_chain()
        config["bindings"]["ws0"] = {"type": "ws", "kind": "server",
                                     "routes": [{"when": [{"protocol": "chat"}], "exit": "echo0"}]}
        client = yield self.start(config)
        chosen = yield self.opened(client, headers={"sec-websocket-protocol": "superchat, chat"})
        none = yield self.opened(client, headers={"sec-websocket-protocol": "superchat"})
        self.assertEqual(chosen.status, "200")
        self.assertEqual(chosen.response["headers"]["sec-websocket-protocol"], "chat")
        self.assertEqual(none.status, "404")  # as HTTP/1.1: no ws route for what is offered
        self.assertIn(b"offered subprotocols: superchat", none.response["body"])

    @defer.inlineCallbacks
    def test_a_foreign_origin_is_refused_before_the_guard(self):
        client = yield self.start(plain_chain(copy.deepcopy(CROSS)))
        foreign = yield self.opened(client, headers={"origin": "https://evil.example"})
        allowed = yield self.opened(client, headers={"origin": "https://app.example"})
        yield eventually(lambda: client.done(foreign.stream_id))
        self.assertEqual(foreign.status, "403")
        self.assertEqual(allowed.status, "200")
        self.assertIn("BINDING_HTTP_REQUEST_REJECTED", self.gateway.events_text.getvalue())
        self.assertIsNone(client.goaway())

    @defer.inlineCallbacks
    def test_the_guard_refuses_on_headers_and_admits_a_token(self):
        signer = Signer()
        client = yield self.start(guarded_config([signer.jwk]))
        anonymous = yield self.opened(client)
        expired_token, unprivileged_token = signer.token(exp=int(time.time()) - 5), signer.token(scope="other")
        expired = yield self.opened(client, headers={"authorization": f"Bearer {expired_token}"})
        unprivileged = yield self.opened(client, headers={"authorization": f"Bearer {unprivileged_token}"})
        bearer = yield self.opened(client, path=f"/?access_token={signer.token()}")
        self.assertEqual(anonymous.status, "401")
        self.assertEqual(anonymous.response["headers"]["www-authenticate"], "Bearer")
        self.assertEqual(expired.status, "403")
        self.assertEqual(unprivileged.status, "404")  # as HTTP/1.1: no route takes its roles
        self.assertEqual(bearer.status, "200")
        bearer.send_text("authorized")
        yield eventually(lambda: bearer.data_frames())
        self.assertEqual(bytes(bearer.data_frames()[0].data), b"authorized")
        events = self.gateway.events_text.getvalue()
        self.assertIn("alice GET http://localhost:80/?access_token=REDACTED", events)
        self.assertNotIn(signer.token(), events)

    @defer.inlineCallbacks
    def test_malformed_and_unrouted_requests_cost_their_stream_only(self):
        config = plain_chain()
        config["bindings"]["http0"]["routes"] = [
            {"when": [{"headers": {"upgrade": "websocket", ":path": "/ws*"}}], "exit": "ws0"},
            {"when": [{"headers": {":path": "/plain*"}}], "exit": "ws0"},
            {"when": [{"headers": {":path": "/echo*"}}], "exit": "echo0"}]
        client = yield self.start(config)
        version = yield self.opened(client, path="/ws", headers={"sec-websocket-version": "8"})
        unrouted = yield self.opened(client, path="/nowhere")
        plain_exit = yield self.opened(client, path="/echo")
        other = client.h2.get_next_available_stream_id()
        client.h2.send_headers(other, [(":method", "CONNECT"), (":protocol", "webtransport"), (":scheme", "http"),
                                       (":authority", "localhost"), (":path", "/ws")])
        ended = client.h2.get_next_available_stream_id()
        client.h2.send_headers(ended, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                                       (":authority", "localhost"), (":path", "/ws"),
                                       ("sec-websocket-version", "13")], end_stream=True)
        get = client.request("GET", "/plain")  # a ws exit, without the extended CONNECT
        client.flush()
        yield eventually(lambda: all(client.done(s) for s in (other, ended, get)))
        self.assertEqual(version.status, "400")
        self.assertIn(b"Sec-WebSocket-Version 13 is required, got 8", version.response["body"])
        self.assertEqual(unrouted.status, "404")  # what an HTTP/1.1 upgrade without a route gets
        self.assertEqual(unrouted.response["body"], b"no route for GET /nowhere\n")
        self.assertEqual(plain_exit.status, "501")
        self.assertEqual(client.responses[other]["headers"][":status"], "501")
        self.assertIn(b"webtransport", client.responses[other]["body"])
        self.assertEqual(client.responses[ended]["headers"][":status"], "400")
        self.assertEqual(client.responses[get]["headers"][":status"], "400")
        self.assertIn(b"RFC 8441", client.responses[get]["body"])
        good = yield self.opened(client, path="/ws")  # the connection serves on
        self.assertEqual(good.status, "200")
        self.assertIsNone(client.goaway())
        # each refused stream was closed once answered: none waits for the client to end it
        self.assertEqual(client.responses[version.stream_id].get("reset"), h2.errors.ErrorCodes.NO_ERROR)
        connection = next(iter(self.binding("http0").h2_connections))
        self.assertEqual(list(connection.streams), [good.stream_id])

    @defer.inlineCallbacks
    def test_a_malformed_header_block_is_a_stream_error(self):
        client = yield self.start()
        base = [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"), (":authority", "localhost"),
                (":path", "/"), ("sec-websocket-version", "13")]
        malformed = [[f for f in base if f[0] != ":path"], [f for f in base if f[0] != ":scheme"],
                     [f for f in base if f[0] != ":protocol"],  # an ordinary CONNECT has no :path nor :scheme
                     [*base, (":unknown", "x")]]
        streams = []
        # h2 (the client) would refuse to send these: written with its validation off
        client.h2.config.validate_outbound_headers = False
        for fields in malformed:
            stream_id = client.h2.get_next_available_stream_id()
            client.h2.send_headers(stream_id, fields)
            streams.append(stream_id)
        client.h2.config.validate_outbound_headers = True
        client.flush()
        yield eventually(lambda: all(client.done(s) for s in streams))
        for stream_id in streams:
            self.assertEqual(client.responses[stream_id]["reset"], h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self.assertIsNone(client.goaway())
        good = yield self.opened(client)  # the connection serves on
        self.assertEqual(good.status, "200")
        self.assertIn("400 malformed request on stream", self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_proxied_upstream_over_http11_and_an_unreachable_upstream_refused_on_headers(self):
        upstream, upstream_port = start_upstream(self)
        client = yield self.start(proxy_config(upstream_port))
        ws = yield self.opened(client, path="/proxied")
        self.assertEqual(ws.status, "200")
        ws.send_text("through the proxy")
        yield eventually(lambda: ws.data_frames())
        self.assertEqual(bytes(ws.data_frames()[0].data), b"through the proxy")
        self.assertEqual(upstream.requests[0].path, "/proxied")
        unreachable = yield self.start(proxy_config(free_port()))
        refused = yield self.opened(unreachable)
        yield eventually(lambda: unreachable.done(refused.stream_id))
        self.assertEqual(refused.status, "502")  # the exit's refusal, as HTTP/1.1 gets it
        self.assertIsNone(unreachable.goaway())

    @defer.inlineCallbacks
    def test_metered_bindings_count_the_websocket(self):
        client = yield self.start(metered(bindings={"tcp0": ["stream.*"], "http0": ["stream.*", "http.*"],
                                                    "ws0": ["stream.*"], "echo": ["stream.*"]}))
        ws = yield self.opened(client, headers={"sec-websocket-protocol": "echo"})
        self.assertEqual(ws.status, "200")
        ws.send_text("counted")
        yield eventually(lambda: ws.data_frames())
        ws.send_close()
        yield eventually(lambda: value(self.gateway, "stream_closes_received_total", "ws0") == 1)
        self.assertEqual(value(self.gateway, "stream_opens_received_total", "echo"), 1)

    @defer.inlineCallbacks
    def test_two_websockets_and_a_plain_request_on_one_connection(self):
        client = yield self.start()
        first = H2WebSocket(client, path="/one")
        second = H2WebSocket(client, path="/two")
        plain = client.request("POST", "/", b"beside them")
        yield eventually(lambda: first.answered() and second.answered() and client.done(plain))
        for i in range(20):
            first.send_text(f"one {i}")
            second.send_binary(f"two {i}".encode())
        yield eventually(lambda: len(first.data_frames()) == 20 and len(second.data_frames()) == 20)
        self.assertEqual([bytes(f.data) for f in first.data_frames()], [f"one {i}".encode() for i in range(20)])
        self.assertEqual([bytes(f.data) for f in second.data_frames()], [f"two {i}".encode() for i in range(20)])
        self.assertEqual(client.responses[plain]["body"], b"beside them")
        first.send_close()
        yield eventually(lambda: client.done(first.stream_id))
        second.send_text("still open")
        yield eventually(lambda: len(second.data_frames()) == 21)
        yield eventually(lambda: len(self.binding("ws0").connections) == 1)

    @defer.inlineCallbacks
    def test_a_client_that_does_not_read_back_pressures_its_own_sending(self):
        client = yield self.start(acking=False)
        ws = yield self.opened(client)
        chunk = b"x" * 8192
        sent = 0
        connection = next(iter(self.binding("http0").h2_connections))
        stream = connection.streams[ws.stream_id]

        def pump() -> bool:  # send what the window allows, until the gateway stops taking it
            nonlocal sent
            while sent < 200 and client.h2.local_flow_control_window(ws.stream_id) >= len(chunk) + 16:
                ws.send_binary(chunk)
                sent += 1
            return stream.reading_paused and client.h2.local_flow_control_window(ws.stream_id) < len(chunk) + 16
        yield eventually(pump)
        self.assertLess(sent, 200)  # 1.6 MB: the client ran out of window, the gateway stopped acknowledging
        self.assertLessEqual(len(stream.outbound), h2websocket.SEND_BOUND + len(chunk) + 16)
        self.assertEqual(connection.h2.local_flow_control_window(ws.stream_id), 0)  # its window is full
        client.ack_all()  # reading again: everything comes back
        total = sent
        yield eventually(lambda: len(ws.data_frames()) == total, timeout=10)
        self.assertTrue(all(bytes(f.data) == chunk for f in ws.data_frames()))

    @defer.inlineCallbacks
    def test_goaway_on_drain_lets_the_websocket_close(self):
        client = yield self.start()
        ws = yield self.opened(client)
        self.assertEqual(ws.status, "200")
        for binding in self.gateway.generation.bindings.values():
            if IDrainsGracefully.providedBy(binding):
                binding.going_away()
        yield eventually(lambda: client.goaway() is not None and client.done(ws.stream_id))
        close = next(f for f in ws.frames if f.opcode is Opcode.CLOSE)
        self.assertEqual(close.data[:2], (1001).to_bytes(2, "big"))
        self.assertTrue(client.responses[ws.stream_id]["ended"])  # its closing handshake finished
        yield eventually(lambda: client.lost)

    @defer.inlineCallbacks
    def test_the_client_resetting_its_stream_ends_the_websocket(self):
        client = yield self.start()
        ws = yield self.opened(client)
        yield eventually(lambda: self.binding("ws0").connections)
        client.h2.reset_stream(ws.stream_id, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        yield eventually(lambda: not self.binding("ws0").connections)
        after = yield self.opened(client)
        self.assertEqual(after.status, "200")


class H2WebSocketOverTlsTests(unittest.TestCase):
    """h2 by ALPN on a tls server in front of the http server."""

    @defer.inlineCallbacks
    def test_a_websocket_over_h2_negotiated_by_alpn(self):
        folder = Path(self.mktemp())
        folder.mkdir(parents=True)
        ca = pki.make_ca()
        localhost = pki.issue(ca, "localhost", dns=["localhost"], ips=["127.0.0.1"])
        store = pki.write(folder / "localhost.p12", localhost.p12("localhost", PASSWORD))
        config = tls_chain({"keys": {"store": store, "password": PASSWORD}},
                           {"keys": ["localhost"], "alpn": ["h2", "http/1.1"]})
        _, port = yield start_gateway(self, config)
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, client_tls(ca, alpn=["h2", "http/1.1"]))
        client = yield connectProtocol(endpoint, H2Client())
        self.addCleanup(lambda: client.transport.abortConnection())
        yield eventually(lambda: client.h2.remote_settings.enable_connect_protocol == 1)
        ws = H2WebSocket(client, scheme="https", deflate=True)
        yield eventually(ws.answered)
        self.assertEqual(client.transport.negotiatedProtocol, b"h2")
        self.assertEqual(ws.status, "200")
        ws.send_text("over tls")
        yield eventually(lambda: ws.data_frames())
        self.assertEqual(bytes(ws.data_frames()[0].data), b"over tls")
        self.assertEqual(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 8)


class H2WebSocketTimerTests(unittest.TestCase):
    """The ws server's timers, and the stream's own linger, on a Clock."""

    def open(self, ws_options: dict[str, Any], config: dict[str, Any] | None = None,
             headers: tuple[tuple[str, str], ...] = ()) -> tuple[Any, Any, Any, int]:
        config = config or plain_chain()
        config["bindings"]["ws0"]["options"] = ws_options
        gateway = OnAClock(config)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        protocol, transport = gateway.connect()
        stream = client.get_next_available_stream_id()
        client.send_headers(stream, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                                     (":authority", "localhost"), (":path", "/"), ("sec-websocket-version", "13"),
                                     *headers])
        protocol.dataReceived(client.data_to_send())
        events = client.receive_data(transport.value())
        transport.clear()
        (answer,) = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        self.assertEqual(dict(answer.headers)[b":status"], b"200")
        return gateway, client, (protocol, transport), stream

    @staticmethod
    def exchange(client: Any, connection: Any) -> list[Any]:
        protocol, transport = connection
        data = client.data_to_send()
        if data:
            protocol.dataReceived(data)
        events = client.receive_data(transport.value())
        transport.clear()
        return events

    def test_keepalive_pings_over_the_stream_and_a_missed_pong_resets_it(self):
        gateway, client, connection, stream = self.open({"ping-interval": 5, "ping-timeout": 3})
        gateway.clock.advance(5)
        data = b"".join(e.data for e in self.exchange(client, connection) if isinstance(e, h2.events.DataReceived))
        [(_, _, opcode, _)] = read_frames(data)
        self.assertEqual(opcode, 0x9)  # a ping, on the WebSocket's stream
        gateway.clock.advance(3.1)
        (reset,) = [e for e in self.exchange(client, connection) if isinstance(e, h2.events.StreamReset)]
        self.assertEqual((reset.stream_id, reset.error_code), (stream, h2.errors.ErrorCodes.CANCEL))
        self.assertFalse(connection[1].disconnecting)  # the connection stays
        self.assertEqual(gateway.gateway.generation.bindings["test:ws0"].open_count(), 0)

    def test_a_peer_that_never_ends_its_side_is_reset_after_the_linger(self):
        gateway, client, connection, stream = self.open({"ping-interval": 0})
        client.send_data(stream, raw_frame(0x8, close_payload(1000)))
        events = self.exchange(client, connection)
        self.assertTrue(any(isinstance(e, h2.events.StreamEnded) for e in events))  # our close, then END_STREAM
        self.assertEqual(gateway.gateway.generation.bindings["test:ws0"].open_count(), 1)
        gateway.clock.advance(h2websocket.CLOSE_LINGER + 0.1)
        (reset,) = [e for e in self.exchange(client, connection) if isinstance(e, h2.events.StreamReset)]
        self.assertEqual((reset.stream_id, reset.error_code), (stream, h2.errors.ErrorCodes.NO_ERROR))
        self.assertEqual(gateway.gateway.generation.bindings["test:ws0"].open_count(), 0)

    def test_the_session_expiring_closes_the_websocket_with_1008(self):
        signer = Signer()
        expires = int(time.time()) + 60
        token = signer.token(exp=expires)
        gateway, client, connection, stream = self.open({"ping-interval": 0}, guarded_config([signer.jwk]),
                                                        (("authorization", f"Bearer {token}"),))
        gateway.clock.advance(expires - 1)
        self.assertEqual(self.exchange(client, connection), [])
        gateway.clock.advance(2)
        data = b"".join(e.data for e in self.exchange(client, connection) if isinstance(e, h2.events.DataReceived))
        [(_, _, opcode, payload)] = read_frames(data)
        self.assertEqual((opcode, payload[:2]), (0x8, (1008).to_bytes(2, "big")))
