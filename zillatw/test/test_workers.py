"""`twistd zillaws -w N`: a supervisor and N workers on the same listening sockets."""

from __future__ import annotations

import os
import signal

import yaml
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError, ProcessTerminated
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from zillatw.runtime.workers import Supervisor
from zillatw.test.process_support import ENV, TWISTD, _ProcessReactor, alive, server_pid, spawn_workers, worker_pids
from zillatw.test.support import (
    chain,
    close_ws,
    connect_raw,
    connect_ws,
    eventually,
    free_port,
    parse_server_frames,
    upgrade_request,
)


class WorkerTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, workers=2, *args):
        self.port = free_port()
        config = chain()
        config["bindings"]["tcp0"]["options"]["port"] = self.port
        child, process, self.path = spawn_workers(self, config, workers, *args)
        yield eventually(lambda: child.out.count(b"listening") >= workers or child.ended.called, timeout=30)
        self.assertEqual(child.out.count(b"ENGINE_STARTED"), workers, child.out)
        return child, process

    @defer.inlineCallbacks
    def test_both_workers_serve_a_killed_one_is_restarted_sigterm_stops_all(self):
        child, process = yield self.start(2)
        pids = worker_pids(child.out)
        self.assertEqual(sorted(pids), [1, 2])
        self.assertNotIn(process.pid, pids.values())
        # Connections land on both workers (the kernel wakes both; whichever accepts first).
        clients, served = [], {}
        for _ in range(200):
            client = yield connect_ws(self.port)
            clients.append(client)
            served.setdefault(server_pid(client, pids.values()), []).append(client)
            if len(served) == 2:
                break
        self.assertEqual(set(served), set(pids.values()))
        for client in served.values():
            client[0].sendMessage(b"which worker?")
            self.assertEqual((yield client[0].messages.get()), (False, [b"which worker?"]))

        # A worker killed outright is started again; its connections are lost, the other's stay.
        killed = pids[1]
        os.kill(killed, signal.SIGKILL)
        yield eventually(lambda: worker_pids(child.out)[1] != killed, timeout=10)
        self.assertIn(b"worker 1 (pid %d) exited (signal 9); starting it again in 0.5 s" % killed, child.out)
        yield eventually(lambda: child.out.count(b"listening") >= 3, timeout=20)
        restarted = worker_pids(child.out)[1]
        self.assertTrue(alive(restarted))
        for client in served[killed]:
            yield client.closed
        survivor = served[pids[2]][0]
        survivor.sendMessage(b"still here")
        self.assertEqual((yield survivor.messages.get()), (False, [b"still here"]))
        new = {}
        for _ in range(200):  # the restarted one serves too
            client = yield connect_ws(self.port)
            clients.append(client)
            new.setdefault(server_pid(client, [restarted, pids[2]]), client)
            if restarted in new:
                break
        self.assertIn(restarted, new)

        # SIGTERM: every worker drains (1001), then the supervisor exits 0.
        open_clients = [c for c in clients if not c.closed.called]
        process.signalProcess(signal.SIGTERM)
        results = yield defer.gatherResults([c.closed for c in open_clients])
        self.assertEqual({r[1] for r in results}, {1001})
        self.assertEqual((yield child.ended), (0, None), child.out)
        self.assertFalse(alive(restarted) or alive(pids[2]))
        yield self.assertFailure(connect_ws(self.port), ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_sighup_reaches_every_worker(self):
        child, process = yield self.start(2, "--no-watch")
        config = chain(ws_routes=[{"when": [{"path": "/b"}], "exit": "echo"}])
        config["bindings"]["tcp0"]["options"]["port"] = self.port
        with open(self.path, "w") as f:
            yaml.safe_dump(config, f)
        process.signalProcess(signal.SIGHUP)
        yield eventually(lambda: child.out.count(b"CONFIG_RELOADED") == 2, timeout=10)
        self.assertTrue(alive(process.pid))
        client = yield connect_ws(self.port, "/b")
        yield close_ws(client)
        process.signalProcess(signal.SIGTERM)
        self.assertEqual((yield child.ended), (0, None))

    @defer.inlineCallbacks
    def test_a_reload_cannot_move_the_supervisors_sockets(self):
        child, process = yield self.start(2, "--no-watch")
        config = chain(ws_routes=[{"when": [{"path": "/b"}], "exit": "echo"}])
        config["bindings"]["tcp0"]["options"]["port"] = free_port()
        with open(self.path, "w") as f:
            yaml.safe_dump(config, f)
        process.signalProcess(signal.SIGHUP)
        yield eventually(lambda: child.out.count(b"CONFIG_RELOAD_FAILED") == 2, timeout=10)
        self.assertIn(b"a reload cannot add or remove listener addresses", child.out)
        client = yield connect_ws(self.port, "/")  # the old configuration, on the old port
        yield close_ws(client)
        process.signalProcess(signal.SIGTERM)
        self.assertEqual((yield child.ended), (0, None))

    @defer.inlineCallbacks
    def test_what_workers_cannot_share_is_refused_at_start(self):
        config = chain()
        config["telemetry"]["exporters"]["prom"] = {"type": "prometheus",
                                                    "options": {"endpoints": [{"scheme": "http", "port": 0}]}}
        config["bindings"]["tcp0"]["options"] = {"endpoint": "tcp:0:interface=127.0.0.1"}
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        out, err, code = yield getProcessOutputAndValue(
            TWISTD[0], TWISTD[1:] + ["-n", "--pidfile=", "zillaws", "-c", path, "-w", "2"], env=ENV)
        self.assertEqual(code, 1)
        self.assertIn(b"cannot run workers:\n  bindings.tcp0.options.endpoint: with -w, tcp servers listen on host and "
                      b"port\n", out + err)
        self.assertNotIn(b"telemetry.exporters", out + err)  # the supervisor serves them (test_prometheus_workers)
        self.assertNotIn(b"worker 1 started", out + err)

    @defer.inlineCallbacks
    def test_a_second_sigterm_ends_workers_and_supervisor_at_once(self):
        child, process = yield self.start(2, "--drain-timeout", "60")
        pids = list(worker_pids(child.out).values())
        raw = yield connect_raw(self.port)  # a peer that never answers the close: the drain would wait
        raw.transport.write(upgrade_request())
        yield eventually(lambda: b"\r\n\r\n" in raw.data)
        start = raw.data.index(b"\r\n\r\n") + 4
        process.signalProcess(signal.SIGTERM)
        yield eventually(lambda: parse_server_frames(raw.data[start:]), timeout=10)  # its worker sent the 1001
        self.assertFalse(child.ended.called)  # and waits for the peer
        process.signalProcess(signal.SIGTERM)
        code, number = yield child.ended
        self.assertEqual((code, number), (None, signal.SIGTERM))
        # died by the second signal, not at the end of the drain (which exits 0)
        yield eventually(lambda: not any(alive(pid) for pid in pids), timeout=5)
        raw.transport.loseConnection()

    @defer.inlineCallbacks
    def test_ready_file_once_every_worker_listens(self):
        ready = os.path.abspath(self.mktemp())
        child, process = yield self.start(2, "--ready-file", ready)
        yield eventually(lambda: os.path.exists(ready), timeout=10)
        with open(ready) as f:
            self.assertEqual(int(f.read()), process.pid)
        process.signalProcess(signal.SIGTERM)
        yield child.ended
        self.assertFalse(os.path.exists(ready))




TICK = 1 / 1024  # a binary fraction: the clock's sums stay exact


class RestartBackoffTests(unittest.TestCase):
    """The supervisor's restart delays, on a clock: 0.5 s doubling with each death in a row
    up to 30 s; a worker that ran STEADY (10 s) resets it."""

    def setUp(self):
        self.clock = _ProcessReactor()
        self.supervisor = Supervisor(self.clock, 1, [], [])
        self.supervisor.startService()

    def die(self, after: float) -> float:
        """Let the current worker run `after` seconds, kill it: the delay before its restart."""
        self.clock.advance(after)
        worker = self.clock.spawned[-1]
        worker.processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        delay = self.supervisor.restarts[1].getTime() - self.clock.seconds()
        self.clock.advance(delay - TICK)
        self.assertIs(self.clock.spawned[-1], worker)  # not a moment before the delay...
        self.clock.advance(TICK)
        self.assertIsNot(self.clock.spawned[-1], worker)  # ...started again then
        return delay

    def test_a_worker_that_keeps_dying_is_restarted_with_a_backoff(self):
        self.assertEqual([self.die(TICK) for _ in range(8)], [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])

    def test_a_worker_that_ran_steadily_starts_again_at_once(self):
        self.assertEqual([self.die(TICK), self.die(TICK), self.die(10.0), self.die(TICK)], [0.5, 1.0, 0.5, 1.0])

    def test_stopping_cancels_a_pending_restart(self):
        self.clock.spawned[-1].processEnded(Failure(ProcessTerminated(signal=signal.SIGKILL)))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.successResultOf(self.supervisor.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])
