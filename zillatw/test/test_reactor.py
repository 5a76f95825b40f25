"""zillatw's epoll reactor (zillatw.runtime.reactor): Twisted's, less the per-event log context."""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial import unittest

from zillatw.runtime.reactor import EPollReactor
from zillatw.test.support import CONF

ROOT = os.path.dirname(CONF)


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


# Imports every module of the package, then builds the gateway as `twistd zillaws` does.
TWISTD_STARTS = """
import pkgutil, sys, importlib
import zillatw
for module in pkgutil.walk_packages(zillatw.__path__, "zillatw."):
    # redisproto (txredisapi) is imported when a fan's Redis link starts, never before
    if ".test" not in module.name and module.name != "zillatw.bindings.fan.redisproto":
        importlib.import_module(module.name)
print("installed by imports:", "twisted.internet.reactor" in sys.modules)
from zillatw import tap
options = tap.Options()
options.parseOptions(["-c", sys.argv[1]])
tap.makeService(options)
from twisted.internet import reactor
print("reactor:", type(reactor).__module__, type(reactor).__name__)
"""


class TwistdReactorTests(unittest.TestCase):
    def test_twistd_zillaws_runs_on_zillatws_reactor(self):
        """No zillatw module installs a reactor when imported (txredisapi does: it is imported
        only when a fan's Redis link starts), so twistd zillaws installs its own."""
        out = subprocess.run([sys.executable, "-c", TWISTD_STARTS, os.path.join(CONF, "ws.reflect.redis.yaml")],
                             capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("installed by imports: False", out.stdout)
        self.assertIn("reactor: zillatw.twistedcompat EPollReactor", out.stdout)
