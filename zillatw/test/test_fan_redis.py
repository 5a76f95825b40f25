"""Fan groups across gateways through a real redis-server (Debian's, unpacked by
scripts/install-redis.sh, or $ZILLATW_REDIS_SERVER), real sockets and WebSocket clients."""

from __future__ import annotations

import copy
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import yaml
from twisted.internet import defer, task
from twisted.internet.task import Clock
from twisted.trial import unittest

from zillatw.bindings.fan.redis import RedisLink, parse_url
from zillatw.test.netns import ExampleNetwork
from zillatw.test.process_support import RedisServer, redis_server_binary
from zillatw.test.support import (
    CONF,
    close_ws,
    connect_ws,
    eventually,
    http_get,
    on_ephemeral_port,
    start_gateway,
    wait,
)

ROOT = os.path.dirname(CONF)








def reflect(redis_url: str, **redis_options) -> dict:
    """conf/ws.reflect.redis.yaml on an ephemeral port, on this Redis."""
    with open(os.path.join(CONF, "ws.reflect.redis.yaml")) as f:
        config = on_ephemeral_port(yaml.safe_load(f), "north_tcp_server")
    config["bindings"]["north_fan_server"]["options"]["redis"] = {"url": redis_url, **redis_options}
    return config


class TwoGateways(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.crash)
        self.a, self.port_a = yield start_gateway(self, self.config())
        self.b, self.port_b = yield start_gateway(self, self.config())
        yield eventually(lambda: self.link(self.a).up and self.link(self.b).up)

    def config(self) -> dict:
        return reflect(self.redis.url, **{"max-reconnect-delay": 0.2})

    def link(self, gateway) -> RedisLink:
        return gateway.binding("north_fan_server").redis

    @defer.inlineCallbacks
    def clients(self, port, count):
        made = []
        for _ in range(count):
            client = yield connect_ws(port, protocols=["echo"])
            self.addCleanup(close_ws, client)
            made.append(client)
        return made

    @defer.inlineCallbacks
    def receive(self, client, count):
        """The next `count` messages' payloads."""
        got = []
        for _ in range(count):
            binary, frames = yield client.messages.get()
            got.append(b"".join(frames))
        return got

    @defer.inlineCallbacks
    def nothing_more(self, *clients):
        yield wait(0.3)
        for client in clients:
            self.assertEqual(client.messages.pending, [], "a message arrived twice or from nowhere")


class ScaleOutTests(TwoGateways):
    @defer.inlineCallbacks
    def test_every_client_on_both_gateways_gets_every_message_once_in_order(self):
        a1, a2 = yield self.clients(self.port_a, 2)
        b1, b2 = yield self.clients(self.port_b, 2)
        count = 1000
        # two publishers at once, one per gateway: their messages interleave, each keeps its order
        for i in range(count):
            a1.sendMessage(b"a1 %d" % i)
            b1.sendMessage(b"b1 %d" % i)
        for client in (a1, a2, b1, b2):
            got = yield self.receive(client, 2 * count)
            for publisher in (b"a1", b"b1"):
                self.assertEqual([m for m in got if m.startswith(publisher + b" ")],
                                 [b"%s %d" % (publisher, i) for i in range(count)])
        yield self.nothing_more(a1, a2, b1, b2)
        # each gateway published its own members' messages once and skipped them on receipt
        a, b = self.link(self.a), self.link(self.b)
        self.assertEqual((a.published, a.received, b.published, b.received), (count, count, count, count))
        self.assertEqual((a.dropped, b.dropped), (0, 0))

    @defer.inlineCallbacks
    def test_binary_fragmented_and_empty_messages_cross_whole(self):
        a1, = yield self.clients(self.port_a, 1)
        b1, = yield self.clients(self.port_b, 1)
        a1.send_frames(2, [b"\x00\xff", b"", b"\x01" * 70000])  # fragmented, binary, > 64 KiB
        a1.sendMessage(b"", isBinary=False)
        for client in (a1, b1):
            binary, frames = yield client.messages.get()
            self.assertEqual((binary, b"".join(frames)), (True, b"\x00\xff" + b"\x01" * 70000))
            binary, frames = yield client.messages.get()
            self.assertEqual((binary, b"".join(frames)), (False, b""))
        yield self.nothing_more(a1, b1)

    @defer.inlineCallbacks
    def test_what_others_publish_on_the_channel_is_not_handed_to_members(self):
        a1, = yield self.clients(self.port_a, 1)
        link = self.link(self.a)
        with socket.create_connection(("127.0.0.1", self.redis.port)) as raw:
            for junk in (b"hello", b"zw\x01" + b"12345678" + b"\x09ping?", b"zw\x01short", b""):
                raw.sendall(b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                            % (len(link.channel), link.channel, len(junk), junk))
                self.assertEqual(raw.recv(16), b":2\r\n")  # both gateways are subscribed
        yield eventually(lambda: link.foreign == 4)
        b1, = yield self.clients(self.port_b, 1)
        b1.sendMessage(b"real")
        self.assertEqual((yield self.receive(a1, 1)), [b"real"])
        self.assertEqual(link.received, 1)
        yield self.nothing_more(a1)

    @defer.inlineCallbacks
    def test_two_workers_on_one_host_with_one_channel_do_not_duplicate(self):
        """Both gateways have the same configuration, so the same channel, on one host: each
        still delivers a message once, because each binding has its own instance id."""
        a, b = self.link(self.a), self.link(self.b)
        self.assertEqual(a.channel, b.channel)
        self.assertEqual(a.channel, b"zillatw:fan:example:north_fan_server")
        self.assertNotEqual(a.instance, b.instance)
        # a third worker joins the same channel
        c_gateway, port_c = yield start_gateway(self, self.config())
        yield eventually(lambda: self.link(c_gateway).up)
        clients = {}
        for name, port in (("a", self.port_a), ("b", self.port_b), ("c", port_c)):
            clients[name] = yield self.clients(port, 2)
        for name, (sender, _) in clients.items():
            for i in range(50):
                sender.sendMessage(b"%s %d" % (name.encode(), i))
        everyone = [client for pair in clients.values() for client in pair]
        for client in everyone:
            got = yield self.receive(client, 150)
            self.assertEqual(sorted(got), sorted(b"%s %d" % (n, i) for n in (b"a", b"b", b"c") for i in range(50)))
        yield self.nothing_more(*everyone)


class RedisOutageTests(TwoGateways):
    def config(self) -> dict:
        config = super().config()
        config["telemetry"]["exporters"]["prometheus0"] = {
            "type": "prometheus", "options": {"endpoints": [{"scheme": "http", "port": 0}]}}
        return config

    @defer.inlineCallbacks
    def test_redis_restart_mid_stream(self):
        a1, a2 = yield self.clients(self.port_a, 2)
        b1, = yield self.clients(self.port_b, 1)
        sent = []

        def send():
            sent.append(len(sent))
            a1.sendMessage(b"%d" % sent[-1])
        sending = task.LoopingCall(send)
        sending.start(0.002)
        self.addCleanup(lambda: sending.running and sending.stop())
        yield eventually(lambda: b1.received >= 100)

        before = b1.received
        self.redis.crash()  # mid-stream
        yield eventually(lambda: not self.link(self.a).up and not self.link(self.b).up)
        # local members keep talking while Redis is down
        during = len(sent)
        yield eventually(lambda: a2.received >= during + 100)
        self.assertGreater(self.link(self.a).dropped, 0)
        for gateway in (self.a, self.b):
            self.assertIn("BINDING_FAN_REDIS_DISCONNECTED - redis://127.0.0.1", gateway.events_text.getvalue())

        self.redis.start()  # same port: both gateways reconnect and subscribe again
        yield eventually(lambda: self.link(self.a).up and self.link(self.b).up)
        after = len(sent)
        yield eventually(lambda: len(sent) >= after + 100)
        sending.stop()
        total = len(sent)
        last = b"%d" % (total - 1)
        yield eventually(lambda: b1.messages.pending and b"".join(b1.messages.pending[-1][1]) == last)

        # local members: everything, once, in order
        for client in (a1, a2):
            got = yield self.receive(client, total)
            self.assertEqual(got, [b"%d" % i for i in range(total)])
        # the remote member: in order, never twice; all but what was published while Redis was
        # down (not promised), and everything published once both were back
        remote = [int(m) for m in (yield self.receive(b1, len(b1.messages.pending)))]
        self.assertEqual(remote, sorted(set(remote)))
        self.assertEqual(remote[:before], list(range(before)))
        self.assertEqual(remote[-(total - after):], list(range(after, total)))
        self.assertLessEqual(len(remote), total - self.link(self.a).dropped)
        yield self.nothing_more(a1, a2, b1)

        for gateway in (self.a, self.b):
            events = gateway.events_text.getvalue()
            self.assertEqual(events.count("BINDING_FAN_REDIS_CONNECTED"), 2, events)
            self.assertEqual(self.link(gateway).disconnects, 1)
            code, text = yield http_get(gateway.metrics_ports()[0])
            self.assertEqual(code, 200)
            self.assertIn('zillatw_fan_redis_disconnects_total{binding="north_fan_server",namespace="example"} 1.0',
                          text)
            self.assertIn('zillatw_fan_redis_connected{binding="north_fan_server",namespace="example"} 1.0', text)

    @defer.inlineCallbacks
    def test_a_gateway_starts_while_redis_is_down_and_joins_when_it_is_up(self):
        self.redis.crash()
        yield eventually(lambda: not self.link(self.a).up)
        c_gateway, port_c = yield start_gateway(self, self.config())
        c1, c2 = yield self.clients(port_c, 2)
        c1.sendMessage(b"alone")  # served locally though Redis was never reachable
        for client in (c1, c2):
            self.assertEqual((yield self.receive(client, 1)), [b"alone"])
        yield eventually(lambda: "BINDING_FAN_REDIS_DISCONNECTED" in c_gateway.events_text.getvalue())
        self.assertFalse(self.link(c_gateway).up)
        self.redis.start()
        yield eventually(lambda: all(self.link(g).up for g in (self.a, self.b, c_gateway)))
        a1, = yield self.clients(self.port_a, 1)
        a1.sendMessage(b"together")
        for client in (c1, c2, a1):
            self.assertEqual((yield self.receive(client, 1)), [b"together"])
        yield self.nothing_more(c1, c2, a1)


class ReloadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_members_before_and_after_a_reload_stay_one_group(self):
        """A reload builds a new fan (a new group): through Redis the old one's members and
        the new one's still get each other's messages, once; the old link goes with its
        last member."""
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.crash)
        config = reflect(redis.url)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        gateway, port = yield start_gateway(self, path)
        old = gateway.binding("north_fan_server").redis
        yield eventually(lambda: old.up)
        before = yield connect_ws(port, protocols=["echo"])
        config["bindings"]["north_ws_server"]["options"] = {"max-message-size": 4096}
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        reloaded = yield gateway.reload()
        self.assertTrue(reloaded, gateway.events_text.getvalue())
        new = gateway.binding("north_fan_server").redis
        self.assertIsNot(new, old)
        yield eventually(lambda: new.up)
        after = yield connect_ws(port, protocols=["echo"])
        before.sendMessage(b"from before")
        after.sendMessage(b"from after")
        for client in (before, after):
            got = []
            for _ in range(2):
                got.append(b"".join((yield client.messages.get())[1]))
            self.assertEqual(sorted(got), [b"from after", b"from before"])
        yield wait(0.3)
        self.assertEqual((before.messages.pending, after.messages.pending), ([], []))
        yield close_ws(before)
        # the retired bindings go once their last connection has (the config watcher prunes them
        # every interval; here by hand)
        yield eventually(lambda: gateway.prune_retired() or (old._stopping and not old.up))
        self.assertTrue(new.up)
        yield close_ws(after)


class AuthTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_a_refused_password_is_retried_until_redis_takes_it(self):
        redis = RedisServer("--requirepass", "old")
        redis.start()
        self.addCleanup(redis.crash)
        gateway, port = yield start_gateway(self, reflect(f"redis://:new%21@127.0.0.1:{redis.port}",
                                                          **{"max-reconnect-delay": 0.2}))
        link = gateway.binding("north_fan_server").redis
        yield eventually(lambda: "could not auth: WRONGPASS" in gateway.events_text.getvalue())
        yield wait(0.5)
        self.assertFalse(link.up)
        with socket.create_connection(("127.0.0.1", redis.port)) as raw:  # the password changes
            raw.sendall(b"AUTH old\r\nCONFIG SET requirepass new!\r\n")
            reply = b""
            while reply.count(b"\r\n") < 2:
                reply += raw.recv(64)
            self.assertEqual(reply, b"+OK\r\n+OK\r\n")
        yield eventually(lambda: link.up)
        self.assertIn("BINDING_FAN_REDIS_CONNECTED", gateway.events_text.getvalue())

    @defer.inlineCallbacks
    def test_no_password_where_one_is_required_is_reported(self):
        redis = RedisServer("--requirepass", "secret")
        redis.start()
        self.addCleanup(redis.crash)
        gateway, port = yield start_gateway(self, reflect(redis.url, **{"max-reconnect-delay": 0.2}))
        yield eventually(lambda: "refused: NOAUTH" in gateway.events_text.getvalue())
        self.assertFalse(gateway.binding("north_fan_server").redis.up)


class ConfigTests(unittest.TestCase):
    def test_urls(self):
        self.assertEqual(parse_url("redis://u:p%40ss@example.com:6380/2"),
                         {"host": "example.com", "port": 6380, "username": "u", "password": "p@ss", "tls": False})
        self.assertEqual(parse_url("redis://:secret@localhost")["password"], "secret")
        self.assertEqual(parse_url("redis://localhost")["port"], 6379)
        self.assertTrue(parse_url("rediss://localhost")["tls"])  # test_fan_rediss
        for bad in ("http://localhost", "redis://", "redis://h:99999", "redis://h/x"):
            self.assertRaises(ValueError, parse_url, bad)

    def test_options_are_checked(self):
        from zillatw import ConfigError, build_gateway
        config = reflect("http://localhost:6379")
        with self.assertRaises(ConfigError) as caught:
            build_gateway(config)
        self.assertIn("bindings.north_fan_server.options.redis.url: expected a redis:// or rediss:// URL",
                      str(caught.exception))
        config = copy.deepcopy(config)
        config["bindings"]["north_fan_server"]["options"] = {"redis": {"channel": "x"}}
        with self.assertRaises(ConfigError) as caught:
            build_gateway(config)
        self.assertIn("bindings.north_fan_server.options.redis: missing required key 'url'", str(caught.exception))

    def test_without_redis_the_fan_stays_in_process(self):
        from zillatw import build_gateway
        config = reflect("redis://localhost")
        del config["bindings"]["north_fan_server"]["options"]
        self.assertIsNone(build_gateway(config).binding("north_fan_server").redis)

    def test_the_redis_binary_is_there(self):
        binary = redis_server_binary()
        version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
        self.assertIn("Redis server v=", version)
        self.assertTrue(shutil.which(binary) or os.access(binary, os.X_OK))


class WorkerTests(unittest.TestCase):
    """`twistd zillaws -w 2`: two worker processes on one host, one configuration (so one
    channel) and one Redis form one group: conf/ws.reflect.redis.yaml unchanged, on 7114 and
    Redis on 6379 (`redis://localhost:6379`, as written) in a network namespace of the test's
    own (zillatw.test.netns: the children are forked inside)."""

    @defer.inlineCallbacks
    def test_workers_of_one_host_form_one_group_without_duplicates(self):
        from zillatw.test.process_support import server_pid, spawn_workers, worker_pids
        network = ExampleNetwork(self)
        redis = RedisServer(port=network.port(6379))
        redis.start()
        self.addCleanup(redis.crash)
        port = network.port(7114)
        child, process, _ = spawn_workers(self, Path(network.config("ws.reflect.redis.yaml")), 2)
        yield eventually(lambda: child.out.count(b"BINDING_FAN_REDIS_CONNECTED") >= 2 or child.ended.called,
                         timeout=30)
        self.assertEqual(child.out.count(b"BINDING_FAN_REDIS_CONNECTED"), 2, child.out)
        pids = list(worker_pids(child.out).values())

        served: dict[int, list] = {}
        clients = []
        for _ in range(200):  # until both workers serve two clients each
            client = yield connect_ws(port, protocols=["echo"])
            clients.append(client)
            served.setdefault(server_pid(client, pids), []).append(client)
            if len(served) == 2 and all(len(c) >= 2 for c in served.values()):
                break
        self.assertEqual(set(served), set(pids))
        senders = [members[0] for members in served.values()]
        for index, sender in enumerate(senders):
            for i in range(100):
                sender.sendMessage(b"w%d %d" % (index, i))
        for client in clients:
            got = []
            for _ in range(200):
                got.append(b"".join((yield client.messages.get())[1]))
            for index in range(2):
                self.assertEqual([m for m in got if m.startswith(b"w%d " % index)],
                                 [b"w%d %d" % (index, i) for i in range(100)])
        yield wait(0.3)
        for client in clients:
            self.assertEqual(client.messages.pending, [])
        process.signalProcess(signal.SIGTERM)
        self.assertEqual((yield child.ended), (0, None), child.out)


class FakePeer:
    """A member's connection, as the fan sees it."""

    def __init__(self):
        self.paused = False
        self.got = []

    def stream_data(self, opcode, payload, fin):
        self.got.append((opcode, payload, fin))

    def stream_end(self, code, reason):
        self.got.append(("end", code))

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False


class FlowTests(unittest.TestCase):
    """The group's pacing with a Redis link (no Redis needed: the link is never started)."""

    def setUp(self):
        from zillatw.bindings.echo.binding import EchoServer
        from zillatw.bindings.fan.binding import FanServer
        from zillatw.stream import StreamInfo
        self.link = RedisLink("redis://127.0.0.1:1", "c", reactor=Clock())
        self.server = FanServer("fan", EchoServer(), redis=self.link)
        self.peers = [FakePeer(), FakePeer()]
        self.members = [self.server.open(StreamInfo(), peer) for peer in self.peers]

    def test_redis_not_keeping_up_pauses_every_member_until_it_does(self):
        self.link._set_full(True)
        self.assertEqual([p.paused for p in self.peers], [True, True])
        from zillatw.stream import StreamInfo
        late = FakePeer()
        self.server.open(StreamInfo(), late)  # joins while Redis is full: held back too
        self.assertTrue(late.paused)
        self.link._set_full(False)
        self.assertEqual([p.paused for p in self.peers + [late]], [False, False, False])

    def test_all_members_congested_pauses_the_subscription(self):
        self.members[0].pauseProducing()
        self.assertTrue(self.link.receiving)
        self.members[1].pauseProducing()
        self.assertFalse(self.link.receiving)
        self.members[0].resumeProducing()
        self.assertTrue(self.link.receiving)

    def test_while_redis_is_down_members_still_get_each_other_and_nothing_is_queued(self):
        self.members[0].stream_data(1, b"hi", True)
        self.members[1].stream_data(2, b"a", False)
        self.members[1].stream_data(0, b"b", True)
        for peer in self.peers:
            self.assertEqual(peer.got, [(1, b"hi", True), (2, b"ab", True)])
        self.assertEqual((self.link.dropped, self.link.published), (2, 0))

    def test_messages_from_other_gateways_reach_local_members_only_once(self):
        other = RedisLink("redis://127.0.0.1:1", "c", reactor=Clock())
        self.link._received(other._prefixes[1] + b"remote")
        self.link._received(self.link._prefixes[1] + b"mine")  # our own, back from Redis
        for peer in self.peers:
            self.assertEqual(peer.got, [(1, b"remote", True)])
        self.assertEqual(self.link.received, 1)
