"""zillatw's epoll reactor (zillatw.runtime.reactor): Twisted's, less the per-event log context."""

from __future__ import annotations

from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest

from zillatw.runtime.reactor import EPollReactor


class ReactorTests(unittest.TestCase):
    def test_zillatw_reactor_carries_a_tcp_exchange(self):
        fast = EPollReactor()
        received = []

        class Echo(Protocol):
            def dataReceived(self, data):
                self.transport.write(data)

        class Client(Protocol):
            def connectionMade(self):
                self.transport.write(b"ping")

            def dataReceived(self, data):
                received.append(data)
                self.transport.loseConnection()
                fast.stop()

        port = fast.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        fast.connectTCP("127.0.0.1", port.getHost().port, ClientFactory.forProtocol(Client))
        fast.callLater(10, fast.stop)
        fast.run(installSignalHandlers=False)
        port.stopListening()
        self.assertEqual(received, [b"ping"])

    def test_an_error_in_one_event_is_logged_and_the_rest_still_run(self):
        fast = EPollReactor()
        handled = []

        def handle(selectable, fd, event):
            handled.append(fd)
            if fd == 1:
                raise RuntimeError("boom")

        fast._doReadOrWrite = handle
        fast._poller = type("Poller", (), {"poll": lambda self, timeout, n: [(1, 1), (2, 1)]})()
        fast._selectables = {1: "a", 2: "b"}
        fast.doPoll(0)
        self.assertEqual(handled, [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
