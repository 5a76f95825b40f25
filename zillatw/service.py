"""The gateway as a Twisted service: build the binding graph, listen, stop listening."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TextIO

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from zillatw.config import Config, load
from zillatw.errors import ConfigError
from zillatw.graph import BindingGraph
from zillatw.metrics import Telemetry
from zillatw.protocols import binding_types
from zillatw.protocols.tcp import TcpServer
from zillatw.telemetry import Events
from zillatw.yamlload import DEFAULT_LIMITS, Limits

Source = str | os.PathLike[str] | Mapping[str, Any] | list[Mapping[str, Any]] | Config
DRAIN_TIMEOUT = 10.0  # seconds stopService waits for connections to close before dropping them


def load_config(source: Source, env: Mapping[str, str] | None = None, limits: Limits = DEFAULT_LIMITS) -> Config:
    """Load and validate a zilla.yaml (path, dict or list of dicts), a file within `limits`
    (zillatw.yamlload); raises ConfigError, also for a configuration that listens on nothing."""
    if isinstance(source, Config):
        return source
    config = load(source, binding_types(), env=env, limits=limits)
    require_listener(config)
    return config


def require_listener(config: Config) -> None:
    """A gateway that opens no socket would start, say ENGINE_STARTED and serve nothing
    (as a `kind: server` overridden by a later `kind: client` once did): refuse it."""
    if not any(binding.type == "tcp" and binding.kind == "server" for binding in config.bindings()):
        where = ", ".join(ns.name for ns in config.namespaces)
        raise ConfigError(f"bindings: no binding listens (namespaces: {where}): a tcp server binding is needed "
                          "(type: tcp, kind: server, with options host and port)")


class Gateway(Service):
    """Serves one configuration. `listening` fires once every listener is up."""

    log = Logger()
    # A file written once every listener (and metrics endpoint) listens, removed on stop:
    # Zilla's /var/run/zilla/ready, for health checks. `twistd zillaws --ready-file PATH`.
    ready_file: str | None = None
    # Seconds between looks at the configuration file for changes (zillatw.reload), or None
    # not to watch; `twistd zillaws` watches (every 1 s) unless --no-watch.
    watch_interval: float | None = None
    source: str | None = None  # the configuration file's absolute path, if read from one
    env: Mapping[str, str] | None = None
    limits: Limits = DEFAULT_LIMITS  # on reading the file again (zillatw.yamlload)

    def __init__(self, config: Config, reactor: Any = None, event_stream: TextIO | None = None,
                 drain_timeout: float = DRAIN_TIMEOUT):
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        self.event_stream = event_stream
        self.reloading = False
        self.reload_waiters: list[defer.Deferred] = []  # reloads asked for while one runs (zillatw.reload)
        self.retired: list[dict[str, Any]] = []  # bindings of previous configurations still in use
        self._watcher: Any = None
        self.events = {ns.name: Events.from_telemetry(ns.telemetry, event_stream) for ns in config.namespaces}
        self.telemetry = Telemetry(config, self.events)
        self.graph = BindingGraph(config, binding_types(), self.events, self.telemetry)
        self.bindings = self.graph.build_all()
        self.listening: defer.Deferred = defer.Deferred()

    def binding(self, name: str) -> Any:
        """A built binding by `name` (first namespace) or `namespace:name`."""
        qname = name if ":" in name else f"{self.config.namespaces[0].name}:{name}"
        return self.graph.binding(qname)

    def servers(self) -> list[TcpServer]:
        return [self.graph.binding(b.qname) for b in self.graph.servers("tcp")]

    def ports(self, name: str | None = None) -> list[int]:
        """Ports the tcp server `name` (or every one) listens on; useful with port 0."""
        servers = [self.binding(name)] if name else self.servers()
        return [port for server in servers for port in server.bound_ports()]

    def metrics_ports(self) -> list[int]:
        """Ports the prometheus exporters listen on; useful with port 0."""
        return self.telemetry.ports()

    def startService(self) -> None:
        super().startService()
        self._remove_ready_file()  # a stale one from a crashed run would lie until we listen
        for binding in self.bindings.values():
            if hasattr(binding, "start_service"):  # e.g. a fan's Redis connections
                binding.start_service()
        d = defer.gatherResults([server.listen(self.reactor) for server in self.servers()]
                                + [self.telemetry.listen(self.reactor)], consumeErrors=True)
        # Announce (event, ready file, `listening`) once the reactor runs: twistd starts
        # services before reactor.run(), and the drain-on-SIGTERM handlers (zillatw.shutdown)
        # are installed only then, so whoever acts on "started" may send SIGTERM at once.
        d.addCallbacks(lambda _: self.reactor.callWhenRunning(self._started, None), self._failed)
        if self.watch_interval and self.source:
            from zillatw.reload import ConfigWatcher
            self._watcher = ConfigWatcher(self, self.watch_interval)
            self._watcher.start()

    def reload(self) -> defer.Deferred:
        """Read the configuration file again and serve it if it is valid (see zillatw.reload);
        fires with whether it did."""
        from zillatw.reload import reload
        return reload(self)

    def prune_retired(self) -> None:
        """Let go of previous configurations' bindings once their last connection closed."""
        def idle(bindings: dict[str, Any]) -> bool:
            return not any(b.open_count() for b in bindings.values() if hasattr(b, "open_count"))
        for bindings in [b for b in self.retired if idle(b)]:
            self.retired.remove(bindings)
            for binding in bindings.values():
                if hasattr(binding, "stop_service"):
                    binding.stop_service()

    def _started(self, _: Any) -> None:
        for ns in self.config.namespaces:
            self.events[ns.name].emit(ns.name, "engine", 0, "ENGINE_STARTED", "Engine Started.")
        if self.ready_file and self.running:
            with open(self.ready_file, "w") as ready:
                ready.write(f"{os.getpid()}\n")
        self.listening.callback(self.ports())

    def _remove_ready_file(self) -> None:
        if self.ready_file:
            try:
                os.remove(self.ready_file)
            except FileNotFoundError:
                pass

    def _failed(self, failure: Any) -> None:
        error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure.value
        self.log.error("zillatw: cannot listen: {error}", error=error)
        self.listening.errback(error)

    def stopService(self) -> defer.Deferred:
        """Stop accepting, close every WebSocket with 1001 (requests still being read get
        503), and fire once all connections are closed or `drain_timeout` has passed, when
        the ones left are dropped."""
        super().stopService()
        self._remove_ready_file()
        if self._watcher is not None:
            self._watcher.stop()
        stopped = defer.gatherResults([server.stop() for server in self.servers()] + [self.telemetry.stop()],
                                      consumeErrors=True)
        stopped.addErrback(lambda failure: self.log.failure("zillatw: stopping a listener", failure))
        return stopped.addCallback(lambda _: self._drain()).addCallback(lambda _: self._stop_bindings())

    def _stop_bindings(self) -> defer.Deferred:
        """Once the connections are closed: what bindings hold besides them (a fan's Redis)."""
        stopping = [binding.stop_service() for binding in self.bindings.values() if hasattr(binding, "stop_service")]
        return defer.gatherResults([d for d in stopping if d is not None], consumeErrors=True)

    def _drain(self) -> defer.Deferred:
        everything = [b for bindings in [self.bindings, *self.retired] for b in bindings.values()]
        draining = [b for b in everything if hasattr(b, "open_count")]
        for binding in draining:
            if hasattr(binding, "going_away"):  # a ws client's upstreams get 1001 from their ws server
                binding.going_away()
        open_count = lambda: sum(binding.open_count() for binding in draining)  # noqa: E731
        drained: defer.Deferred = defer.Deferred()
        if open_count():
            self.log.info("zillatw: closing {count} connections (waiting up to {seconds:g} s)",
                          count=open_count(), seconds=self.drain_timeout)
        deadline = self.reactor.seconds() + self.drain_timeout

        def poll() -> None:
            left = open_count()
            if left and self.reactor.seconds() < deadline:
                self.reactor.callLater(0.02, poll)
                return
            if left:
                self.log.warn("zillatw: dropping {count} connections still open after {seconds:g} s",
                              count=left, seconds=self.drain_timeout)
                for binding in draining:
                    binding.drop_all()
            self.prune_retired()
            drained.callback(None)
        poll()
        return drained


def build_gateway(source: Source, reactor: Any = None, env: Mapping[str, str] | None = None,
                  event_stream: TextIO | None = None, drain_timeout: float = DRAIN_TIMEOUT,
                  limits: Limits = DEFAULT_LIMITS) -> Gateway:
    """Embedding API: a Gateway service for a path, dict or Config. Start it with
    `gateway.startService()` (or attach it to an Application); ConfigError if invalid.
    A file is read within `limits`, at startup and on every reload."""
    gateway = Gateway(load_config(source, env, limits), reactor, event_stream, drain_timeout)
    gateway.limits = limits
    if isinstance(source, (str, os.PathLike)):
        gateway.source, gateway.env = os.path.abspath(source), env
    return gateway
