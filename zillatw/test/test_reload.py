"""Hot reload: Gateway.reload in process, the file watcher, and SIGHUP to `twistd zillaws`."""

from __future__ import annotations

import os
import signal

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from zillatw.runtime.gateway import load_config
from zillatw.runtime.reload import watched_files
from zillatw.test.process_support import GatewayOnAFile, start_twistd, write
from zillatw.test.support import (
    OnAClock,
    chain,
    close_ws,
    connect_raw,
    connect_ws,
    eventually,
    free_port,
    split_response,
    upgrade_request,
    wait,
)


def routed(paths, max_message=1_000_000, port=0):
    """tcp -> http -> ws routing `paths` to echo, with max-message-size."""
    config = chain(ws_routes=[{"when": [{"path": path}], "exit": "echo"} for path in paths],
                   ws_options={"max-message-size": max_message})
    config["bindings"]["tcp0"]["options"]["port"] = port
    return config




@defer.inlineCallbacks
def status_of(port, path):
    raw = yield connect_raw(port)
    raw.transport.write(upgrade_request(path))
    yield eventually(lambda: b"\r\n\r\n" in raw.data)
    raw.transport.loseConnection()
    return split_response(raw.data)[0]




class ReloadTests(GatewayOnAFile):
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

    def test_the_watcher_reloads_on_a_change_not_on_a_touch(self):
        path = os.path.abspath(self.mktemp())
        write(path, routed(["/a"]))
        on = OnAClock(path, watch_interval=1.0)  # no thread pool: the file loads in the reactor thread
        os.utime(path, ns=(1, 1))  # the same text, another mtime
        on.clock.advance(1.0)
        self.assertNotIn("CONFIG_RELOAD", on.events.getvalue())
        write(path, routed(["/a", "/b"]))
        on.clock.advance(0.9)
        self.assertNotIn("CONFIG_RELOAD", on.events.getvalue())  # not looked at yet
        on.clock.advance(0.1)
        self.assertIn("CONFIG_RELOADED", on.events.getvalue())
        connection, transport = on.connect()  # the same listener, routing to the new bindings
        connection.dataReceived(upgrade_request("/b"))
        self.assertIn(b"101 Switching Protocols", transport.value())
        self.assertEqual(len(on.clock.tcpServers), 1)  # the kept socket: nothing listened anew

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
        from zillatw.runtime.gateway import load_config
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
    def test_sighup_reloads(self):
        port = free_port()
        path, child, process = yield start_twistd(self, routed(["/a"], port=port), "--no-watch", "-v")
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
    def test_limits_given_as_flags_bound_reloads_too(self):
        port = free_port()
        path, child, process = yield start_twistd(self, routed(["/a"], port=port), "--max-config-bytes", "2000")
        write(path, many_routes(100, port=port))  # valid, and some 5 KB
        yield eventually(lambda: b"CONFIG_RELOAD_FAILED" in child.out, timeout=10)
        self.assertIn(b"the limit is 2,000 bytes, --max-config-bytes", child.out)
        client = yield connect_ws(port, "/a")
        yield close_ws(client)
        process.signalProcess(signal.SIGTERM)
        self.assertEqual((yield child.ended), (0, None))

    @defer.inlineCallbacks
    def test_the_file_is_watched_and_the_listener_never_refuses_meanwhile(self):
        port = free_port()
        path, child, process = yield start_twistd(self, routed(["/a"], port=port))
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


def many_routes(count, port=0):
    """routed(["/a"]) with `count` more ws routes: within the limits, slow to load (about
    2 s for 25,000), quick to build. Written as text, as yaml.safe_dump would take as long."""
    routes = "".join(f"      - when:\n          - path: /p{i}\n        exit: echo\n" for i in range(count))
    return (f"name: test\nbindings:\n  tcp0:\n    type: tcp\n    kind: server\n"
            f"    options: {{host: 127.0.0.1, port: {port}}}\n    exit: http0\n"
            "  http0:\n    type: http\n    kind: server\n    exit: ws0\n"
            "  ws0:\n    type: ws\n    kind: server\n    routes:\n"
            "      - when:\n          - path: /a\n        exit: echo\n" + routes +
            "  echo:\n    type: echo\n    kind: server\n")


class HeldLoads:
    """Stands in for the gateway's load off the reactor thread: each load is a Deferred the
    test fires (`release()`, with the file as it is then), so a test acts while a reload is
    under way, on a clock, without threads or sleeps; counts loads under way at once."""

    def __init__(self, case, gateway):
        self.gateway, self.calls, self.most = gateway, 0, 0
        self.pending: list[defer.Deferred] = []
        case.patch(gateway, "_load_off_reactor", self.load)

    def load(self) -> defer.Deferred:
        self.calls += 1
        self.pending.append(defer.Deferred())
        self.most = max(self.most, len(self.pending))
        return self.pending[-1]

    def release(self) -> None:
        gateway = self.gateway
        self.pending.pop(0).callback(load_config(gateway.source, gateway.env, gateway.limits, gateway.registry))


def upgrades(on: OnAClock, path: str) -> bool:
    connection, transport = on.connect()
    connection.dataReceived(upgrade_request(path))
    return b"101 Switching Protocols" in transport.value()


class ReloadOffTheReactorTests(GatewayOnAFile):
    @defer.inlineCallbacks
    def test_traffic_flows_while_a_large_file_loads(self):
        gateway, port = yield self.start(routed(["/a"]))
        client = yield connect_ws(port, "/a")
        write(self.path, many_routes(25_000))
        reloading = gateway.reload()
        round_trips = 0
        while not reloading.called:
            client.sendMessage(b"ping")
            self.assertEqual((yield client.messages.get()), (False, [b"ping"]))
            round_trips += 1
            yield wait(0.05)  # pacing, not timing: a busy loop would hold the GIL from the loading thread
        self.assertTrue((yield reloading))
        # Loading in the reactor thread, as before, fired `reloading` before any round trip.
        self.assertGreaterEqual(round_trips, 3)
        new = yield connect_ws(port, "/p24999")  # the new configuration serves
        yield close_ws(new)
        yield close_ws(client)

    @defer.inlineCallbacks
    def test_each_hostile_file_fails_the_reload_naming_why_and_the_old_one_serves(self):
        from zillatw.test.support import alias_bomb, nine_megabytes
        gateway, port = yield self.start(routed(["/a"]))
        client = yield connect_ws(port, "/a")
        kind_twice = "name: test\nbindings:\n  tcp0:\n    type: tcp\n    kind: server\n    kind: client\n"
        for content, reason in [
                (nine_megabytes(), "the file is too large (9,000,001 bytes; the limit is 4,194,304 bytes"),
                (alias_bomb(), "more than 1,000,000 YAML nodes, counting each alias as the nodes it repeats"),
                ("[" * 50_000 + "]" * 50_000, "nesting is deeper than 64 levels (the limit, --max-config-depth)"),
                (b"name: caf\xe9\n", ":1:10: the file is not UTF-8: byte 0xe9"),
                (kind_twice, ":6:5: duplicate key 'kind' (first at 5:5, again at 6:5"),
                ("name: test\nbindings:\n  echo: {type: echo, kind: server}\n", "bindings: no binding listens")]:
            with open(self.path, "wb") as f:
                f.write(content if isinstance(content, bytes) else content.encode())
            self.assertFalse((yield gateway.reload()))
            self.assertIn("CONFIG_RELOAD_FAILED", self.events.getvalue().splitlines()[-1])
            self.assertIn(reason, self.events.getvalue().splitlines()[-1])
            client.sendMessage(b"still here")
            self.assertEqual((yield client.messages.get()), (False, [b"still here"]))
        self.assertNotIn("CONFIG_RELOADED", self.events.getvalue())
        yield close_ws(client)

class ReloadQueueTests(unittest.TestCase):
    """One reload at a time, on a clock: what is asked for meanwhile runs after it."""

    def test_reloads_asked_for_during_one_run_once_after_it(self):
        path = os.path.abspath(self.mktemp())
        write(path, routed(["/a"]))
        on = OnAClock(path)
        held = HeldLoads(self, on.gateway)
        write(path, routed(["/a", "/b"]))
        first = on.gateway.reload()
        write(path, routed(["/a", "/c"]))  # changed while the first reload runs
        second, third = on.gateway.reload(), on.gateway.reload()
        self.assertEqual(held.calls, 1)
        self.assertNoResult(second)
        held.release()
        self.assertTrue(self.successResultOf(first))
        self.assertEqual(held.calls, 2)  # one more for both asked meanwhile, the file as it is now
        self.assertNoResult(second)
        held.release()
        self.assertEqual([self.successResultOf(second), self.successResultOf(third)], [True, True])
        self.assertEqual((held.calls, held.most), (2, 1))  # never two at once
        self.assertEqual((upgrades(on, "/b"), upgrades(on, "/c")), (False, True))

    def test_the_watcher_picks_up_a_change_made_during_a_reload(self):
        path = os.path.abspath(self.mktemp())
        write(path, routed(["/a"]))
        on = OnAClock(path, watch_interval=1.0)
        held = HeldLoads(self, on.gateway)
        write(path, routed(["/a", "/b"]))
        on.clock.advance(1.0)
        self.assertEqual(held.calls, 1)
        write(path, routed(["/a", "/c"]))
        on.clock.advance(1.0)  # a look while reloading starts nothing
        self.assertEqual(held.calls, 1)
        held.release()
        self.assertEqual(on.events.getvalue().count("CONFIG_RELOADED"), 1)
        on.clock.advance(1.0)  # the next look sees the change made meanwhile
        self.assertEqual(held.calls, 2)
        held.release()
        self.assertEqual(on.events.getvalue().count("CONFIG_RELOADED"), 2)
        self.assertEqual((held.most, upgrades(on, "/b"), upgrades(on, "/c")), (1, False, True))

    def test_a_gateway_stopped_during_a_reload_does_not_switch(self):
        path = os.path.abspath(self.mktemp())
        write(path, routed(["/a"]))
        on = OnAClock(path)
        held = HeldLoads(self, on.gateway)
        serving = on.gateway.generation
        write(path, routed(["/a", "/b"]))
        reloading = on.gateway.reload()
        self.successResultOf(on.gateway.stopService())
        held.release()
        self.assertFalse(self.successResultOf(reloading))
        self.assertIs(on.gateway.generation, serving)
        self.assertNotIn("CONFIG_RELOAD", on.events.getvalue())
