"""The gateway as a Twisted service: build a configuration's generation, listen, switch to
a new generation on reload, drain and stop.

A generation is everything one configuration serves with (its config, events, metrics,
binding graph and built bindings), built by `build_generation` alone. A reload builds the
next one and `Gateway.switch_to` swaps it in: listeners whose address is unchanged keep
their socket and route to the new tcp servers from then on; connections already open keep
the generation that accepted them, which is kept (`retired`) until its last one closes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from zillatw.config import Config, load
from zillatw.errors import ConfigError
from zillatw.telemetry.events import Events
from zillatw.runtime.graph import BindingGraph
from zillatw.telemetry.metrics import Metrics
from zillatw.config.plugins import IDrainsGracefully, IHoldsConnections, IRunsInBackground, Registry
from zillatw.bindings.tcp.binding import TcpServer
from zillatw.runtime.reload import ConfigWatcher
from zillatw.runtime.standard import standard_registry
from zillatw.config.yamlload import DEFAULT_LIMITS, Limits

Source = str | os.PathLike[str] | Mapping[str, Any] | list[Mapping[str, Any]] | Config
DRAIN_TIMEOUT = 10.0  # seconds stopService waits for connections to close before dropping them


def load_config(source: Source, env: Mapping[str, str] | None = None, limits: Limits = DEFAULT_LIMITS,
                registry: Registry | None = None) -> Config:
    """Load and validate a zilla.yaml (path, dict or list of dicts), a file within `limits`
    (zillatw.config.yamlload), with the types of `registry` (the built-in ones by default); raises
    ConfigError, also for a configuration that listens on nothing."""
    if isinstance(source, Config):
        return source
    config = load(source, registry or standard_registry(), env=env, limits=limits)
    require_listener(config)
    return config


def require_listener(config: Config) -> None:
    """A gateway that opens no socket would start, say ENGINE_STARTED and serve nothing
    (as a `kind: server` overridden by a later `kind: client` once did): refuse it."""
    if not any(binding.type == "tcp" and binding.kind == "server" for binding in config.bindings()):
        where = ", ".join(ns.name for ns in config.namespaces)
        raise ConfigError(f"bindings: no binding listens (namespaces: {where}): a tcp server binding is needed "
                          "(type: tcp, kind: server, with options host and port)")


@dataclass
class Generation:
    """What one configuration serves with; built by build_generation, swapped in whole."""

    config: Config
    events: dict[str, Events]
    metrics: Metrics
    graph: BindingGraph
    bindings: dict[str, Any]

    def servers(self) -> list[TcpServer]:
        return [self.graph.binding(b.qname) for b in self.graph.servers("tcp")]

    def holding(self) -> list[Any]:
        """Its bindings with connections of their own (IHoldsConnections)."""
        return [b for b in self.bindings.values() if IHoldsConnections.providedBy(b)]

    def idle(self) -> bool:
        return not any(binding.open_count() for binding in self.holding())

    def start(self) -> None:
        for binding in self.bindings.values():
            if IRunsInBackground.providedBy(binding):  # e.g. a fan's Redis connections
                binding.start_service()

    def stop(self) -> defer.Deferred:
        """What bindings hold besides their connections (a fan's Redis)."""
        stopping = [binding.stop_service() for binding in self.bindings.values()
                    if IRunsInBackground.providedBy(binding)]
        return defer.gatherResults([d for d in stopping if d is not None], consumeErrors=True)

    def emit(self, event: str, details: str) -> None:
        """An engine event (trace id 0) in every namespace."""
        for ns in self.config.namespaces:
            self.events[ns.name].emit(ns.name, "engine", 0, event, details)


def build_generation(config: Config, reactor: Any, event_stream: TextIO | None = None,
                     registry: Registry | None = None) -> Generation:
    """Every vault and binding of `config`, built on `reactor` (ConfigError with all their
    problems if one cannot be)."""
    events = {ns.name: Events.from_telemetry(ns.telemetry, event_stream) for ns in config.namespaces}
    metrics = Metrics(config, events, reactor=reactor)
    graph = BindingGraph(config, registry or standard_registry(), events, metrics, reactor=reactor)
    return Generation(config, events, metrics, graph, graph.build_all())


class Gateway(Service):
    """Serves one configuration at a time. `listening` fires once every listener is up."""

    log = Logger()
    # A file written once every listener (and metrics endpoint) listens, removed on stop:
    # Zilla's /var/run/zilla/ready, for health checks. `twistd zillaws --ready-file PATH`.
    ready_file: str | None = None
    # Seconds between looks at the configuration file for changes (zillatw.runtime.reload), or None
    # not to watch; `twistd zillaws` watches (every 1 s) unless --no-watch.
    watch_interval: float | None = None
    source: str | None = None  # the configuration file's absolute path, if read from one
    env: Mapping[str, str] | None = None
    limits: Limits = DEFAULT_LIMITS  # on reading the file again (zillatw.config.yamlload)
    verbose = False  # print a reloaded configuration, as at startup with -v

    def __init__(self, config: Config, reactor: Any = None, event_stream: TextIO | None = None,
                 drain_timeout: float = DRAIN_TIMEOUT, registry: Registry | None = None):
        if reactor is None:  # an embedder's default; tests pass theirs
            from twisted.internet import reactor
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        self.event_stream = event_stream
        self.registry = registry or standard_registry()
        # Listening sockets a supervisor opened for this worker process (zillatw.runtime.workers), by
        # address ((host, port) as configured): the tcp servers adopt them instead of binding.
        self.inherited_listeners: dict[tuple[str, int], Any] = {}
        self.reloading = False
        self.reload_waiters: list[defer.Deferred] = []  # reloads asked for while one runs
        self.retired: list[Generation] = []  # previous configurations still in use
        self._watcher: ConfigWatcher | None = None
        self.generation = build_generation(config, reactor, event_stream, self.registry)
        self.listening: defer.Deferred = defer.Deferred()

    # The current generation's parts, as the gateway's own (the embedding API's names).
    config = property(lambda self: self.generation.config)
    events = property(lambda self: self.generation.events)
    metrics = property(lambda self: self.generation.metrics)
    graph = property(lambda self: self.generation.graph)
    bindings = property(lambda self: self.generation.bindings)

    def binding(self, name: str) -> Any:
        """A built binding by `name` (first namespace) or `namespace:name`."""
        qname = name if ":" in name else f"{self.config.namespaces[0].name}:{name}"
        return self.graph.binding(qname)

    def servers(self) -> list[TcpServer]:
        return self.generation.servers()

    def ports(self, name: str | None = None) -> list[int]:
        """Ports the tcp server `name` (or every one) listens on; useful with port 0."""
        servers = [self.binding(name)] if name else self.servers()
        return [port for server in servers for port in server.bound_ports()]

    def metrics_ports(self) -> list[int]:
        """Ports the prometheus exporters listen on; useful with port 0."""
        return self.metrics.ports()

    def startService(self) -> None:
        super().startService()
        self._remove_ready_file()  # a stale one from a crashed run would lie until we listen
        self.generation.start()
        d = defer.gatherResults([server.listen(self.reactor, inherited=self.inherited_listeners)
                                 for server in self.servers()]
                                + [self.metrics.listen(self.reactor)], consumeErrors=True)
        # Announce (event, ready file, `listening`) once the reactor runs: twistd starts
        # services before reactor.run(), and the drain-on-SIGTERM handlers (zillatw.runtime.shutdown)
        # are installed only then, so whoever acts on "started" may send SIGTERM at once.
        d.addCallbacks(lambda _: self.reactor.callWhenRunning(self._started, None), self._failed)
        if self.watch_interval and self.source:
            self._watcher = ConfigWatcher(self, self.watch_interval, self.reactor)
            self._watcher.start()

    # ---- reloading

    def reload(self) -> defer.Deferred:
        """Read the configuration file again and serve it if it is valid; fires with whether
        it did. Reading, parsing, validating and modelling run in a thread of the reactor's
        pool, so traffic flows while a large file loads; building and switching run in the
        reactor thread. While a reload runs, this asks for one more, run after it."""
        if self.reloading:
            waiter: defer.Deferred = defer.Deferred()
            self.reload_waiters.append(waiter)
            return waiter

        def next_one(result: Any) -> Any:
            waiters, self.reload_waiters = self.reload_waiters, []
            if waiters:
                again = self.reload()  # the file as it is now, which they may have changed
                def answer(switched: bool) -> None:
                    for waiter in waiters:
                        waiter.callback(switched)
                again.addCallback(answer)
            return result
        return self._reload().addBoth(next_one)

    def _load_off_reactor(self) -> defer.Deferred:
        """load_config in a thread of the reactor's pool (in the reactor's own thread if it
        has none, as a test's fake reactor)."""
        source = self.source
        if source is None:  # _reload refuses before asking
            return defer.fail(ConfigError("the configuration was not read from a file: nothing to reload"))
        if not IReactorThreads.providedBy(self.reactor):
            return defer.maybeDeferred(load_config, source, self.env, self.limits, self.registry)
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), load_config,
                                         source, self.env, self.limits, self.registry)

    @defer.inlineCallbacks
    def _reload(self) -> Any:
        self.reloading = True
        try:
            try:
                if self.source is None:
                    raise ConfigError("the configuration was not read from a file: nothing to reload")
                config = yield self._load_off_reactor()
                if not self.running:  # stopped while the file loaded: nothing to switch
                    return False
                generation = build_generation(config, self.reactor, self.event_stream, self.registry)
            except ConfigError as e:
                self._reload_failed(list(e.problems))
                return False
            except Exception as e:  # a bug in building must not take the running gateway down
                self.log.failure("zillatw: reload failed")
                self._reload_failed([f"{type(e).__name__}: {e}"])
                return False
            try:
                switched = yield self.switch_to(generation)
            except Exception as e:
                self.log.failure("zillatw: reload failed")
                self._reload_failed([f"{type(e).__name__}: {e}"])
                return False
            return switched
        finally:
            self.reloading = False

    def _reload_failed(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        self.log.error("zillatw: {source}: reload failed, still serving the previous configuration:\n  {problems}",
                       source=self.config.source, problems="\n  ".join(problems))
        self.generation.emit("CONFIG_RELOAD_FAILED", shown)

    @defer.inlineCallbacks
    def switch_to(self, new: Generation) -> Any:
        """Serve `new` from now on (see the module docstring); fires with whether it did. A new
        listener that cannot listen changes nothing: the old generation keeps serving."""
        old = self.generation
        old_servers = old.servers()
        old_listeners = {listener.address: listener for server in old_servers for listener in server.listeners}
        new_servers = new.servers()
        wanted = {address for server in new_servers for address in server.addresses()}
        if self.inherited_listeners and wanted != set(old_listeners):
            self._reload_failed(["tcp listeners: with workers (-w), the supervisor holds the listening sockets, "
                                 "so a reload cannot add or remove listener addresses; restart to change them"])
            return False
        # 1. Open the new addresses (and the metrics endpoints); a failure undoes it all.
        yield old.metrics.stop()
        opened = []
        try:
            for server in new_servers:
                yield server.listen(self.reactor, skip=old_listeners, inherited=self.inherited_listeners)
                opened.append(server)
            yield new.metrics.listen(self.reactor)
        except Exception as e:
            error = e.subFailure.value if hasattr(e, "subFailure") else e
            yield defer.gatherResults([server.stop() for server in opened], consumeErrors=True)
            yield old.metrics.listen(self.reactor)
            self._reload_failed([f"cannot listen: {error}"])
            return False
        # 2. Start the new bindings, then hand the kept sockets over: from here on, new
        #    connections get the new bindings.
        new.start()
        for server in new_servers:
            server.hand_over(old_listeners.pop(address) for address in server.addresses() if address in old_listeners)
        for server in old_servers:  # they no longer own any socket: nothing of theirs can close one
            server.listeners = []
        self.generation = new
        # 3. Close the listeners that are gone; their connections, like every open one, stay on
        #    the old bindings until they close.
        yield defer.gatherResults([defer.maybeDeferred(listener.port.stopListening)
                                   for listener in old_listeners.values()], consumeErrors=True)
        self.retired.append(old)
        self.prune_retired()
        self.log.info("zillatw: {source}: configuration reloaded", source=new.config.source)
        if self.verbose:  # as at startup with -v, and as Zilla prints a reloaded configuration
            sys.stdout.write(new.config.dump())
            sys.stdout.flush()
        new.emit("CONFIG_RELOADED", str(new.config.source))
        return True

    def prune_retired(self) -> None:
        """Let go of previous generations once their last connection closed."""
        for generation in [g for g in self.retired if g.idle()]:
            self.retired.remove(generation)
            generation.stop()

    # ---- starting and stopping

    def _started(self, _: Any) -> None:
        self.generation.emit("ENGINE_STARTED", "Engine Started.")
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
        stopped = defer.gatherResults([server.stop() for server in self.servers()] + [self.metrics.stop()],
                                      consumeErrors=True)
        stopped.addErrback(lambda failure: self.log.failure("zillatw: stopping a listener", failure))
        return stopped.addCallback(lambda _: self._drain()).addCallback(lambda _: self.generation.stop())

    def _drain(self) -> defer.Deferred:
        draining = [b for generation in [self.generation, *self.retired] for b in generation.holding()]
        for binding in draining:
            if IDrainsGracefully.providedBy(binding):  # a ws client's upstreams get 1001 from their ws server
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
                  limits: Limits = DEFAULT_LIMITS, registry: Registry | None = None) -> Gateway:
    """Embedding API: a Gateway service for a path, dict or Config. Start it with
    `gateway.startService()` (or attach it to an Application); ConfigError if invalid.
    A file is read within `limits`, at startup and on every reload; `reactor` is the one
    every binding uses (a test passes a MemoryReactorClock); `registry` the types served
    (zillatw.runtime.standard.standard_registry(), with types of one's own registered on it)."""
    registry = registry or standard_registry()
    gateway = Gateway(load_config(source, env, limits, registry), reactor, event_stream, drain_timeout, registry)
    gateway.limits = limits
    if isinstance(source, (str, os.PathLike)):
        gateway.source, gateway.env = os.path.abspath(source), env
    return gateway
