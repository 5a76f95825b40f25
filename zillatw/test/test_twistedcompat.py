"""What zillatw.twistedcompat relies on in Twisted and pyOpenSSL: each touch its module
docstring lists, checked to exist and to behave as assumed, so a release that changes one
fails here, loudly, rather than on the data path."""

from __future__ import annotations

import inspect

from twisted.internet import defer, epollreactor, reactor, tcp
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


class WriteThroughTests(unittest.TestCase):
    """Touch 1: an idle TCP transport is written to at once, through writeSomeData."""

    @defer.inlineCallbacks
    def connected(self):
        factory = Factory.forProtocol(_Sink)
        factory.protocols = []
        build = factory.buildProtocol
        factory.buildProtocol = lambda addr: factory.protocols.append(build(addr)) or factory.protocols[-1]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield connect_raw(port.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        yield eventually(lambda: factory.protocols)
        return client.transport, factory.protocols[0]

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
