"""What zillatw.twistedcompat relies on in Twisted and pyOpenSSL: each touch its module
docstring lists, checked to exist and to behave as assumed, so a release that changes one
fails here, loudly, rather than on the data path."""

from __future__ import annotations

import inspect
import os

from twisted.internet import defer, epollreactor, error, reactor, tcp
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from zillatw import twistedcompat
from zillatw.test.support import connect_raw, eventually


class _Sink(Protocol):
    def __init__(self):
        self.data = b""

    def dataReceived(self, data):
        self.data += data


def _listening(case):
    """A loopback listener whose _Sink protocols are kept in order; (its port, the list)."""
    factory = Factory.forProtocol(_Sink)
    factory.protocols = []
    build = factory.buildProtocol
    factory.buildProtocol = lambda addr: factory.protocols.append(build(addr)) or factory.protocols[-1]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return port.getHost().port, factory.protocols


class WriteThroughTests(unittest.TestCase):
    """Touch 1: an idle TCP transport is written to at once, through writeSomeData."""

    @defer.inlineCallbacks
    def connected(self):
        port, protocols = _listening(self)
        client = yield connect_raw(port)
        self.addCleanup(client.transport.loseConnection)
        yield eventually(lambda: protocols)
        return client.transport, protocols[0]

    @defer.inlineCallbacks
    def test_the_transport_internals_exist(self):
        transport, _ = yield self.connected()
        self.assertIsInstance(transport, tcp.Client)
        for name in ("dataBuffer", "_tempDataBuffer", "connected", "disconnecting", "_aborting",
                     "_writeDisconnecting", "TLS"):
            self.assertTrue(hasattr(transport, name), name)
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        self.assertEqual(list(inspect.signature(transport.writeSomeData).parameters), ["data"])
        self.assertIs(transport.socket, transport.getHandle())
        self.assertTrue(hasattr(transport.socket, "sendmsg"))

    @defer.inlineCallbacks
    def test_an_idle_tcp_transport_sends_at_once(self):
        transport, sink = yield self.connected()
        twistedcompat.write(transport, b"hello")
        self.assertNotIn(transport, reactor.getWriters())  # sent, not registered for writing
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        twistedcompat.write_sequence(transport, [b" head", b" payload"])
        self.assertNotIn(transport, reactor.getWriters())
        transport.write(b" buffered")  # something waits: the next writes queue behind it
        twistedcompat.write(transport, b" world")
        twistedcompat.write_sequence(transport, [b" and", b" more"])
        self.assertEqual(transport._tempDataBuffer, [b" buffered", b" world", b" and", b" more"])
        yield eventually(lambda: sink.data == b"hello head payload buffered world and more")

    @defer.inlineCallbacks
    def test_a_closing_transport_is_not_written_through(self):
        transport, _ = yield self.connected()
        transport.loseConnection()
        self.assertTrue(transport.disconnecting)
        twistedcompat.write(transport, b"late")  # left to Twisted's write, which queues it
        self.assertEqual(transport._tempDataBuffer, [b"late"])

    @defer.inlineCallbacks
    def test_a_counted_transport_is_counted_and_still_written_through(self):
        transport, sink = yield self.connected()
        outer, inner = [], []
        counted = twistedcompat.CountedTransport(
            twistedcompat.CountedTransport(transport, inner.append), outer.append)
        twistedcompat.write_sequence(counted, [b"head", b"payload"])
        twistedcompat.write(counted, b"!")
        self.assertNotIn(transport, reactor.getWriters())  # through to the socket at once
        self.assertEqual((outer, inner), ([11, 1], [11, 1]))
        counted.writeSequence([b"x", b"yz"])  # a protocol's own write: counted, then Twisted's
        self.assertEqual((outer[-1], inner[-1]), (3, 3))
        self.assertEqual(counted.getPeer(), transport.getPeer())
        self.assertTrue(ITCPTransport.providedBy(counted))
        yield eventually(lambda: sink.data == b"headpayload!xyz")

    @defer.inlineCallbacks
    def test_a_full_socket_keeps_the_rest_in_order(self):
        transport, sink = yield self.connected()
        sink.transport.pauseProducing()  # the peer stops reading: the socket fills up
        big = b"x" * (8 * 1024 * 1024)
        twistedcompat.write_sequence(transport, [b"head", big, b"tail"])
        self.assertGreater(transport._tempDataLen + len(transport.dataBuffer), 0)  # the rest waits in Twisted
        sink.transport.resumeProducing()
        yield eventually(lambda: len(sink.data) == len(big) + 8, timeout=10)
        self.assertEqual(sink.data[:4] + sink.data[-4:], b"headtail")

    @defer.inlineCallbacks
    def test_nothing_buffered_only_while_a_write_would_go_straight_out(self):
        """What the http express lane asks before it writes a request and its response."""
        transport, sink = yield self.connected()
        self.assertTrue(twistedcompat.nothing_buffered(transport))
        sink.transport.pauseProducing()
        twistedcompat.write(transport, b"x" * (8 * 1024 * 1024))  # more than the socket takes
        self.assertFalse(twistedcompat.nothing_buffered(transport))
        sink.transport.resumeProducing()
        yield eventually(lambda: twistedcompat.nothing_buffered(transport), timeout=10)
        transport.loseConnection()
        self.assertFalse(twistedcompat.nothing_buffered(transport))
        self.assertFalse(twistedcompat.nothing_buffered(StringTransport()))
        yield eventually(lambda: not sink.transport.connected)

    def test_other_transports_are_written_to(self):
        transport = StringTransport()
        twistedcompat.write(transport, b"abc")
        twistedcompat.write_sequence(transport, [b"d", b"ef"])
        self.assertEqual(transport.value(), b"abcdef")


class ReactorInternalsTests(unittest.TestCase):
    """Touch 2: what EPollReactor.doPoll replaces and calls."""

    def test_the_epoll_reactor_has_what_doPoll_uses(self):
        fresh = epollreactor.EPollReactor()
        self.addCleanup(fresh._poller.close)
        for name in ("_poller", "_selectables", "_doReadOrWrite", "doPoll"):
            self.assertTrue(hasattr(fresh, name), name)
        self.assertIsInstance(fresh._selectables, dict)
        self.assertEqual(list(inspect.signature(fresh._doReadOrWrite).parameters), ["selectable", "fd", "event"])
        self.assertTrue(issubclass(twistedcompat.EPollReactor, epollreactor.EPollReactor))


class _Owner:
    """A SpliceOwner that notes what it is told."""

    def __init__(self):
        self.moved, self.blocked, self.done, self.lost = 0, [], defer.Deferred(), False

    def splice_moved(self, size):
        self.moved += size

    def splice_blocked(self, blocked):
        self.blocked.append(blocked)

    def splice_done(self, size):
        self.done.callback(size)

    def splice_lost(self):
        self.lost = True


class SpliceTests(unittest.TestCase):
    """Touch 5: the reactor calls the doRead and doWrite a transport instance shadows, and
    Twisted's own again once the attributes are deleted."""

    @defer.inlineCallbacks
    def pair(self):
        """(source: a server transport a client writes to, its sink: Protocol, the writing
        client; sink: a client transport whose server-side protocol collects)."""
        port, protocols = _listening(self)
        writer = yield connect_raw(port)
        reader_side = yield connect_raw(port)
        for client in (writer, reader_side):
            self.addCleanup(client.transport.loseConnection)
        yield eventually(lambda: len(protocols) == 2)
        source_protocol, collector = protocols
        return source_protocol, writer, reader_side.transport, collector

    def test_the_reactor_and_transport_names_exist(self):
        self.assertTrue(twistedcompat.CAN_SPLICE)
        for name in ("doRead", "stopReading", "startReading", "startWriting", "fileno", "connected"):
            self.assertTrue(hasattr(tcp.Server, name) and hasattr(tcp.Client, name), name)
        self.assertFalse(hasattr(tcp.Server, "__slots__"))  # instance attributes can shadow methods
        wrapping = twistedcompat.endpoints._WrappingProtocol(defer.Deferred(), _Sink())
        self.assertIsInstance(wrapping._wrappedProtocol, _Sink)
        source = inspect.getsource(twistedcompat.epollreactor.EPollReactor._doReadOrWrite)
        self.assertIn("selectable.doRead()", source)
        self.assertIn("selectable.doWrite()", source)

    @defer.inlineCallbacks
    def test_a_splice_moves_its_length_and_hands_the_rest_back(self):
        source_protocol, writer, sink, collector = yield self.pair()
        owner = _Owner()
        splice = twistedcompat.Splice(source_protocol.transport, sink, 300_000, owner, [], [])
        payload = os.urandom(300_000)
        writer.transport.write(payload + b"after the body")
        moved = yield owner.done
        self.assertEqual(moved, 300_000)
        self.assertTrue(splice.over)
        self.assertNotIn("doRead", vars(source_protocol.transport))
        yield eventually(lambda: len(collector.data) == 300_000)
        self.assertEqual(collector.data, payload)  # through the kernel, never through Python
        yield eventually(lambda: source_protocol.data == b"after the body")  # Twisted's read again

    @defer.inlineCallbacks
    def test_a_full_sink_stops_the_source_until_it_drains(self):
        source_protocol, writer, sink, collector = yield self.pair()
        collector.transport.pauseProducing()  # the sink's reader reads nothing for now
        owner = _Owner()
        size = 32 * 1024 * 1024
        counted = []
        twistedcompat.Splice(source_protocol.transport, sink, size, owner, [counted.append], [])
        writer.transport.write(b"s" * size)
        yield eventually(lambda: owner.blocked == [True])
        self.assertNotIn(source_protocol.transport, reactor.getReaders())
        self.assertIn(sink, reactor.getWriters())
        collector.transport.resumeProducing()
        moved = yield owner.done
        self.assertEqual((moved, sum(counted), owner.moved), (size, size, size))
        self.assertEqual(owner.blocked[:2], [True, False])
        self.assertIn(source_protocol.transport, reactor.getReaders())
        self.assertNotIn("doWrite", vars(sink))
        yield eventually(lambda: len(collector.data) == size)

    @defer.inlineCallbacks
    def test_a_source_ending_early_is_closed_by_twisted(self):
        source_protocol, writer, sink, collector = yield self.pair()
        lost = defer.Deferred()
        source_protocol.connectionLost = lambda reason: lost.callback(reason.type)
        owner = _Owner()
        splice = twistedcompat.Splice(source_protocol.transport, sink, 1_000_000, owner, [], [])
        writer.transport.write(b"x" * 1000)
        yield eventually(lambda: owner.moved == 1000)
        writer.transport.loseConnection()
        why = yield lost
        self.assertIs(why, error.ConnectionDone)  # Twisted's read found the end, as without a splice
        self.assertTrue(owner.lost and splice.over)
        self.assertFalse(owner.done.called)

    @defer.inlineCallbacks
    def test_a_cancelled_splice_gives_both_back(self):
        source_protocol, writer, sink, collector = yield self.pair()
        owner = _Owner()
        splice = twistedcompat.Splice(source_protocol.transport, sink, 1_000_000, owner, [], [])
        splice.cancel()
        self.assertTrue(splice.over)
        writer.transport.write(b"now Twisted's")
        yield eventually(lambda: source_protocol.data == b"now Twisted's")
        self.assertEqual(owner.moved, 0)


class PyOpenSSLInternalsTests(unittest.TestCase):
    """Touch 3: the cffi bindings zillatw.bindings.tls.context uses."""

    def test_the_cffi_names_exist(self):
        from OpenSSL._util import ffi, lib
        for name in ("X509_verify_cert_error_string", "SSL_CTX_set_tlsext_servername_callback",
                     "SSL_TLSEXT_ERR_ALERT_FATAL", "SSL_TLSEXT_ERR_OK"):
            self.assertTrue(hasattr(lib, name), name)
        self.assertEqual(ffi.string(lib.X509_verify_cert_error_string(10)).decode(), "certificate has expired")


class H2InternalsTests(unittest.TestCase):
    """What twistedcompat.H2ServerConnectionCore relies on in h2."""

    def request_without_path(self):
        import h2.config
        import h2.connection
        client = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
        client.initiate_connection()
        client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "a")], end_stream=True)
        return client.data_to_send()

    def server(self, core):
        import h2.config
        server = core(h2.config.H2Configuration(client_side=False))
        server.initiate_connection()
        return server

    def test_h2_refuses_a_malformed_block_from_its_header_validation(self):
        import h2.connection
        import h2.exceptions
        self.assertTrue(callable(getattr(h2.connection.H2Connection, "_receive_headers_frame", None)))
        server = self.server(h2.connection.H2Connection)
        with self.assertRaises(h2.exceptions.ProtocolError) as caught:
            server.receive_data(self.request_without_path())
        self.assertTrue(twistedcompat._raised_by_validation(caught.exception))

    def test_our_core_resets_the_stream_and_keeps_the_connection(self):
        import h2.events
        server = self.server(twistedcompat.H2ServerConnectionCore)
        events = server.receive_data(self.request_without_path())
        self.assertFalse(any(isinstance(e, h2.events.RequestReceived) for e in events))
        self.assertEqual([stream for stream, _ in server.malformed], [1])
        self.assertFalse(server.state_machine.state.name == "CLOSED")
