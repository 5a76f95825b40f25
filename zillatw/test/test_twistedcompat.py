"""What zillatw.twistedcompat relies on in Twisted and pyOpenSSL: each touch its module
docstring lists, checked to exist and to behave as assumed, so a release that changes one
fails here, loudly, rather than on the data path."""

from __future__ import annotations

import inspect

from twisted.internet import defer, epollreactor, reactor, tcp
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
    def test_a_wrapped_writeSomeData_sees_every_chunk(self):
        transport, sink = yield self.connected()
        counted = []
        send = transport.writeSomeData
        transport.writeSomeData = lambda data: counted.append(len(data)) or send(data)  # as zillatw.telemetry.metrics
        twistedcompat.write_sequence(transport, [b"head", b"payload"])
        self.assertEqual(counted, [4, 7])
        yield eventually(lambda: sink.data == b"headpayload")

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
