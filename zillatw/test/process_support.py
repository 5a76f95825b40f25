"""Test support: twistd children, -w workers, a Redis server, gateways on a config file."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from zillatw import build_gateway
from zillatw.test.support import (
    CONF,
    eventually,
    free_port,
    start_gateway,
)

ROOT = os.path.dirname(CONF)


TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


ENV = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


class Collect(ProcessProtocol):
    def __init__(self):
        self.out = b""
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data):
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback((reason.value.exitCode, getattr(reason.value, "signal", None)))


def server_pid(client, pids):
    """Which of `pids` holds the server end of a client's TCP connection: the socket whose
    local and remote addresses are the client's, reversed (/proc/net/tcp), by its inode."""
    local, remote = client.transport.getHost(), client.transport.getPeer()
    wanted = (f"0100007F:{remote.port:04X}", f"0100007F:{local.port:04X}")
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    inodes = {row[9] for row in rows if (row[1], row[2]) == wanted}
    assert len(inodes) == 1, (wanted, inodes)
    link = f"socket:[{inodes.pop()}]"
    owners = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    owners.add(pid)
            except OSError:
                pass
    assert len(owners) == 1, (link, owners)
    return owners.pop()


def worker_pids(out):
    """{worker index: pid} of the latest start of each, from the supervisor's log."""
    return {int(index): int(pid) for index, pid in re.findall(rb"worker (\d+) started \(pid (\d+)\)", out)}


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not serving
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def spawn_twistd(case: unittest.TestCase, config: dict[str, Any] | str | Path, *args: str) -> tuple[str, Collect, Any]:
    """`twistd -n zillaws -c FILE *args` in a child process on `config` (a dict, written as YAML,
    the file's text, or a Path: that file itself), killed when the test ends.
    -> (the file's path, Collect, process)"""
    if isinstance(config, Path):
        path = os.path.abspath(config)
    else:
        path = os.path.abspath(case.mktemp())
        with open(path, "w") as f:
            f.write(config if isinstance(config, str) else yaml.safe_dump(config))
    child = Collect()
    process = reactor.spawnProcess(child, TWISTD[0], TWISTD + ["-n", "--pidfile=", "zillaws", "-c", path, *args],
                                   env=ENV, path=ROOT)
    case.addCleanup(lambda: None if child.ended.called else process.signalProcess(signal.SIGKILL))
    return path, child, process


@defer.inlineCallbacks
def start_twistd(case: unittest.TestCase, config: dict[str, Any] | str, *args: str) -> Any:
    """spawn_twistd, once the child has logged ENGINE_STARTED. -> (path, Collect, process)"""
    path, child, process = spawn_twistd(case, config, *args)
    yield eventually(lambda: b"ENGINE_STARTED" in child.out or child.ended.called, timeout=20)
    case.assertIn(b"ENGINE_STARTED", child.out, child.out)
    return path, child, process


def spawn_workers(case: unittest.TestCase, config: dict | Path, workers: int, *args: str):
    """`twistd zillaws -w N` on `config` (written to a temp file), killed with all its workers
    when the test ends. -> (Collect, process transport, the config file's path)"""
    path, child, process = spawn_twistd(case, config, "-w", str(workers), *args)

    def kill_all():
        for pid in worker_pids(child.out).values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if not child.ended.called:
            process.signalProcess(signal.SIGKILL)
    case.addCleanup(kill_all)
    return child, process, path


# from test_shutdown
@defer.inlineCallbacks
def start_own_gateway(case, config, drain_timeout=10.0):
    """A gateway the test stops itself (cleanup stops it only if the test did not)."""
    gateway = build_gateway(config, event_stream=io.StringIO(), drain_timeout=drain_timeout)
    gateway.startService()
    case.addCleanup(lambda: gateway.stopService() if gateway.running else None)
    ports = yield gateway.listening
    return gateway, ports[0]


# from test_fan_redis
class RedisServer:
    """A redis-server on a loopback port (`port`, or a free one), no persistence; stop() and
    start() again on the same port."""

    def __init__(self, *args: str, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--loglevel", "warning", *self.args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"redis-server exited ({self.proc.returncode})"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.02)
        raise AssertionError(f"redis-server not answering on {self.port}")

    def crash(self) -> None:
        """SIGKILL: no goodbye to its clients beyond the kernel's."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# from test_fan_redis
def redis_server_binary() -> str:
    """$ZILLATW_REDIS_SERVER, else what scripts/install-redis.sh prints (it unpacks Debian's
    redis-server into build/redis/ once; later runs just print the path)."""
    if not _binary:
        explicit = os.environ.get("ZILLATW_REDIS_SERVER")
        if explicit:
            _binary.append(explicit)
        else:
            out = subprocess.run(["sh", os.path.join(ROOT, "scripts", "install-redis.sh")], check=True,
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
            _binary.append(out.strip().splitlines()[-1])
    return _binary[0]


# from test_fan_redis
_binary: list[str] = []


# from test_workers
class _ProcessReactor(MemoryReactorClock):
    """A clock whose spawnProcess starts nothing: it hands the worker a transport with a pid."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Any] = []

    def spawnProcess(self, worker: Any, *args: Any, **kwargs: Any) -> Any:
        transport = type("Process", (), {"pid": 1000 + len(self.spawned)})()
        self.spawned.append(worker)
        worker.makeConnection(transport)
        return transport


# from test_reload
class GatewayOnAFile(unittest.TestCase):
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


# from test_reload
def write(path, config):
    with open(path, "w") as f:
        if isinstance(config, str):
            f.write(config)
        else:
            yaml.safe_dump(config, f)


# from test_stream_echo
def serve_text(case: unittest.TestCase, folder: Path, text: str) -> Any:
    (folder / "zilla.yaml").write_text(text)
    return start_gateway(case, str(folder / "zilla.yaml"))


# from test_stream_echo
def conf_text(name: str, port: int) -> str:
    """conf/<name> as shipped, but on 127.0.0.1 and a free port."""
    text = Path(CONF, name).read_text()
    for shipped in ("port: 12345", "port: 23456"):
        text = text.replace(shipped, f"port: {port}")
    return text.replace("0.0.0.0", "127.0.0.1")


@defer.inlineCallbacks
def generate_keystores(case: unittest.TestCase, folder: Path) -> Any:
    """Run conf/tls/generate-keystore.py into `folder` (made if need be) as the examples'
    READMEs do, with KEYSTORE_PASSWORD "generated" for the test and the gateway it starts."""
    folder.mkdir(parents=True, exist_ok=True)
    out, err, code = yield getProcessOutputAndValue(
        sys.executable, [os.path.join(CONF, "tls", "generate-keystore.py"), str(folder)],
        env={**os.environ, "KEYSTORE_PASSWORD": "generated"}, reactor=reactor)
    case.assertEqual(code, 0, err)
    os.environ["KEYSTORE_PASSWORD"] = "generated"
    case.addCleanup(os.environ.pop, "KEYSTORE_PASSWORD", None)
