"""Hot reload: Gateway.reload in process, the file watcher, and SIGHUP to `twistd zillaws`."""

from __future__ import annotations

import io
import os
import signal

import yaml
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from zillatw import build_gateway
from zillatw.reload import watched_files
from zillatw.test.support import (chain, close_ws, connect_raw, connect_ws, eventually, split_response,
                                  upgrade_request, wait)
from zillatw.test.test_tap import ENV, ROOT, TWISTD, Collect, free_port


def routed(paths, max_message=1_000_000, port=0):
    """tcp -> http -> ws routing `paths` to echo, with max-message-size."""
    config = chain(ws_routes=[{"when": [{"path": path}], "exit": "echo"} for path in paths],
                   ws_options={"max-message-size": max_message})
    config["bindings"]["tcp0"]["options"]["port"] = port
    return config


def write(path, config):
    with open(path, "w") as f:
        if isinstance(config, str):
            f.write(config)
        else:
            yaml.safe_dump(config, f)


@defer.inlineCallbacks
def status_of(port, path):
    raw = yield connect_raw(port)
    raw.transport.write(upgrade_request(path))
    yield eventually(lambda: b"\r\n\r\n" in raw.data)
    raw.transport.loseConnection()
    return split_response(raw.data)[0]


class ReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, config):
        self.path = os.path.abspath(self.mktemp())
        write(self.path, config)
        self.events = io.StringIO()
        gateway = build_gateway(self.path, event_stream=self.events)
        gateway.startService()
        self.addCleanup(lambda: gateway.stopService() if gateway.running else None)
        ports = yield gateway.listening
        return gateway, ports[0]

    @defer.inlineCallbacks
    def test_new_connections_get_the_new_bindings_open_ones_keep_theirs(self):
        gateway, port = yield self.start(routed(["/a"], max_message=1000))
        old = yield connect_ws(port, "/a")
        self.assertEqual((yield status_of(port, "/b")), "HTTP/1.1 404 Not Found")
        listening = gateway.servers()[0].listening[0]

        write(self.path, routed(["/a", "/b"], max_message=10))
        self.assertTrue((yield gateway.reload()))

        # The same socket, now routing to the new graph.
        self.assertIs(gateway.servers()[0].listening[0], listening)
        self.assertEqual(gateway.ports(), [port])
        self.assertIn("CONFIG_RELOADED", self.events.getvalue())
        new = yield connect_ws(port, "/b")   # a route only the new configuration has
        # The open connection keeps its ws server, with max-message-size 1000 ...
        old.sendMessage(b"x" * 100)
        self.assertEqual((yield old.messages.get()), (False, [b"x" * 100]))
        # ... the new one gets the new server's 10.
        new.sendMessage(b"x" * 100)
        _, code, _ = yield new.closed
        self.assertEqual(code, 1009)
        self.assertEqual(len(gateway.retired), 1)  # the old bindings, while `old` uses them
        yield close_ws(old)
        yield eventually(lambda: gateway.prune_retired() or not gateway.retired)

    @defer.inlineCallbacks
    def test_an_invalid_file_keeps_the_old_configuration_and_says_why(self):
        gateway, port = yield self.start(routed(["/a"]))
        bad = routed(["/a", "/b"])
        bad["bindings"]["ws0"]["routes"][1]["exit"] = "echo_sever"
        write(self.path, bad)
        self.assertFalse((yield gateway.reload()))
        events = self.events.getvalue()
        self.assertRegex(events, r"test:engine \[[^]]+\] \[0{16}d\] CONFIG_RELOAD_FAILED "
                                 r"bindings.ws0.routes\[1\].exit: no binding named 'echo_sever'")
        self.assertNotIn("CONFIG_RELOADED", events)
        client = yield connect_ws(port, "/a")  # still served, by the old bindings
        client.sendMessage(b"still here")
        self.assertEqual((yield client.messages.get()), (False, [b"still here"]))
        yield close_ws(client)
        self.assertEqual((yield status_of(port, "/b")), "HTTP/1.1 404 Not Found")

        write(self.path, "name: test\nbindings: [")  # not even YAML
        self.assertFalse((yield gateway.reload()))
        self.assertIn("invalid YAML", self.events.getvalue().splitlines()[-1])

    @defer.inlineCallbacks
    def test_a_listener_that_moved_closes_and_its_connections_stay(self):
        gateway, port = yield self.start(routed(["/a"]))
        old = yield connect_ws(port, "/a")
        moved = free_port()
        write(self.path, routed(["/a"], port=moved))
        self.assertTrue((yield gateway.reload()))
        self.assertEqual(gateway.ports(), [moved])
        yield self.assertFailure(connect_ws(port, "/a"), ConnectionRefusedError)
        new = yield connect_ws(moved, "/a")
        for client in (old, new):
            client.sendMessage(b"hello")
            self.assertEqual((yield client.messages.get()), (False, [b"hello"]))
        yield close_ws(new)
        yield close_ws(old)

    @defer.inlineCallbacks
    def test_a_new_listener_that_cannot_listen_changes_nothing(self):
        gateway, port = yield self.start(routed(["/a"]))
        blocker = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # the port the new listener wants
        self.addCleanup(blocker.stopListening)
        config = routed(["/a", "/b"])
        config["bindings"]["tcp1"] = {"type": "tcp", "kind": "server", "exit": "http0",
                                      "options": {"host": "127.0.0.1", "port": blocker.getHost().port}}
        write(self.path, config)
        self.assertFalse((yield gateway.reload()))
        self.assertIn("CONFIG_RELOAD_FAILED cannot listen", self.events.getvalue())
        self.assertEqual(gateway.ports(), [port])
        self.assertEqual((yield status_of(port, "/b")), "HTTP/1.1 404 Not Found")  # the old routes

    @defer.inlineCallbacks
    def test_stop_drains_connections_of_previous_configurations_too(self):
        gateway, port = yield self.start(routed(["/a"]))
        old = yield connect_ws(port, "/a")
        write(self.path, routed(["/b"]))
        self.assertTrue((yield gateway.reload()))
        self.assertEqual(len(gateway.retired), 1)
        yield gateway.stopService()
        self.assertEqual((yield old.closed)[1], 1001)

    @defer.inlineCallbacks
    def test_the_watcher_reloads_on_a_change_not_on_a_touch(self):
        gateway, port = yield self.start(routed(["/a"]))
        gateway.stopService()
        gateway = build_gateway(self.path, event_stream=self.events)
        gateway.watch_interval = 0.05
        gateway.startService()
        self.addCleanup(lambda: gateway.stopService() if gateway.running else None)
        port = (yield gateway.listening)[0]
        os.utime(self.path, ns=(1, 1))  # the same text, another mtime
        yield wait(0.3)
        self.assertNotIn("CONFIG_RELOAD", self.events.getvalue())
        write(self.path, routed(["/a", "/b"]))
        yield eventually(lambda: "CONFIG_RELOADED" in self.events.getvalue())
        client = yield connect_ws(port, "/b")
        yield close_ws(client)

    def test_vault_stores_are_watched_with_the_file(self):
        config = routed(["/a"])
        config["vaults"] = {"v": {"type": "filesystem", "options": {
            "keys": {"store": "keys.p12"}, "trust": {"store": "pems", "type": "pem"}}}}
        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "pems"))
        for name in ("a.pem", "b.pem", "notes.txt"):
            open(os.path.join(folder, "pems", name), "w").close()
        path = os.path.join(folder, "zilla.yaml")
        write(path, config)
        from zillatw.service import load_config
        files = [str(p) for p in watched_files(load_config(path))]
        self.assertEqual(files, [path, os.path.join(folder, "keys.p12"),
                                 os.path.join(folder, "pems", "a.pem"), os.path.join(folder, "pems", "b.pem")])


class Connector:
    """Connects and disconnects in a loop, counting refusals: a listener is never closed."""

    def __init__(self, port):
        self.port, self.attempts, self.refused, self.running = port, 0, 0, True
        self.done = self._loop()

    @defer.inlineCallbacks
    def _loop(self):
        while self.running:
            self.attempts += 1
            try:
                client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), Protocol())
                client.transport.loseConnection()
            except ConnectionRefusedError:
                self.refused += 1
            yield wait(0.005)


class TwistdReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start_twistd(self, config, *args):
        path = os.path.abspath(self.mktemp())
        write(path, config)
        child = Collect()
        process = reactor.spawnProcess(child, TWISTD[0], TWISTD + ["-n", "--pidfile=", "zillaws", "-c", path, *args],
                                       env=ENV, path=ROOT)
        self.addCleanup(lambda: None if child.ended.called else process.signalProcess(signal.SIGKILL))
        yield eventually(lambda: b"ENGINE_STARTED" in child.out or child.ended.called, timeout=20)
        self.assertIn(b"ENGINE_STARTED", child.out, child.out)
        return path, child, process

    @defer.inlineCallbacks
    def test_sighup_reloads(self):
        port = free_port()
        path, child, process = yield self.start_twistd(routed(["/a"], port=port), "--no-watch", "-v")
        old = yield connect_ws(port, "/a")
        write(path, routed(["/a", "/b"], port=port))
        yield wait(1.5)  # not watched: nothing happens
        self.assertNotIn(b"CONFIG_RELOADED", child.out)
        self.assertIn(b"path: /a", child.out)
        self.assertNotIn(b"path: /b", child.out)
        process.signalProcess(signal.SIGHUP)
        yield eventually(lambda: b"CONFIG_RELOADED" in child.out, timeout=10)
        self.assertIn(b"SIGHUP received", child.out)
        self.assertIn(b"path: /b", child.out)  # -v prints the reloaded configuration
        new = yield connect_ws(port, "/b")
        for client in (old, new):
            client.sendMessage(b"hup")
            self.assertEqual((yield client.messages.get()), (False, [b"hup"]))
            yield close_ws(client)
        process.signalProcess(signal.SIGTERM)
        self.assertEqual((yield child.ended), (0, None))

    @defer.inlineCallbacks
    def test_the_file_is_watched_and_the_listener_never_refuses_meanwhile(self):
        port = free_port()
        path, child, process = yield self.start_twistd(routed(["/a"], port=port))
        old = yield connect_ws(port, "/a")
        connector = Connector(port)
        yield wait(0.2)
        write(path, routed(["/a", "/b"], port=port))
        yield eventually(lambda: b"CONFIG_RELOADED" in child.out, timeout=10)
        yield wait(0.2)
        connector.running = False
        yield connector.done
        self.assertGreater(connector.attempts, 20)
        self.assertEqual(connector.refused, 0)
        new = yield connect_ws(port, "/b")
        yield close_ws(new)
        # An invalid change: the failure is an event line, and the old configuration serves on.
        write(path, "name: test\nbindings:\n  tcp0: {type: tcp}\n")
        yield eventually(lambda: b"CONFIG_RELOAD_FAILED" in child.out, timeout=10)
        self.assertIn(b"reload failed, still serving the previous configuration", child.out)
        old.sendMessage(b"after both")
        self.assertEqual((yield old.messages.get()), (False, [b"after both"]))
        new = yield connect_ws(port, "/b")
        yield close_ws(new)
        yield close_ws(old)
        process.signalProcess(signal.SIGTERM)
        self.assertEqual((yield child.ended), (0, None))
