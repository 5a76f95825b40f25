"""The http and ws bindings as plain Twisted protocols on StringTransport: bytes in, bytes out,
no sockets. Also shows them used on their own, without a zilla.yaml."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from zope.interface import implementer

from zillatw.bindings.echo.binding import EchoEnd, EchoServer
from zillatw.bindings.http.binding import HttpServer
from zillatw.bindings.ws.binding import WsServer
from zillatw.bindings.ws.relay import Deadlines
from zillatw.config import Route
from zillatw.stream import IStreamExit, StreamRefused
from zillatw.test.support import client_frame, parse_server_frames, split_response, upgrade_request


@implementer(IStreamExit)
class RefusingExit:
    def open(self, info, peer):
        raise StreamRefused(503, "Service Unavailable")


@implementer(IStreamExit)
class LaterExit:
    """Accepts once the test says so, as a proxy does when its upstream answers."""

    def __init__(self):
        self.pending: list[tuple[Deferred, object]] = []
        self.infos = []

    def open(self, info, peer):
        self.infos.append(info)
        d: Deferred = Deferred()
        self.pending.append((d, peer))
        return d


def gateway_chain(exit_, clock=None, when=()):
    """http -> ws -> exit, built directly from the binding classes."""
    clock = clock or Clock()
    ws = WsServer("ws", [(Route(0, "t:app", when=tuple(when)), exit_)], reactor=clock)
    return HttpServer("http", [(Route(0, "t:ws"), ws)], reactor=clock)


def connect(factory):
    transport = StringTransport()
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return protocol, transport


class HttpProtocolTests(unittest.SynchronousTestCase):
    def test_request_head_fed_byte_by_byte(self):
        protocol, transport = connect(gateway_chain(EchoServer()))
        for byte in upgrade_request("/chat"):
            protocol.dataReceived(bytes([byte]))
        status, headers, _ = split_response(transport.value())
        self.assertEqual(status, "HTTP/1.1 101 Switching Protocols")
        self.assertEqual(headers["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_slow_request_head_times_out_with_408(self):
        clock = Clock()
        protocol, transport = connect(gateway_chain(EchoServer(), clock))
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        clock.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)

    def test_completed_head_cancels_the_timeout(self):
        clock = Clock()
        protocol, transport = connect(gateway_chain(EchoServer(), clock))
        protocol.dataReceived(upgrade_request())
        # What is left is the ws server's keepalive (one call for all its connections), not
        # the head's deadline.
        (call,) = clock.getDelayedCalls()
        self.assertIsInstance(call.func.__self__, Deadlines)
        self.assertEqual(len(call.func.__self__), 1)

    def test_no_route_is_404_then_close(self):
        http = HttpServer("http", [], reactor=Clock())
        protocol, transport = connect(http)
        protocol.dataReceived(upgrade_request())
        status, headers, _ = split_response(transport.value())
        self.assertEqual((status, headers["connection"]), ("HTTP/1.1 404 Not Found", "close"))
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"ignored after the error")

    def test_authority_gets_the_default_port(self):
        seen = []
        ws = WsServer("ws", [(Route(0, "t:app", when=({"authority": "example.com:80"},)), EchoServer())],
                      reactor=Clock())
        ws.accept_request = lambda request, headers, transport, trace_id=0, **kw: seen.append(headers) or \
            WsServer.accept_request(ws, request, headers, transport, trace_id, **kw)
        protocol, transport = connect(HttpServer("http", [(Route(0, "t:ws"), ws)], reactor=Clock()))
        protocol.dataReceived(upgrade_request(headers={"Host": "example.com"}))
        self.assertEqual(seen[0][":authority"], "example.com:80")
        self.assertIn(b" 101 ", transport.value())


class WsProtocolTests(unittest.SynchronousTestCase):
    def open_echo(self):
        protocol, transport = connect(gateway_chain(EchoServer()))
        protocol.dataReceived(upgrade_request())
        _, _, rest = split_response(transport.value())
        self.assertEqual(rest, b"")
        transport.clear()
        return protocol, transport

    def test_echo_keeps_each_fragment_and_its_opcode(self):
        protocol, transport = self.open_echo()
        protocol.dataReceived(client_frame(0x1, b"ab", fin=False) + client_frame(0x9, b"ping")
                              + client_frame(0x0, b"cd", fin=False) + client_frame(0x0, b"e"))
        self.assertEqual(parse_server_frames(transport.value()),
                         [(0x1, False, b"ab"), (0xA, True, b"ping"), (0x0, False, b"cd"), (0x0, True, b"e")])

    def test_last_fragment_waits_for_utf8_check(self):
        """A text message that ends mid-character is closed with 1007, and its last
        fragment is never passed on."""
        protocol, transport = self.open_echo()
        protocol.dataReceived(client_frame(0x1, b"ok", fin=False) + client_frame(0x0, b"\xc3"))
        frames = parse_server_frames(transport.value())
        self.assertEqual(frames[0], (0x1, False, b"ok"))
        self.assertEqual(frames[1][0], 0x8)
        self.assertEqual(int.from_bytes(frames[1][2][:2], "big"), 1007)
        self.assertEqual(len(frames), 2)

    def test_exit_refusal_becomes_the_handshake_status(self):
        protocol, transport = connect(gateway_chain(RefusingExit()))
        protocol.dataReceived(upgrade_request())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))

    def test_101_waits_for_the_exit_to_accept(self):
        exit_ = LaterExit()
        protocol, transport = connect(gateway_chain(exit_))
        protocol.dataReceived(upgrade_request("/later", {"Sec-WebSocket-Protocol": "p1, p2"})
                              + client_frame(0x1, b"early"))
        self.assertEqual(transport.value(), b"")
        info = exit_.infos[0]
        self.assertEqual((info.protocol, info.scheme, info.authority, info.path),
                         ("p1", "http", "localhost:80", "/later"))
        d, peer = exit_.pending[0]
        d.callback(EchoEnd(peer))
        status, headers, rest = split_response(transport.value())
        self.assertEqual((status.split()[1], headers["sec-websocket-protocol"]), ("101", "p1"))
        self.assertEqual(parse_server_frames(rest), [(0x1, True, b"early")])

    def test_exit_refusing_later_is_the_handshake_status(self):
        exit_ = LaterExit()
        protocol, transport = connect(gateway_chain(exit_))
        protocol.dataReceived(upgrade_request())
        exit_.pending[0][0].errback(StreamRefused(502, "Bad Gateway"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 502 "))

    def open_later(self):
        """An open connection whose exit accepted late; -> (the ws end the exit holds, transport)."""
        exit_ = LaterExit()
        protocol, transport = connect(gateway_chain(exit_))
        protocol.dataReceived(upgrade_request())
        d, peer = exit_.pending[0]
        d.callback(EchoEnd(peer))
        transport.clear()
        return peer, transport

    def test_exit_close_code_reaches_the_client(self):
        peer, transport = self.open_later()
        peer.stream_end(1001, "going away")
        self.assertEqual(parse_server_frames(transport.value()), [(0x8, True, b"\x03\xe9going away")])

    def test_unsendable_codes_are_mapped(self):
        peer, transport = self.open_later()
        peer.stream_end(1006, "")
        frame = parse_server_frames(transport.value())[0]
        self.assertEqual(int.from_bytes(frame[2][:2], "big"), 1011)


class WsTimerTests(unittest.SynchronousTestCase):
    """The ws connection's timers on a Clock: keepalive, close timeout."""

    def open(self, **options):
        self.clock = Clock()
        ws = WsServer("ws", [(Route(0, "t:app"), EchoServer())], reactor=self.clock, **options)
        protocol, transport = connect(HttpServer("http", [(Route(0, "t:ws"), ws)], reactor=self.clock))
        protocol.dataReceived(upgrade_request())
        self.assertIn(b" 101 ", transport.value())
        transport.clear()
        (server,) = ws.connections
        return protocol, transport, server

    def test_a_ping_every_interval_while_the_pongs_come(self):
        protocol, transport, server = self.open(ping_interval=5, ping_timeout=2)
        for round_ in range(1, 4):
            self.clock.advance(4.9)
            self.assertEqual(transport.value(), b"")
            self.clock.advance(0.1)
            (ping,) = parse_server_frames(transport.value())
            self.assertEqual(ping, (0x9, True, round_.to_bytes(4, "big")))
            transport.clear()
            self.clock.advance(1.9)
            protocol.dataReceived(client_frame(0xA, ping[2]))
        self.assertEqual(server.pings_sent, 3)
        self.assertFalse(transport.disconnecting)

    def test_a_late_or_wrong_pong_drops_the_connection(self):
        protocol, transport, server = self.open(ping_interval=5, ping_timeout=2)
        self.clock.advance(5)
        protocol.dataReceived(client_frame(0xA, b"not ours"))  # unsolicited pongs are allowed, and ignored
        self.clock.advance(1.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)  # aborted: no close handshake with a peer that does not answer
        self.assertEqual([f[0] for f in parse_server_frames(transport.value())], [0x9])

    def test_our_close_unanswered_is_aborted_after_close_timeout(self):
        protocol, transport, server = self.open(close_timeout=3, ping_interval=0)
        server.going_away("maintenance")
        self.assertEqual(parse_server_frames(transport.value()), [(0x8, True, b"\x03\xe9maintenance")])
        self.clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_an_answered_close_closes_tcp_and_cancels_the_timers(self):
        protocol, transport, server = self.open(close_timeout=3, ping_interval=5)
        server.going_away("maintenance")
        protocol.dataReceived(client_frame(0x8, (1001).to_bytes(2, "big")))
        self.assertTrue(transport.disconnecting)
        self.assertTrue(server.was_clean)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DeadlinesTests(unittest.SynchronousTestCase):
    """The keepalive's shared timer: one reactor call, entries due in the order added."""

    def test_each_item_fires_its_delay_after_it_was_added(self):
        clock, fired = Clock(), []
        deadlines = Deadlines(clock, 10, lambda item: fired.append((item, clock.seconds())))
        deadlines.add("a")
        clock.advance(3)
        deadlines.add("b")
        deadlines.add("c")
        clock.advance(4)
        deadlines.add("a")  # restarted: now due at 17
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(6)
        self.assertEqual(fired, [("b", 13.0), ("c", 13.0)])
        self.assertTrue(deadlines.discard("a"))
        self.assertFalse(deadlines.discard("a"))
        self.assertEqual(clock.getDelayedCalls(), [])  # nothing waits: no reactor call either
        clock.advance(10)
        self.assertEqual(len(fired), 2)

    def test_an_item_added_again_while_firing_waits_a_whole_delay(self):
        clock, fired = Clock(), []

        def fire(item):
            fired.append(clock.seconds())
            if len(fired) < 3:
                deadlines.add(item)
        deadlines = Deadlines(clock, 2.5, fire)
        deadlines.add("x")
        clock.pump([2.5] * 5)
        self.assertEqual(fired, [2.5, 5.0, 7.5])
        self.assertEqual(clock.getDelayedCalls(), [])


class IdleMemoryTests(unittest.SynchronousTestCase):
    def test_an_idle_connection_holds_little_python_heap(self):
        """Idle connections are most of a gateway's: what one holds past its handshake, with
        the http server's protocol and a StringTransport (bench/suite.py's idle scenario
        measures the RSS of real sockets)."""
        import gc
        import tracemalloc
        ws = WsServer("ws", [(Route(0, "t:app"), EchoServer())], reactor=Clock())
        http = HttpServer("http", [(Route(0, "t:ws"), ws)], reactor=Clock())

        def idle():
            protocol, transport = connect(http)
            protocol.dataReceived(upgrade_request())
            transport.clear()
            return protocol, transport
        kept = [idle() for _ in range(50)]  # first ones: lazy imports, caches
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept += [idle() for _ in range(1000)]
            gc.collect()
            per_connection = (tracemalloc.get_traced_memory()[0] - before) / 1000
        finally:
            tracemalloc.stop()
        self.assertEqual(len(ws.connections), 1050)
        self.assertLess(per_connection, 2560)  # measured 1860 bytes (Python 3.11, Twisted 26.10)
