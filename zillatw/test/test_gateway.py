"""End to end: real loopback sockets, real WebSocket clients, through tcp -> http -> ws -> app."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from zillatw.test.netns import ExampleNetwork
from zillatw.test.support import (
    chain,
    client_frame,
    close_ws,
    connect_raw,
    connect_ws,
    eventually,
    parse_server_frames,
    raw_exchange,
    split_response,
    start_gateway,
    upgrade_request,
)


class EchoTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.gateway, self.port = yield start_gateway(self, chain())

    @defer.inlineCallbacks
    def test_text_binary_empty_and_large(self):
        client = yield connect_ws(self.port)
        for payload, binary in [(b"hello", False), (b"\x00\xff\x10", True), (b"", False), (b"", True),
                                (os.urandom(64 * 1024), True), (("é" * 40000).encode(), False)]:
            client.sendMessage(payload, isBinary=binary)
            got_binary, frames = yield client.messages.get()
            self.assertEqual((got_binary, b"".join(frames)), (binary, payload))
        result = yield close_ws(client)
        self.assertEqual(result[:2], (True, 1000))

    @defer.inlineCallbacks
    def test_an_open_connection_lets_go_of_its_handshake_state(self):
        # idle connections are most of a gateway's memory (bench/suite.py measures it)
        client = yield connect_ws(self.port, path="/some/path?with=query")
        (server,) = self.gateway.binding("ws0").connections
        self.assertFalse(hasattr(server, "__dict__"))  # slots only: no per-connection dict
        self.assertFalse(hasattr(server.conn, "__dict__"))
        self.assertEqual((server._key, server._extensions, server._held, server._opening, server._open_timer),
                         ("", None, None, None, None))
        client.sendMessage(b"still works", isBinary=True)
        self.assertEqual((yield client.messages.get()), (True, [b"still works"]))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_fragments_keep_their_boundaries(self):
        client = yield connect_ws(self.port)
        client.send_frames(1, [b"fra", b"gme", b"nted \xc3", b"\xa9"])  # UTF-8 split across frames
        binary, frames = yield client.messages.get()
        self.assertFalse(binary)
        self.assertEqual(frames, [b"fra", b"gme", b"nted \xc3", b"\xa9"])
        client.send_frames(2, [b"", b"x", b""])
        binary, frames = yield client.messages.get()
        self.assertEqual((binary, frames), (True, [b"", b"x", b""]))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_a_large_message_streams_its_first_bytes_before_its_last_arrive(self):
        raw = yield connect_raw(self.port)
        raw.transport.write(upgrade_request())
        yield eventually(lambda: b"\r\n\r\n" in raw.data)
        start = len(raw.data)
        payload = os.urandom(512 * 1024)
        frame = client_frame(0x2, payload)
        raw.transport.write(frame[:200 * 1024])  # a frame over 64 KiB is relayed as it arrives
        yield eventually(lambda: len(raw.data) - start > 100 * 1024)
        first = parse_server_frames(raw.data[start:])
        self.assertEqual(first[0][:2], (0x2, False))
        raw.transport.write(frame[200 * 1024:])
        yield eventually(lambda: sum(len(f[2]) for f in parse_server_frames(raw.data[start:])) == len(payload))
        frames = parse_server_frames(raw.data[start:])
        self.assertEqual(b"".join(f[2] for f in frames), payload)
        self.assertEqual([f[0] for f in frames[1:]], [0x0] * (len(frames) - 1))
        self.assertTrue(frames[-1][1])
        raw.transport.loseConnection()
        yield raw.done

    @defer.inlineCallbacks
    def test_permessage_deflate_is_negotiated(self):
        client = yield connect_ws(self.port, compress=True)
        self.assertEqual(len(client.websocket_extensions_in_use), 1)
        message = b"compressible " * 5000
        client.sendMessage(message, isBinary=True)
        _, frames = yield client.messages.get()
        self.assertEqual(b"".join(frames), message)
        self.assertLess(client.trafficStats.incomingOctetsWebSocketLevel, len(message) // 10)
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_close_code_and_reason_are_echoed(self):
        for code in (1000, 1001, 4000):
            client = yield connect_ws(self.port)
            client.sendCloseFrame(code, b"bye")
            was_clean, got_code, reason = yield client.closed
            self.assertTrue(was_clean)
            self.assertEqual((got_code, reason), (code, "bye"))

    @defer.inlineCallbacks
    def test_server_pong_answers_ping(self):
        client = raw = yield connect_raw(self.port)
        raw.transport.write(upgrade_request())
        yield raw.until(10)
        status, _, rest = split_response(raw.data)
        self.assertIn("101", status)
        start = len(raw.data) - len(rest)
        raw.transport.write(client_frame(0x9, b"are you there"))
        yield raw.until(start + 2 + 13)
        self.assertEqual(parse_server_frames(raw.data[start:]), [(0xA, True, b"are you there")])
        client.transport.loseConnection()
        yield raw.done

    @defer.inlineCallbacks
    def test_zero_mask_key_is_accepted(self):
        raw = yield connect_raw(self.port)
        raw.transport.write(upgrade_request() + client_frame(0x1, b"zero mask", mask=b"\0\0\0\0"))
        yield raw.until(1)
        yield raw.until(raw.data.index(b"\r\n\r\n") + 4 + 2 + 9)
        frames = parse_server_frames(split_response(raw.data)[2])
        self.assertEqual(frames[0], (0x1, True, b"zero mask"))
        raw.transport.loseConnection()
        yield raw.done

    @defer.inlineCallbacks
    def _fails_with(self, frames: bytes, code: int):
        data = yield raw_exchange(self.port, upgrade_request() + frames)
        closes = [f for f in parse_server_frames(split_response(data)[2]) if f[0] == 0x8]
        self.assertTrue(closes, "no close frame")
        self.assertEqual(int.from_bytes(closes[0][2][:2], "big"), code)

    def test_reserved_opcode_closes_1002(self):
        return self._fails_with(client_frame(0x3, b"x"), 1002)

    def test_rsv_bits_without_extension_close_1002(self):
        return self._fails_with(client_frame(0x1, b"x", rsv=0b100), 1002)

    def test_long_control_frame_closes_1002(self):
        return self._fails_with(client_frame(0x9, b"p" * 126), 1002)

    def test_unmasked_frame_closes_1002(self):
        return self._fails_with(b"\x81\x02hi", 1002)

    def test_invalid_utf8_closes_1007(self):
        return self._fails_with(client_frame(0x1, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007)

    def test_invalid_close_code_closes_1002(self):
        return self._fails_with(client_frame(0x8, (999).to_bytes(2, "big")), 1002)

    @defer.inlineCallbacks
    def test_message_larger_than_limit_closes_1009(self):
        self.gateway.binding("ws0").max_message_size = 1000
        client = yield connect_ws(self.port)
        client.sendMessage(b"x" * 1001, isBinary=True)
        was_clean, code, _ = yield client.closed
        self.assertEqual(code, 1009)

    @defer.inlineCallbacks
    def test_deflate_bomb_closes_1009_before_inflating_it(self):
        """10 MB of zeros deflate to about 10 KB; the 1 MiB limit applies to what they inflate to."""
        client = yield connect_ws(self.port, compress=True)
        client.sendMessage(b"\0" * (10 * 1024 * 1024), isBinary=True)
        self.assertLess(client.trafficStats.outgoingOctetsWebSocketLevel, 100 * 1024)
        was_clean, code, _ = yield client.closed
        self.assertEqual(code, 1009)
        self.assertEqual(client.received, 0)

    @defer.inlineCallbacks
    def test_websockets_library_client(self):
        """Interop with the `websockets` client (asyncio, in a thread) through the gateway."""
        from twisted.internet.threads import deferToThread

        async def talk(port):
            import websockets
            async with websockets.connect(f"ws://127.0.0.1:{port}/x", subprotocols=["echo"]) as ws:
                await ws.send("hi")
                text = await ws.recv()
                await ws.send(b"\x01" * 100000)
                data = await ws.recv()
                return ws.subprotocol, text, len(data)

        def run(port):
            import asyncio
            return asyncio.run(talk(port))

        result = yield deferToThread(run, self.port)
        self.assertEqual(result, ("echo", "hi", 100000))


class HandshakeTests(unittest.TestCase):
    """Bad handshakes over a raw socket get the RFC's status codes and a reason."""

    @defer.inlineCallbacks
    def setUp(self):
        config = chain(ws_routes=[{"when": [{"path": "/echo*"}], "exit": "echo"}])
        config["bindings"]["http0"]["routes"] = [{"when": [{"headers": {":path": "/e*"}}], "exit": "ws0"},
                                                 {"when": [{"headers": {":path": "/o*"}}], "exit": "ws0"}]
        self.gateway, self.port = yield start_gateway(self, config)

    @defer.inlineCallbacks
    def _status(self, request: bytes, expected: int) -> Generator[Any, Any, tuple[dict[str, str], bytes]]:
        data = yield raw_exchange(self.port, request)
        status, headers, body = split_response(data)
        self.assertEqual(status.split(" ", 2)[1], str(expected), data)
        return headers, body

    @defer.inlineCallbacks
    def test_no_upgrade_header_is_400_and_closes(self):
        headers, body = yield self._status(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", 400)
        self.assertEqual(headers["connection"], "close")
        self.assertIn(b"Upgrade header is missing", body)

    @defer.inlineCallbacks
    def test_bad_requests_are_400_with_reason(self):
        cases = [
            (upgrade_request("/echo", {"Sec-WebSocket-Key": None}), b"Sec-WebSocket-Key"),
            (upgrade_request("/echo", {"Sec-WebSocket-Key": "c2hvcnQ="}), b"16 bytes"),
            (upgrade_request("/echo", {"Connection": "keep-alive"}), b"Connection"),
            (upgrade_request("/echo", {"Host": None}), b"Host"),
            (upgrade_request("/echo", method="POST"), b"GET"),
            (upgrade_request("/echo", version="HTTP/1.0"), b"HTTP/1.1"),
            (upgrade_request("/echo", {"Upgrade": "h2c"}), b"not websocket"),
        ]
        for request, reason in cases:
            _, body = yield self._status(request, 400)
            self.assertIn(reason, body)

    @defer.inlineCallbacks
    def test_wrong_version_is_426_with_supported_version(self):
        headers, _ = yield self._status(upgrade_request("/echo", {"Sec-WebSocket-Version": "8"}), 426)
        self.assertEqual(headers["sec-websocket-version"], "13")

    @defer.inlineCallbacks
    def test_no_ws_route_is_404(self):
        yield self._status(upgrade_request("/other"), 404)

    @defer.inlineCallbacks
    def test_no_http_route_is_404_and_closes(self):
        headers, _ = yield self._status(upgrade_request("/nowhere"), 404)
        self.assertEqual(headers["connection"], "close")

    @defer.inlineCallbacks
    def test_head_limits(self):
        yield self._status(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414)
        yield self._status(b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"b" * 9000 + b"\r\n\r\n", 431)

    @defer.inlineCallbacks
    def test_accepted_handshake(self):
        data = yield raw_exchange(self.port, upgrade_request("/echo?x=1") + client_frame(0x8, b"\x03\xe8"))
        status, headers, rest = split_response(data)
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(headers["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        self.assertEqual(parse_server_frames(rest), [(0x8, True, b"\x03\xe8")])
        self.assertIn("BINDING_HTTP_REQUEST_ACCEPTED - GET http://localhost:80/echo?x=1",
                      self.gateway.events_text.getvalue())


class SubprotocolTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        routes = [
            {"when": [{"protocol": "primary"}], "exit": "echo"},
            {"when": [{"protocol": "secondary"}, {"protocol": "v*.chat", "path": "/chat"}], "exit": "echo"},
        ]
        self.gateway, self.port = yield start_gateway(self, chain(ws_routes=routes))

    @defer.inlineCallbacks
    def _selected(self, offered, path="/"):
        client = yield connect_ws(self.port, path=path, protocols=offered)
        yield close_ws(client)
        return client.websocket_protocol_in_use

    @defer.inlineCallbacks
    def test_zilla_scenario_ignores_unrouted_offers(self):
        self.assertEqual((yield self._selected(["ignored", "primary", "secondary"])), "primary")

    @defer.inlineCallbacks
    def test_lowest_route_index_wins_over_offer_order(self):
        self.assertEqual((yield self._selected(["secondary", "primary"])), "primary")

    @defer.inlineCallbacks
    def test_wildcard_protocol_with_path(self):
        self.assertEqual((yield self._selected(["v2.chat"], path="/chat")), "v2.chat")
        yield self.assertFailure(connect_ws(self.port, path="/other", protocols=["v2.chat"]), ConnectionError)

    @defer.inlineCallbacks
    def test_no_offer_does_not_match_a_protocol_route(self):
        yield self.assertFailure(connect_ws(self.port), ConnectionError)

    @defer.inlineCallbacks
    def test_catch_all_selects_first_offer(self):
        gateway, port = yield start_gateway(self, chain())
        client = yield connect_ws(port, protocols=["one", "two"])
        self.assertEqual(client.websocket_protocol_in_use, "one")
        yield close_ws(client)


class ExampleConfigTests(unittest.TestCase):
    """conf/ws.echo.yaml and conf/ws.reflect.yaml, unchanged, on 7114 in a network namespace of
    the test's own (zillatw.test.netns)."""

    def setUp(self):
        self.network = ExampleNetwork(self)

    def _config(self, name):
        return self.network.config(name)

    @defer.inlineCallbacks
    def test_ws_echo(self):
        gateway, _ = yield start_gateway(self, self._config("ws.echo.yaml"))
        port = self.network.port(7114)
        client = yield connect_ws(port, protocols=["echo"])
        self.assertEqual(client.websocket_protocol_in_use, "echo")
        client.sendMessage(b"Hello, world")
        self.assertEqual((yield client.messages.get()), (False, [b"Hello, world"]))
        yield close_ws(client)
        yield self.assertFailure(connect_ws(port, protocols=["other"]), ConnectionError)
        self.assertIn("example:north_http_server", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_ws_reflect_reaches_every_client_including_sender(self):
        gateway, _ = yield start_gateway(self, self._config("ws.reflect.yaml"))
        port = self.network.port(7114)
        clients = []
        for _ in range(3):
            clients.append((yield connect_ws(port, protocols=["echo"])))
        for index, sender in enumerate(clients):
            sender.sendMessage(f"from {index}".encode())
            for client in clients:
                self.assertEqual((yield client.messages.get()), (False, [f"from {index}".encode()]))
        yield close_ws(clients.pop())
        clients[0].sendMessage(b"two left")
        for client in clients:
            self.assertEqual((yield client.messages.get()), (False, [b"two left"]))
        self.assertEqual(gateway.binding("north_fan_server").members(), 2)
        for client in clients:
            yield close_ws(client)
