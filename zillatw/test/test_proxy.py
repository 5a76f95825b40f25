"""ws server -> ws client -> http client -> tcp client -> an upstream WebSocket server."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.trial import unittest

from zillatw.test.netns import ExampleNetwork
from zillatw.test.support import (
    close_ws,
    connect_ws,
    eventually,
    port_of,
    proxy_config,
    start_gateway,
    start_upstream,
    wait,
)
from zillatw.wire import deflate
from zillatw.wire.handshake import accept_key

MESSAGE = 512 * 1024


class ExampleTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_conf_ws_proxy_reaches_its_upstream_on_localhost_8080(self):
        """conf/ws.proxy.yaml unchanged, on 7114, its upstream on localhost:8080 as written, in
        a network namespace of the test's own (zillatw.test.netns)."""
        network = ExampleNetwork(self)
        upstream, _ = start_upstream(self, on=network.port(8080))
        gateway, _ = yield start_gateway(self, network.config("ws.proxy.yaml"))
        client = yield connect_ws(network.port(7114), "/chat", protocols=["echo"])
        self.assertEqual(client.websocket_protocol_in_use, "echo")  # the upstream's answer, passed on
        client.sendMessage(b"Hello, upstream")
        self.assertEqual((yield client.messages.get()), (False, [b"Hello, upstream"]))
        self.assertEqual(upstream.requests[0].path, "/chat")
        self.assertEqual(upstream.received, len(b"Hello, upstream"))
        self.assertEqual((yield close_ws(client))[1], 1000)
        yield eventually(lambda: upstream.closes)
        self.assertIn("example:north_http_server", gateway.events_text.getvalue())


class ProxyTests(unittest.TestCase):
    @defer.inlineCallbacks
    def proxy(self, **upstream_options):
        self.upstream, upstream_port = start_upstream(self, **upstream_options)
        self.gateway, self.port = yield start_gateway(self, proxy_config(upstream_port))

    @defer.inlineCallbacks
    def test_messages_flow_unchanged_both_ways(self):
        yield self.proxy()
        client = yield connect_ws(self.port, path="/chat?room=1", protocols=["echo", "other"])
        self.assertEqual(client.websocket_protocol_in_use, "echo")
        request = self.upstream.requests[0]
        # the route fixes no subprotocol: every one offered goes upstream (issue 15)
        self.assertEqual((request.path, request.params, request.protocols),
                         ("/chat", {"room": ["1"]}, ["echo", "other"]))
        self.assertEqual(request.host, "127.0.0.1")
        for payload, binary in [(b"text", False), (b"\x00\x01", True), (b"", True), (b"y" * 300000, True)]:
            client.sendMessage(payload, binary)
            got, frames = yield client.messages.get()
            self.assertEqual((got, b"".join(frames)), (binary, payload))
        client.send_frames(1, [b"frag", b"mented"])
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"fragmented")
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_both_sockets_have_tcp_nodelay(self):
        """Small relayed writes must not wait for the peer's delayed ACK (Nagle)."""
        yield self.proxy()
        client = yield connect_ws(self.port, protocols=["echo"])
        server_side = next(iter(self.gateway.binding("ws0").connections))
        upstream_side = server_side.stream_peer
        for side in (server_side, upstream_side):
            handle = side.transport.getHandle()
            self.assertNotEqual(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0)
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_client_close_code_reaches_upstream(self):
        yield self.proxy()
        client = yield connect_ws(self.port, protocols=["echo"])
        client.sendClose(4000, "bye")
        was_clean, code, reason = yield client.closed
        self.assertEqual((code, reason), (4000, "bye"))
        yield eventually(lambda: self.upstream.closes)
        self.assertEqual(self.upstream.closes[0], (4000, "bye"))

    @defer.inlineCallbacks
    def test_upstream_close_code_reaches_client(self):
        yield self.proxy()
        client = yield connect_ws(self.port, protocols=["echo"])
        client.sendMessage(b"close:1001")
        was_clean, code, reason = yield client.closed
        self.assertEqual((was_clean, code, reason), (True, 1001, "upstream says bye"))

    @defer.inlineCallbacks
    def test_upstream_dropping_tcp_gives_1011(self):
        yield self.proxy()
        client = yield connect_ws(self.port, protocols=["echo"])
        client.sendMessage(b"drop")
        was_clean, code, reason = yield client.closed
        self.assertEqual(code, 1011)

    @defer.inlineCallbacks
    def test_upstream_refusing_the_handshake_is_502(self):
        yield self.proxy()
        failure = yield self.assertFailure(connect_ws(self.port, path="/deny"), ConnectionError)
        self.assertIn("502", str(failure))

    @defer.inlineCallbacks
    def test_the_client_gets_the_upstreams_choice_of_its_offers(self):
        yield self.proxy(select=lambda offered: "echo" if "echo" in offered else None)
        client = yield connect_ws(self.port, protocols=["nope", "echo"])
        self.assertEqual(client.websocket_protocol_in_use, "echo")
        self.assertEqual(self.upstream.requests[0].protocols, ["nope", "echo"])
        client.sendMessage(b"through")
        self.assertEqual((yield client.messages.get()), (False, [b"through"]))
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_a_route_that_names_the_subprotocol_offers_only_that_one(self):
        self.upstream, upstream_port = start_upstream(self)
        config = proxy_config(upstream_port)
        config["bindings"]["ws0"]["routes"] = [{"when": [{"protocol": "echo"}], "exit": "south_ws_client"}]
        self.gateway, self.port = yield start_gateway(self, config)
        client = yield connect_ws(self.port, protocols=["nope", "echo"])
        self.assertEqual(client.websocket_protocol_in_use, "echo")
        self.assertEqual(self.upstream.requests[0].protocols, ["echo"])
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_compressed_messages_pass_through_neither_inflated_nor_compressed_again(self):
        worked = []
        for name in ("Inflater", "Deflater"):
            cls = getattr(deflate, name)
            method = "inflate" if name == "Inflater" else "compress"
            original = getattr(cls, method)
            self.patch(cls, method, lambda self, *a, _o=original, _n=name: worked.append(_n) or _o(self, *a))
        self.upstream, upstream_port = start_upstream(self, compress=True)
        self.gateway, self.port = yield start_gateway(self, proxy_config(upstream_port))
        client = yield connect_ws(self.port, compress=True)
        self.assertEqual(len(client.websocket_extensions_in_use), 1)
        for payload, binary in [("compressible text " * 2000, False), (b"\x00" * 300000, True)]:
            data = payload.encode() if isinstance(payload, str) else payload
            client.sendMessage(data, binary)
            got, frames = yield client.messages.get()
            self.assertEqual((got, b"".join(frames)), (binary, data))
        self.assertEqual(worked, [])  # the gateway neither inflated nor deflated
        self.assertLess(client.trafficStats.incomingOctetsWebSocketLevel, 40000)
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_with_validation_between_messages_are_inflated_and_checked(self):
        self.upstream, upstream_port = start_upstream(self, compress=True)
        config = proxy_config(upstream_port)
        config["bindings"]["ws0"]["options"] = {"messages": [{"content": "string"}]}
        self.gateway, self.port = yield start_gateway(self, config)
        client = yield connect_ws(self.port, compress=True)
        client.sendMessage(b"valid " * 1000, False)
        self.assertEqual(b"".join((yield client.messages.get())[1]), b"valid " * 1000)
        client.sendMessage(b"\x00\xff binary is no string", True)
        was_clean, code, _ = yield client.closed
        self.assertEqual(code, 1007)

    @defer.inlineCallbacks
    def test_upstream_choosing_another_subprotocol_is_502(self):
        yield self.proxy(select=lambda offered: None)
        failure = yield self.assertFailure(connect_ws(self.port, protocols=["echo"]), ConnectionError)
        self.assertIn("502", str(failure))

    @defer.inlineCallbacks
    def test_upstream_unreachable_is_502(self):
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        closed_port = port.getHost().port
        yield port.stopListening()
        gateway, gateway_port = yield start_gateway(self, proxy_config(closed_port))
        failure = yield self.assertFailure(connect_ws(gateway_port), ConnectionError)
        self.assertIn("502", str(failure))

    @defer.inlineCallbacks
    def test_upstream_too_slow_is_504(self):
        class Silent(Protocol):
            def connectionMade(self):
                silent.append(self)

        silent: list = []
        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        gateway, gateway_port = yield start_gateway(self, proxy_config(port.getHost().port, timeout=0.3))
        failure = yield self.assertFailure(connect_ws(gateway_port), ConnectionError)
        self.assertIn("504", str(failure))
        yield eventually(lambda: silent and not silent[0].transport.connected)

    @defer.inlineCallbacks
    def test_fast_producer_into_slow_consumer_stays_bounded(self):
        """200 MB from a client into an upstream that reads slowly: the gateway holds at most
        a few socket reads, because each side pauses the other's transport."""
        yield self.proxy(echo=False)
        client = yield connect_ws(self.port)
        upstream = self.upstream.connections[0]
        upstream.transport.pauseProducing()
        total, sent, peak = 200 * 1024 * 1024, 0, 0
        payload = b"p" * MESSAGE
        server_side = next(iter(self.gateway.binding("ws0").connections))
        upstream_side = server_side.stream_peer

        def gateway_buffered() -> int:
            return sum(len(t.dataBuffer) - t.offset + t._tempDataLen
                       for t in (server_side.transport, upstream_side.transport))

        turns = 0
        while sent < total:
            # write while the client's own buffer is small, like a producer that honours
            # back-pressure, then let the reactor run
            while sent < total and len(client.transport.dataBuffer) + client.transport._tempDataLen < 4 * MESSAGE:
                client.sendMessage(payload, isBinary=True)
                sent += MESSAGE
            peak = max(peak, gateway_buffered())
            turns += 1
            if turns % 20 == 0:  # the slow consumer reads a little now and then
                upstream.transport.resumeProducing()
                yield wait(0.001)
                upstream.transport.pauseProducing()
            else:
                yield wait(0)
        upstream.transport.resumeProducing()
        yield eventually(lambda: self.upstream.received == total, timeout=60)
        self.assertLess(peak, 4 * 1024 * 1024)
        yield close_ws(client)


class WebsocketsUpstreamTests(unittest.TestCase):
    """A `websockets` (asyncio) server upstream, in its own thread."""

    def setUp(self):
        self.closes: list = []
        started = threading.Event()
        self.loop = asyncio.new_event_loop()

        async def handler(ws):
            from websockets.exceptions import ConnectionClosed
            try:
                async for message in ws:
                    await ws.send(message)
            except ConnectionClosed:
                pass  # a close code other than 1000 ends the loop this way
            finally:
                self.closes.append((ws.close_code, ws.close_reason))

        async def serve():
            from websockets.asyncio.server import serve as ws_serve
            self.server = await ws_serve(handler, "127.0.0.1", 0, subprotocols=["chat"])
            self.upstream_port = self.server.sockets[0].getsockname()[1]
            started.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self.loop)
        started.wait(10)

    def tearDown(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @defer.inlineCallbacks
    def test_proxy_to_websockets_server(self):
        gateway, port = yield start_gateway(self, proxy_config(self.upstream_port))
        client = yield connect_ws(port, protocols=["chat"], compress=True)
        self.assertEqual(client.websocket_protocol_in_use, "chat")
        for payload, binary in [(b"hello", False), (bytes(range(256)) * 400, True)]:
            client.sendMessage(payload, binary)
            got, frames = yield client.messages.get()
            self.assertEqual((got, b"".join(frames)), (binary, payload))
        client.sendClose(4000, "bye")
        was_clean, code, reason = yield client.closed
        self.assertEqual((code, reason), (4000, "bye"))
        yield eventually(lambda: self.closes)
        self.assertEqual(self.closes[0], (4000, "bye"))


class _Answering(Protocol):
    """A raw upstream answering the upgrade request with `answer(key)`'s bytes."""

    def connectionMade(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received and self.factory.answer is not None:
            head = self.received.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            headers = {line.partition(":")[0].lower(): line.partition(":")[2].strip() for line in head[1:]}
            self.factory.heads.append(headers)
            self.transport.write(self.factory.answer(headers))
            self.factory.answer = None


class _AnsweringFactory(ServerFactory):
    protocol = _Answering

    def __init__(self, answer: Callable[[dict[str, str]], bytes]):
        self.answer: Callable[[dict[str, str]], bytes] | None = answer
        self.heads: list[dict[str, str]] = []


def _switching(accept: str, *extra: str) -> bytes:
    return ("\r\n".join(["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
                         f"Sec-WebSocket-Accept: {accept}", *extra]) + "\r\n\r\n").encode("latin-1")


class UpstreamAnswerTests(unittest.TestCase):
    """The ws client checks the upstream's answer itself (RFC 6455 §4.1): anything but a
    proper 101 is a 502, and the event log says what was wrong."""

    @defer.inlineCallbacks
    def refused_with(self, answer, detail: str, protocols=None, compress=False):
        factory = _AnsweringFactory(answer)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        gateway, gateway_port = yield start_gateway(self, proxy_config(port_of(port)))
        failure = yield self.assertFailure(connect_ws(gateway_port, protocols=protocols, compress=compress),
                                           ConnectionError)
        self.assertIn("502", str(failure))
        self.assertIn(detail, gateway.events_text.getvalue())
        return factory.heads[0]

    @defer.inlineCallbacks
    def test_our_upgrade_request(self):
        head = yield self.refused_with(lambda h: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                                       "it answered 404 Not Found", protocols=["a", "b"])
        self.assertEqual((head["upgrade"], head["connection"], head["sec-websocket-version"]),
                         ("websocket", "Upgrade", "13"))
        self.assertEqual(head["sec-websocket-protocol"], "a, b")
        self.assertNotIn("sec-websocket-extensions", head)  # the client compresses nothing: nor do we
        self.assertNotIn("user-agent", head)

    @defer.inlineCallbacks
    def test_compression_is_offered_upstream_to_a_client_that_offers_it(self):
        head = yield self.refused_with(lambda h: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
                                       "it answered 404 Not Found", compress=True)
        self.assertEqual(head["sec-websocket-extensions"], "permessage-deflate; client_max_window_bits")

    def test_a_wrong_accept_key(self):
        return self.refused_with(lambda h: _switching(accept_key("not our key")),
                                 "Sec-WebSocket-Accept does not match our key")

    def test_no_upgrade_header(self):
        return self.refused_with(lambda h: b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Accept: " + accept_key(h["sec-websocket-key"]).encode() + b"\r\n\r\n",
                                 "no 'Upgrade: websocket'")

    def test_a_subprotocol_not_offered(self):
        return self.refused_with(lambda h: _switching(accept_key(h["sec-websocket-key"]),
                                                      "Sec-WebSocket-Protocol: other"),
                                 "it selected subprotocol 'other'", protocols=["echo"])

    def test_an_extension_not_offered(self):
        return self.refused_with(lambda h: _switching(accept_key(h["sec-websocket-key"]),
                                                      "Sec-WebSocket-Extensions: x-unknown"),
                                 "extensions we did not offer")

    def test_a_malformed_head(self):
        return self.refused_with(lambda h: b"HTTP/1.1 101 Switching\r\nUpgrade websocket\r\n\r\n",
                                 "its response head is malformed")

    @defer.inlineCallbacks
    def test_frames_right_behind_the_101_are_relayed(self):
        factory = _AnsweringFactory(lambda h: _switching(accept_key(h["sec-websocket-key"])) + b"\x81\x05hello")
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        gateway, gateway_port = yield start_gateway(self, proxy_config(port_of(port)))
        client = yield connect_ws(gateway_port)
        self.assertEqual((yield client.messages.get()), (False, [b"hello"]))
        client.transport.abortConnection()
        yield client.closed
