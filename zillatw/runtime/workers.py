"""`twistd zillaws -w N`: N worker processes accepting on the same listening sockets.

The parent (the supervisor) opens every tcp server's listening socket, then runs N children,
each `twistd -n zillaws` on the same file, passing them the sockets (spawnProcess'
childFDs); a child adopts them (reactor.adoptStreamPort) instead of binding its own, and the
kernel hands each new connection to one of the workers. The supervisor serves nothing itself:
- a worker that dies is started again, after 0.5 s, doubling with each death in a row up to
  30 s (a worker that ran 10 s resets it), so a crashing configuration never spins;
- SIGTERM/SIGINT go to every worker, each drains its connections (1001) and exits, then the
  supervisor exits 0; a second signal is passed on as well, and everything exits at once;
- SIGHUP goes to every worker: each reloads the file (zillatw.runtime.reload), as each watches it;
- `--ready-file` is written once every worker listens.

A worker is a whole gateway: each has its own fan groups (see the README, "Workers"),
metrics and connection limits.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from zillatw.config.yamlload import limit_flags

log = Logger()
STATUS_FD = 3           # a worker writes "ready" on it once it listens
FIRST_FD = 4            # the listening sockets, from here on, in the order of --listen-fds
RESTART_DELAY, MAX_RESTART_DELAY, STEADY = 0.5, 30.0, 10.0
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket as Twisted opens one (SO_REUSEADDR, non-blocking)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class AdoptedEndpoint:
    """A worker's listening socket: the supervisor's, adopted (an IStreamServerEndpoint)."""

    def __init__(self, reactor: Any, fd: int, family: int):
        self.reactor, self.fd, self.family = reactor, fd, family

    def listen(self, factory: Any) -> defer.Deferred:
        return defer.execute(self.reactor.adoptStreamPort, self.fd, self.family, factory)


def become_worker(reactor: Any, spec: str, gateway: Any) -> None:
    """In a worker: adopt the sockets `--listen-fds` names, say "ready" once listening, and
    stop (draining) if the supervisor is gone."""
    for item in filter(None, spec.split(",")):
        address, _, fd = item.rpartition("=")
        host, _, port = address.rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        gateway.inherited_listeners[(host, int(port))] = AdoptedEndpoint(reactor, int(fd), family)
    # Signals are the supervisor's to pass on: a Ctrl-C in a terminal reaches the whole
    # foreground process group, and a worker must get it once, not twice (twice: exit at once).
    os.setpgid(0, 0)
    parent = os.getppid()

    def ready(result: Any) -> Any:
        try:
            os.write(STATUS_FD, b"ready\n")
        except OSError:
            pass
        return result

    def orphaned() -> None:
        if os.getppid() != parent:
            watch.stop()
            log.warn("zillatw: the supervisor is gone: stopping")
            try:
                reactor.stop()  # drains, as SIGTERM does
            except ReactorNotRunning:  # already stopping
                pass

    gateway.listening.addCallback(ready)
    from twisted.internet import task
    watch = task.LoopingCall(orphaned)
    watch.clock = reactor
    reactor.callWhenRunning(watch.start, 1.0, now=False)


class Worker(ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", index: int):
        self.supervisor = supervisor
        self.index = index
        self.pid: int | None = None
        self.ready = False
        self.started = supervisor.reactor.seconds()

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == STATUS_FD and b"ready" in data and not self.ready:
            self.ready = True
            self.supervisor.worker_ready(self)

    def processEnded(self, reason: Any) -> None:
        self.supervisor.worker_ended(self, reason.value)

    def signal(self, number: int) -> None:
        try:
            self.transport.signalProcess(number)
        except Exception:  # already gone (ProcessExitedAlready)
            pass


class Supervisor(Service):
    """The parent of `-w N`: holds the sockets, runs and restarts the workers."""

    def __init__(self, reactor: Any, count: int, addresses: list[tuple[str, int, int]], worker_args: list[str],
                 ready_file: str | None = None):
        self.reactor = reactor
        self.count = count
        self.addresses = addresses        # (host, port, backlog), as configured
        self.worker_args = worker_args    # after `twistd -n --pidfile= zillaws`
        self.ready_file = ready_file
        self.sockets: list[socket.socket] = []
        self.workers: dict[int, Worker] = {}
        self.failures: dict[int, int] = {}
        self.restarts: dict[int, Any] = {}
        self.stopping = False
        self._stopped: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        try:
            self.sockets = [listen_socket(host, port, backlog) for host, port, backlog in self.addresses]
        except OSError as e:
            for sock in self.sockets:
                sock.close()
            log.error("zillatw: cannot listen: {error}", error=e)
            self.reactor.callWhenRunning(self.reactor.stop)
            return
        for index in range(1, self.count + 1):
            self.spawn(index)

    def ports(self) -> list[int]:
        return [sock.getsockname()[1] for sock in self.sockets]

    def spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        fds = ",".join(f"{host}:{port}={FIRST_FD + n}" for n, (host, port, _) in enumerate(self.addresses))
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2, STATUS_FD: "r"}
        child_fds.update({FIRST_FD + n: sock.fileno() for n, sock in enumerate(self.sockets)})
        worker = self.workers[index] = Worker(self, index)
        self.reactor.spawnProcess(worker, TWISTD[0], TWISTD + ["-n", "--pidfile=", "zillaws", *self.worker_args,
                                                               "--listen-fds", fds],
                                  env=os.environ.copy(), childFDs=child_fds)
        log.info("zillatw: worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def worker_ready(self, worker: Worker) -> None:
        log.info("zillatw: worker {index} (pid {pid}) listening", index=worker.index, pid=worker.pid)
        if self.ready_file and not self.stopping and all(w.ready for w in self.workers.values()) \
                and len(self.workers) == self.count:
            with open(self.ready_file, "w") as ready:
                ready.write(f"{os.getpid()}\n")

    def worker_ended(self, worker: Worker, status: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        how = f"signal {status.signal}" if getattr(status, "signal", None) else f"code {status.exitCode}"
        if self.stopping:
            log.info("zillatw: worker {index} (pid {pid}) exited ({how})", index=worker.index, pid=worker.pid, how=how)
            if not self.workers and self._stopped is not None and not self._stopped.called:
                self._stopped.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        failures = 0 if lived >= STEADY else self.failures.get(worker.index, 0)
        delay = min(RESTART_DELAY * 2 ** failures, MAX_RESTART_DELAY)
        self.failures[worker.index] = failures + 1
        log.warn("zillatw: worker {index} (pid {pid}) exited ({how}); starting it again in {delay:g} s",
                 index=worker.index, pid=worker.pid, how=how, delay=delay)
        self.restarts[worker.index] = self.reactor.callLater(delay, self.spawn, worker.index)

    def signal_workers(self, number: int) -> None:
        for worker in list(self.workers.values()):
            worker.signal(number)

    def stopService(self) -> defer.Deferred:
        """SIGTERM to every worker (they drain), then fire once they have all exited."""
        super().stopService()
        self.stopping = True
        if self.ready_file:
            try:
                os.remove(self.ready_file)
            except FileNotFoundError:
                pass
        for call in self.restarts.values():
            call.cancel()
        self.restarts.clear()
        self._stopped = defer.Deferred()
        if not self.workers:
            self._stopped.callback(None)
        else:
            log.info("zillatw: stopping {count} workers", count=len(self.workers))
            self.signal_workers(signal.SIGTERM)
        for sock in self.sockets:  # the workers hold their own copies until they stop listening
            sock.close()
        return self._stopped

    def install_signals(self, graceful: Any) -> None:
        """Once running: SIGHUP to the workers; SIGTERM/SIGINT to the workers too when it is
        the second one (the first stops the reactor, whose shutdown stops them gracefully)."""
        def forward(number: int, frame: Any) -> None:
            if number == signal.SIGHUP:
                log.info("zillatw: SIGHUP received: passing it on to the workers")
                self.reactor.callFromThread(self.signal_workers, number)
                return
            if graceful.stopping:
                self.signal_workers(number)
            graceful.received(number, frame)

        def install() -> None:
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(number, forward)
        self.reactor.callWhenRunning(install)


def make_supervisor(reactor: Any, gateway: Any, options: Any, graceful: Any) -> Supervisor:
    """The supervisor for `-w N`, from a validated gateway (not started) and the options."""
    problems = []
    addresses = []
    for server in gateway.servers():
        if server.endpoint is not None:
            problems.append(f"bindings.{server.name}.options.endpoint: with -w, tcp servers listen on host and port")
        addresses.extend((server.host or "", port, server.backlog) for port in server.ports)
    if gateway.metrics.endpoints:
        problems.append("telemetry.exporters: prometheus exporters are not served with -w yet "
                        "(each worker would count its own connections)")
    if problems:
        raise SystemExit(f"zillaws: {options['config']}: cannot run workers:\n  " + "\n  ".join(problems))
    args = ["-c", os.path.abspath(options["config"]), "--drain-timeout", str(options["drain-timeout"])]
    if options["no-watch"]:
        args.append("--no-watch")
    args += limit_flags(gateway.limits)
    supervisor = Supervisor(reactor, options["workers"], addresses, args, options["ready-file"])
    supervisor.install_signals(graceful)
    return supervisor
