"""The tcp server binding: several ports, routes by port and client address, and any Twisted
server endpoint (here a unix socket)."""

from __future__ import annotations

import os
import shutil
import tempfile

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.trial import unittest

from zillatw.test.support import (
    ReactorTimer,
    RecordingClient,
    chain,
    close_ws,
    connect_raw,
    connect_ws,
    free_port,
    start_gateway,
)


class TcpRoutingTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_routes_by_listening_port_and_closes_unrouted_connections(self):
        routed, unrouted = free_port(), free_port()
        config = chain()
        config["bindings"]["tcp0"] = {
            "type": "tcp", "kind": "server",
            "options": {"host": "127.0.0.1", "port": [routed, str(unrouted)]},
            "routes": [{"when": [{"port": routed}], "exit": "http0"}],
        }
        gateway, _ = yield start_gateway(self, config)
        self.assertEqual(sorted(gateway.ports()), sorted([routed, unrouted]))
        client = yield connect_ws(routed)
        client.sendMessage(b"routed")
        self.assertEqual((yield client.messages.get()), (False, [b"routed"]))
        yield close_ws(client)
        raw = yield connect_raw(unrouted)
        raw.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual((yield raw.done), b"")  # closed without a byte

    @defer.inlineCallbacks
    def test_cidr_routes_test_the_client_address(self):
        config = chain()
        config["bindings"]["tcp0"]["routes"] = [{"when": [{"cidr": "10.0.0.0/8"}], "exit": "http0"}]
        del config["bindings"]["tcp0"]["exit"]
        gateway, port = yield start_gateway(self, config)
        raw = yield connect_raw(port)
        self.assertEqual((yield raw.done), b"")
        config["bindings"]["tcp0"]["routes"][0]["when"][0]["cidr"] = "127.0.0.0/8"
        gateway, port = yield start_gateway(self, config)
        client = yield connect_ws(port)
        yield close_ws(client)


class EndpointTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unix_socket_endpoint(self):
        # AF_UNIX paths are limited to ~107 bytes: trial's temp directory can be deeper than that
        folder = tempfile.mkdtemp(prefix="zillatw-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "ws.sock")
        config = chain()
        config["bindings"]["tcp0"]["options"] = {"endpoint": f"unix:{path}"}
        gateway, _ = yield start_gateway(self, config)
        factory = WebSocketClientFactory("ws://localhost/")
        factory.protocol = RecordingClient
        factory._batched_timer = ReactorTimer()
        client = yield UNIXClientEndpoint(reactor, path).connect(factory)
        yield client.opened
        client.sendMessage(b"over a unix socket")
        self.assertEqual((yield client.messages.get()), (False, [b"over a unix socket"]))
        yield close_ws(client)
