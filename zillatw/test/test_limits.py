"""Limits of the ws server (and the http server in front of it), end to end on loopback
sockets: message and frame size, deflate bombs, slow request heads, keepalive pings,
the closing-handshake timeout, the connection cap and the http server's allowed origins."""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial import unittest

from zillatw import ConfigError, build_gateway
from zillatw.test.support import (
    OnAClock,
    chain,
    client_frame,
    close_ws,
    connect_raw,
    connect_ws,
    eventually,
    parse_server_frames,
    split_response,
    start_gateway,
    upgrade_request,
)
from zillatw.wire import deflate

MiB = 1024 * 1024


def close_code(frames: list[tuple[int, bool, bytes]]) -> int | None:
    """The code of the first close frame among server frames."""
    for opcode, _, payload in frames:
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
    return None


@defer.inlineCallbacks
def raw_upgrade(port: int, headers: dict[str, str] | None = None) -> Generator[Any, Any, Any]:
    """A raw client after its upgrade request's response head: (client, status line,
    response headers, offset of the first byte after the head)."""
    raw = yield connect_raw(port)
    raw.transport.write(upgrade_request(headers=headers))
    yield eventually(lambda: b"\r\n\r\n" in raw.data or raw.done.called)
    status, response_headers, rest = split_response(raw.data)
    return raw, status, response_headers, len(raw.data) - len(rest)


def deflated_zeros(size: int) -> bytes:
    """`size` zero bytes as one permessage-deflate message payload (RFC 7692 §7.2.1)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk, parts = bytes(MiB), []
    for _ in range(size // MiB):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    data = b"".join(parts)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


class MessageSizeTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_message_over_max_message_size_closes_1009_and_one_at_the_limit_passes(self):
        _, port = yield start_gateway(self, chain(ws_options={"max-message-size": 1000}))
        client = yield connect_ws(port)
        client.sendMessage(b"x" * 1000, isBinary=True)
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"x" * 1000)
        client.send_frames(2, [b"y" * 600, b"y" * 401])  # 1001 bytes in two frames of a message
        was_clean, code, _ = yield client.closed
        self.assertEqual((was_clean, code), (True, 1009))
        self.assertEqual(client.received, 1)

    @defer.inlineCallbacks
    def test_frame_over_max_frame_size_closes_1009(self):
        _, port = yield start_gateway(self, chain(ws_options={"max-frame-size": 100}))
        client = yield connect_ws(port)
        client.send_frames(2, [b"a" * 100, b"b" * 100])  # frames at the limit: fine
        self.assertEqual((yield client.messages.get())[1], [b"a" * 100, b"b" * 100])
        client.send_frames(2, [b"c" * 101])
        _, code, _ = yield client.closed
        self.assertEqual(code, 1009)

    @defer.inlineCallbacks
    def test_default_max_message_size_is_1_mib(self):
        gateway, port = yield start_gateway(self, chain())
        self.assertEqual(gateway.binding("ws0").max_message_size, MiB)
        client = yield connect_ws(port)
        client.sendMessage(b"z" * (MiB + 1), isBinary=True)
        _, code, _ = yield client.closed
        self.assertEqual(code, 1009)
        self.assertEqual(client.received, 0)

    @defer.inlineCallbacks
    def test_deflate_bomb_closes_1009_without_inflating_past_the_cap(self):
        """256 MiB of zeros deflate to about 250 KiB. The server inflates at most the 1 MiB
        default limit of it: we count every byte its decompressor returns, and what Python
        allocated at the peak while it handled the bomb."""
        inflated: list[int] = []
        original = zlib.decompressobj

        class Counting:  # what the server's inflater returns, also when it then refuses it
            def __init__(self, *args):
                self._z = original(*args)

            def decompress(self, data, max_length=0):
                out = self._z.decompress(data, max_length)
                inflated.append(len(out))
                return out

            @property
            def unconsumed_tail(self):
                return self._z.unconsumed_tail
        self.patch(deflate.zlib, "decompressobj", Counting)
        bomb = client_frame(0x2, deflated_zeros(256 * MiB), rsv=0b100)
        self.assertLess(len(bomb), 300 * 1024)

        _, port = yield start_gateway(self, chain())
        raw, status, headers, start = yield raw_upgrade(port, {"Sec-WebSocket-Extensions": "permessage-deflate"})
        self.assertIn("101", status)
        self.assertTrue(headers["sec-websocket-extensions"].startswith("permessage-deflate"))
        tracemalloc.start()
        try:
            raw.transport.write(bomb)
            yield eventually(lambda: close_code(parse_server_frames(raw.data[start:])) is not None, timeout=10)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(close_code(parse_server_frames(raw.data[start:])), 1009)
        self.assertGreater(sum(inflated), 0)
        self.assertLessEqual(sum(inflated), MiB + 1)  # one byte past the cap says it is over
        self.assertLess(peak, 8 * MiB)  # the bomb's buffers and one cap's worth, not 256 MiB
        raw.transport.loseConnection()
        yield raw.done


class HandshakeTimeoutTests(unittest.TestCase):
    def test_a_request_head_dribbled_byte_by_byte_is_dropped_at_the_deadline(self):
        config = chain()
        config["bindings"]["http0"]["options"] = {"head-timeout": 0.5}
        on = OnAClock(config)
        connection, transport = on.connect()
        request = upgrade_request()
        for index in range(24):  # a byte every 20 ms: 0.48 s, far from the whole head
            connection.dataReceived(request[index:index + 1])
            on.clock.advance(0.02)
        self.assertEqual(transport.value(), b"")  # each byte arriving did not push the deadline back...
        on.clock.advance(0.019)
        self.assertEqual(transport.value(), b"")
        on.clock.advance(0.001)  # ...and at 0.5 s from accept the request is refused
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"), transport.value())
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)

    @defer.inlineCallbacks
    def test_default_head_timeout_is_10_seconds(self):
        gateway, _ = yield start_gateway(self, chain())
        self.assertEqual(gateway.binding("http0").head_timeout, 10.0)

    def test_limits_are_checked_as_configuration(self):
        bad = chain(ws_options={"ping-interval": -1, "max-connections": 0})
        bad["bindings"]["http0"]["options"] = {"head-timeout": 0}
        with self.assertRaises(ConfigError) as raised:
            build_gateway(bad)
        problems = "\n".join(raised.exception.problems)
        for path in ("bindings.ws0.options.ping-interval", "bindings.ws0.options.max-connections",
                     "bindings.http0.options.head-timeout"):
            self.assertIn(path, problems)


class KeepaliveTests(unittest.TestCase):
    """ping-interval and ping-timeout from the configuration, on the gateway's clock (the ws
    connection's own timers: test_protocols.WsTimerTests)."""

    def open(self, **ws_options: Any) -> tuple[OnAClock, Any, Any, Any]:
        on = OnAClock(chain(ws_options=ws_options))
        protocol, transport = on.connect()
        protocol.dataReceived(upgrade_request())
        self.assertIn(b" 101 ", transport.value())
        transport.clear()
        (server_side,) = on.gateway.binding("ws0").connections
        return on, protocol, transport, server_side

    def test_a_peer_that_does_not_pong_is_dropped_and_its_timers_go_with_it(self):
        on, protocol, transport, server_side = self.open(**{"ping-interval": 0.2, "ping-timeout": 0.3})
        on.clock.advance(0.2)
        self.assertEqual([opcode for opcode, _, _ in parse_server_frames(transport.value())], [0x9])
        on.clock.advance(0.29)  # never answering the server's ping
        self.assertFalse(transport.disconnecting)
        on.clock.advance(0.01)
        self.assertTrue(transport.disconnected)  # aborted (StringTransport.abortConnection): no close frame
        self.assertEqual([opcode for opcode, _, _ in parse_server_frames(transport.value())], [0x9])
        protocol.connectionLost(Failure(ConnectionLost()))
        ws0 = on.gateway.binding("ws0")
        self.assertEqual(ws0.connections, set())
        self.assertFalse(server_side.was_clean)
        left = [call for call in on.clock.getDelayedCalls() if getattr(call.func, "__self__", None) is server_side]
        self.assertEqual(left, [])
        self.assertEqual((len(ws0.pings), len(ws0.pongs)), (0, 0))  # its keepalive entries went too
        self.assertNotIn(ws0.pings._run, [call.func for call in on.clock.getDelayedCalls()])

    def test_a_peer_that_pongs_stays_connected(self):
        on, protocol, transport, server_side = self.open(**{"ping-interval": 0.2, "ping-timeout": 0.3})
        for _ in range(3):
            on.clock.advance(0.2)
            ((opcode, _, payload),) = parse_server_frames(transport.value())
            self.assertEqual(opcode, 0x9)
            transport.clear()
            on.clock.advance(0.1)
            protocol.dataReceived(client_frame(0xA, payload))
        self.assertEqual(server_side.pings_sent, 3)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(client_frame(0x2, b"still here"))
        self.assertEqual(parse_server_frames(transport.value()), [(0x2, True, b"still here")])
        transport.clear()
        protocol.dataReceived(client_frame(0x8, (1000).to_bytes(2, "big")))
        self.assertEqual(close_code(parse_server_frames(transport.value())), 1000)
        self.assertTrue(transport.disconnecting)
        self.assertTrue(server_side.was_clean)

    def test_pings_are_off_with_ping_interval_0(self):
        on, protocol, transport, server_side = self.open(**{"ping-interval": 0})
        on.clock.advance(3600)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(server_side.pings_sent, 0)
        self.assertIsNone(on.gateway.binding("ws0").pings)


class CloseTimeoutTests(unittest.TestCase):
    def test_a_peer_that_does_not_answer_our_close_is_dropped_after_close_timeout(self):
        on = OnAClock(chain(ws_options={"close-timeout": 0.3}))
        protocol, transport = on.connect()
        protocol.dataReceived(upgrade_request())
        transport.clear()
        on.gateway.binding("ws0").going_away("maintenance")  # the server closes with 1001
        self.assertEqual(close_code(parse_server_frames(transport.value())), 1001)
        on.clock.advance(0.29)  # and we do not answer its close frame
        self.assertFalse(transport.disconnecting)
        on.clock.advance(0.01)
        self.assertTrue(transport.disconnected)  # aborted

    @defer.inlineCallbacks
    def test_after_a_protocol_failure_the_close_frame_is_followed_by_a_fin_not_a_reset(self):
        # a close timeout the test would time out on first: the FIN must come without it
        gateway, port = yield start_gateway(self, chain(ws_options={"close-timeout": 600, "max-message-size": 10}))
        raw, status, _, start = yield raw_upgrade(port)
        # too big: the server closes with 1009; what follows is read and ignored, so the
        # socket never closes with unread bytes (which would be a RST)
        raw.transport.write(client_frame(0x2, b"x" * 11) + client_frame(0x2, b"more") * 100)
        yield raw.done
        self.assertTrue(raw.reason.check(ConnectionDone), raw.reason)  # a FIN; a RST is ConnectionLost
        self.assertEqual(close_code(parse_server_frames(raw.data[start:])), 1009)
        self.assertEqual([f[0] for f in parse_server_frames(raw.data[start:])], [0x8])


class ConnectionCapTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_upgrades_over_max_connections_get_503_until_one_closes(self):
        gateway, port = yield start_gateway(self, chain(ws_options={"max-connections": 2}))
        first = yield connect_ws(port)
        second = yield connect_ws(port)
        raw, status, headers, _ = yield raw_upgrade(port)
        self.assertEqual(status, "HTTP/1.1 503 Service Unavailable")
        self.assertEqual(headers["connection"], "close")
        yield raw.done  # and the server closed the socket
        self.assertIn(b"too many WebSocket connections (limit 2)", raw.data)
        self.assertIn("BINDING_HTTP_REQUEST_REJECTED - 503", gateway.events_text.getvalue())
        yield close_ws(first)
        yield eventually(lambda: len(gateway.binding("ws0").connections) == 1)
        third = yield connect_ws(port)  # a place is free again
        third.sendMessage(b"in")
        self.assertEqual((yield third.messages.get())[1], [b"in"])
        yield close_ws(second)
        yield close_ws(third)

    @defer.inlineCallbacks
    def test_no_cap_by_default(self):
        gateway, port = yield start_gateway(self, chain())
        self.assertEqual(gateway.binding("ws0").max_connections, 0)
        clients = yield defer.gatherResults([connect_ws(port) for _ in range(20)])
        self.assertEqual(len(gateway.binding("ws0").connections), 20)
        yield defer.gatherResults([close_ws(client) for client in clients])


def cross_origin(allow: dict | None = None) -> dict:
    """The test chain whose http server lets other origins in (`allow` as Zilla's)."""
    config = chain()
    access: dict[str, Any] = {"policy": "cross-origin"}
    if allow is not None:
        access["allow"] = allow
    config["bindings"]["http0"]["options"] = {"access-control": access}
    return config


class OriginTests(unittest.TestCase):
    """Requests from listed origins only (more cases in test_access_control)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.gateway, self.port = yield start_gateway(self, cross_origin({
            "origins": ["https://app.example.com", "https://*.example.org", "http://localhost:*"]}))

    @defer.inlineCallbacks
    def status_for(self, origin: str | None) -> Generator[Any, Any, str]:
        raw, status, _, _ = yield raw_upgrade(self.port, {"Origin": origin} if origin else None)
        raw.transport.loseConnection()
        yield raw.done
        return status

    @defer.inlineCallbacks
    def test_foreign_origins_get_403(self):
        for origin in ("https://evil.example.net", "https://app.example.com.evil.net", "http://app.example.com",
                       "https://example.org", "null"):
            status = yield self.status_for(origin)
            self.assertEqual(status, "HTTP/1.1 403 Forbidden", origin)
        raw, _, _, _ = yield raw_upgrade(self.port, {"Origin": "https://evil.example.net"})
        yield raw.done
        self.assertIn(b"origin https://evil.example.net is not allowed", raw.data)
        self.assertIn("BINDING_HTTP_REQUEST_REJECTED - 403 origin https://evil.example.net is not allowed",
                      self.gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_allowed_origins_and_clients_without_one_get_101(self):
        for origin in ("https://app.example.com", "https://chat.example.org", "HTTPS://Chat.Example.ORG",
                       "http://localhost:8080", None):
            status = yield self.status_for(origin)
            self.assertEqual(status, "HTTP/1.1 101 Switching Protocols", origin)

    @defer.inlineCallbacks
    def test_every_origin_is_allowed_without_a_list(self):
        _, port = yield start_gateway(self, cross_origin())
        raw, status, _, _ = yield raw_upgrade(port, {"Origin": "https://anywhere.example.net"})
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols")
        raw.transport.loseConnection()
        yield raw.done
