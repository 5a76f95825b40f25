"""zillatw.wire connections both ways: random messages (fragmented, compressed, with pings
between the fragments) from a client core to a server core and back, then the core over a
real loopback socket (zillatw.test.wire_echo) against the `websockets` library's client and
Autobahn's Twisted client. (The per-rule tests: test_wire_connection.)"""

from __future__ import annotations

import random
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase, TestCase

from zillatw.test.wire_echo import CoreEchoFactory
from zillatw.test.wire_support import failure, messages
from zillatw.wire import Connection, Delivery, Fragment, Opcode, Ping, Role, State


def _random_message(rng: random.Random) -> tuple[Opcode, bytes]:
    size = rng.choice((0, 1, 125, 126, rng.randrange(2, 2000), rng.randrange(60000, 70000), rng.randrange(1, 300000)))
    if rng.random() < 0.5:
        text = "".join(rng.choice("aé€😀 ") for _ in range(size // 3 + 1))
        return Opcode.TEXT, text.encode()
    return Opcode.BINARY, rng.randbytes(size)


def send_randomly(rng: random.Random, conn: Connection, opcode: Opcode, payload: bytes) -> None:
    """The message in random fragments, with pings between them."""
    if rng.random() < 0.4 or not payload:
        conn.send_fragment(opcode, payload)
        return
    cuts = sorted(rng.sample(range(1, len(payload) + 1), min(len(payload), rng.randrange(1, 6))))
    start = 0
    for i, cut in enumerate(cuts):
        fin = i == len(cuts) - 1
        conn.send_fragment(opcode if i == 0 else Opcode.CONTINUATION, payload[start:cut if not fin else None], fin)
        start = cut
        if not fin and rng.random() < 0.3:
            conn.send_ping(b"%d" % i)


def pass_bytes(rng: random.Random, source: Connection, sink: Connection) -> None:
    data = b"".join(source.data_to_send())
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 7, 1000, 65536, 1 << 20))
        sink.receive_data(data[pos:pos + step])
        pos += step


class RoundTripTests(SynchronousTestCase):
    def test_random_messages_both_ways(self) -> None:
        from zillatw.wire import DeflateParams
        for seed in range(12):
            rng = random.Random(seed)
            deflate = DeflateParams(client_no_context_takeover=seed % 4 == 1, server_no_context_takeover=seed % 4 == 2,
                                    client_max_window_bits=rng.choice((9, 12, 15))) if seed % 2 else None
            client = Connection(Role.CLIENT, deflate=deflate, max_message_size=None)
            srv = Connection(Role.SERVER, deflate=deflate, max_message_size=None,
                             delivery=rng.choice(list(Delivery)))
            sent_messages = [_random_message(rng) for _ in range(25)]
            for opcode, payload in sent_messages:
                send_randomly(rng, client, opcode, payload)
            pass_bytes(rng, client, srv)
            received = srv.events_received()
            self.assertIsNone(failure(received), seed)
            self.assertEqual(messages(received), sent_messages, seed)
            # and back, relaying each fragment as it came (opcode and fin kept)
            for event in received:
                if isinstance(event, Fragment):
                    srv.send_fragment(event.opcode, event.data, event.fin)
            pass_bytes(rng, srv, client)
            echoed = client.events_received()
            self.assertEqual(messages(echoed), sent_messages, seed)
            pongs = [e for e in echoed if type(e).__name__ == "Pong"]
            self.assertEqual(len(pongs), sum(1 for e in received if isinstance(e, Ping)))
            client.send_close(1000, "done")
            pass_bytes(rng, client, srv)
            pass_bytes(rng, srv, client)
            self.assertEqual((client.state, srv.state), (State.CLOSED, State.CLOSED))
            self.assertEqual(client.close_received, (1000, "done"))


class RealClientTests(TestCase):
    """The core over a real loopback socket (zillatw.test.wire_echo), against the
    `websockets` library's client and Autobahn's Twisted client: random messages,
    fragmented and compressed, all come back intact."""

    def listen(self) -> int:
        from twisted.internet import reactor
        self.factory = CoreEchoFactory(reactor)
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    def fragments_read(self) -> int:
        return self.factory.connections[-1].fragments_read

    @defer.inlineCallbacks
    def test_websockets_client(self) -> Any:
        port = self.listen()
        for compression in ("deflate", None):
            rng = random.Random(compression or "plain")
            sent_messages = [_random_message(rng) for _ in range(30)]
            echoed, extensions = yield threads.deferToThread(_websockets_exchange, port, compression,
                                                             sent_messages, rng)
            self.assertEqual(echoed, sent_messages)
            self.assertEqual(extensions, ["PerMessageDeflate"] if compression else [])
            self.assertGreater(self.fragments_read(), 0)

    @defer.inlineCallbacks
    def test_autobahn_client(self) -> Any:
        port = self.listen()
        for compress in (True, False):
            rng = random.Random(int(compress))
            sent_messages = [_random_message(rng) for _ in range(30)]
            client = yield _autobahn_exchange(port, compress, sent_messages, 100 if compress else 4096)
            self.assertEqual(client.received, sent_messages)
            self.assertGreater(self.fragments_read(), 0)
            self.assertEqual(client.compressed, compress)
            self.assertEqual((client.was_clean, client.code), (True, 1000))


def _websockets_exchange(port: int, compression: str | None, sent_messages: list[tuple[Opcode, bytes]],
                         rng: random.Random) -> tuple[list[tuple[Opcode, bytes]], list[str]]:
    from websockets.sync.client import connect
    echoed = []
    with connect(f"ws://127.0.0.1:{port}/", compression=compression, max_size=None, open_timeout=10) as ws:
        extensions = [type(e).__name__ for e in ws.protocol.extensions]
        for opcode, payload in sent_messages:
            message: Any = payload.decode() if opcode == Opcode.TEXT else payload
            if len(payload) > 10 and rng.random() < 0.5:  # fragmented: an iterable of pieces
                step = rng.randrange(1, len(payload) // 2)
                pieces = [payload[i:i + step] for i in range(0, len(payload), step)]
                message = [p.decode() for p in _utf8_pieces(payload, step)] if opcode == Opcode.TEXT else pieces
            ws.send(message)
            reply = ws.recv(timeout=10)
            echoed.append((Opcode.TEXT, reply.encode()) if isinstance(reply, str) else (Opcode.BINARY, reply))
    return echoed, extensions


def _utf8_pieces(payload: bytes, step: int) -> list[bytes]:
    """`payload` in pieces of about `step` bytes, cut on character boundaries."""
    pieces, start = [], 0
    while start < len(payload):
        end = min(start + step, len(payload))
        while end < len(payload) and payload[end] & 0xC0 == 0x80:
            end += 1
        pieces.append(payload[start:end])
        start = end
    return pieces


class _AutobahnFactory(WebSocketClientFactory):
    """Sends `messages` one at a time, each after the previous one's echo; `done` fires on close."""

    def __init__(self, url: str, messages: list[tuple[Opcode, bytes]]) -> None:
        super().__init__(url)
        self.protocol = _AutobahnClient
        self.messages = messages
        self.done: defer.Deferred[_AutobahnClient] = defer.Deferred()


class _AutobahnClient(WebSocketClientProtocol):
    factory: _AutobahnFactory

    def onOpen(self) -> None:
        self.received: list[tuple[Opcode, bytes]] = []
        self.compressed = self._perMessageCompress is not None
        self.send_next()

    def send_next(self) -> None:
        if len(self.received) == len(self.factory.messages):
            self.sendClose(1000)
            return
        opcode, payload = self.factory.messages[len(self.received)]
        self.sendMessage(payload, isBinary=opcode == Opcode.BINARY)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append((Opcode.BINARY if isBinary else Opcode.TEXT, payload))
        self.send_next()

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.was_clean, self.code = wasClean, code
        if not self.factory.done.called:
            self.factory.done.callback(self)


def _autobahn_exchange(port: int, compress: bool, sent_messages: list[tuple[Opcode, bytes]],
                       fragment_size: int) -> defer.Deferred:
    from twisted.internet import reactor
    factory = _AutobahnFactory(f"ws://127.0.0.1:{port}/", sent_messages)
    factory.setProtocolOptions(
        autoFragmentSize=fragment_size, maxMessagePayloadSize=0, maxFramePayloadSize=0,
        perMessageCompressionOffers=[PerMessageDeflateOffer()] if compress else [],
        perMessageCompressionAccept=lambda response: PerMessageDeflateResponseAccept(response))
    reactor.connectTCP("127.0.0.1", port, factory)
    return factory.done.addTimeout(30, reactor)
