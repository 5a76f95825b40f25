"""The tcp client with `options.upstreams`: a pool of upstreams, health checked, with
failover before the caller's handshake (docs/upstreams.md). The choices are made by
zillatw.bindings.tcp.upstreams (sans-IO); this is its Twisted side: connection attempts and retries,
the live-stream count of each connection, the probes, events and metrics.

State across reloads: a tcp client built from a reloaded file shares its upstreams' states
(health, live streams) with the one before, so a reload neither forgets that an upstream is
down nor how loaded each one is, and an upstream no longer listed drains (its live streams
go on, it gets no new ones). They are kept here, in `_SHARED`, keyed by the reactor and the
binding's qualified name (`namespace:name`), from when a configuration using them starts
serving until the last one using them stops. Only the newest probes: a configuration's
probes stop when the next one's tcp client of that name starts (with a pool, or with host
and port: `superseded`), or when it stops.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from twisted.internet import defer, endpoints, error, task
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from zillatw.bindings.tcp.upstreams import (
    DEFAULT_FAILS,
    DEFAULT_INTERVAL,
    DEFAULT_PASSES,
    DEFAULT_TIMEOUT,
    PASSIVE_REJOIN,
    Balance,
    HealthSettings,
    Key,
    Pool,
    PoolStates,
    Transition,
    Upstream,
)
from zillatw.config import BindingConfig
from zillatw.config.plugins import IRunsInBackground, Problem
from zillatw.stream import IUpstreamConnector, StreamRefused
from zillatw.telemetry.events import BindingEvents

POOL_KEYS = ("upstreams", "balance", "retries", "health")

# (reactor, host, port, timeout, factory) -> a Deferred of the connected protocol; tests
# pass one that needs no socket
Dial = Callable[[Any, str, int, float, IProtocolFactory], defer.Deferred]


def dial(reactor: Any, host: str, port: int, timeout: float, factory: IProtocolFactory) -> defer.Deferred:
    return endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout).connect(factory)


class PoolEvent(enum.Enum):
    """The tcp client's events about its upstreams (BINDING_TCP_ + the value)."""
    UP = "UPSTREAM_UP"              # passed its checks again
    DOWN = "UPSTREAM_DOWN"          # failed `fails` in a row: no new streams
    FAILED = "UPSTREAM_FAILED"      # a real connection attempt failed (another is tried)
    DRAINING = "UPSTREAM_DRAINING"  # no longer listed after a reload: its streams go on


def check_pool(options: Mapping[str, Any]) -> Iterator[Problem]:
    """What the schema cannot say about a tcp client's pool options."""
    if "upstreams" not in options:
        for key in POOL_KEYS[1:]:
            if key in options:
                yield f"options.{key}", "only with 'upstreams' (a tcp client with 'host' and 'port' has one upstream)"
        return
    upstreams = options["upstreams"]
    for key in ("host", "port"):
        if key in options:
            yield f"options.{key}", "give either 'upstreams' or 'host' and 'port', not both"
    seen: dict[tuple[str, int], int] = {}
    for index, item in enumerate(upstreams):
        where = seen.setdefault((item["host"], item["port"]), index)
        if where != index:
            yield f"options.upstreams[{index}]", f"the same host and port as upstreams[{where}]"
    health = options.get("health") or {}
    if health.get("timeout", DEFAULT_TIMEOUT) > health.get("interval", DEFAULT_INTERVAL):
        yield "options.health.timeout", "longer than options.health.interval: probes would overlap"


def pool_options(options: Mapping[str, Any]) -> tuple[list[Upstream], Balance, int, HealthSettings]:
    """(upstreams, balance, retries, health) from checked options; retries default to
    every other upstream once (more than that try each other one once: the issue's own
    example has `retries: 2` over two upstreams), no `health` means no probes (failed
    connects still count)."""
    upstreams = [Upstream(item["host"], item["port"], item.get("weight", 1)) for item in options["upstreams"]]
    balance = Balance(options.get("balance", Balance.ROUND_ROBIN.value))
    retries = options.get("retries", len(upstreams) - 1)
    health = options.get("health")
    settings = HealthSettings() if health is None else HealthSettings(
        interval=float(health.get("interval", DEFAULT_INTERVAL)), timeout=float(health.get("timeout", DEFAULT_TIMEOUT)),
        fails=health.get("fails", DEFAULT_FAILS), passes=health.get("passes", DEFAULT_PASSES), active=True)
    return upstreams, balance, retries, settings


# ---------------------------------------------------------------------------- shared states

class _Shared:
    """One binding's upstream states on one reactor, and what acts on them over time."""

    def __init__(self) -> None:
        self.states = PoolStates()
        self.serving: list[PooledTcpClient] = []  # started, not stopped; the last one probes
        self.prober: _Prober | None = None
        self.rejoins: dict[Key, Any] = {}  # passive only: DelayedCalls bringing a DOWN one back


_SHARED: dict[tuple[int, str], _Shared] = {}


# ---------------------------------------------------------------------------- the binding

@implementer(IUpstreamConnector, IRunsInBackground)
class PooledTcpClient:
    """A tcp client binding with a pool of upstreams: `connect` picks one, and tries another
    (up to `retries`, never one twice) when connecting fails or times out."""

    host = None  # no one host: a tls client in front sends and verifies the authority's name

    def __init__(self, qname: str, pool: Pool, retries: int, events: BindingEvents, *, reactor: Any,
                 dial: Dial = dial):
        self.qname = qname
        self.name = qname.partition(":")[2]
        self.pool = pool
        self.retries = retries
        self.events = events
        self.reactor = reactor
        self.dial = dial
        self._key = (id(reactor), qname)
        self._shared = _SHARED.get(self._key) or _Shared()
        pool.states = self._shared.states

    def connect(self, factory: IProtocolFactory, authority: str | None, timeout: float) -> defer.Deferred:
        """Connect `factory`'s protocol to an upstream of the pool within `timeout` seconds
        in all; fails with StreamRefused (502, or 504 when every attempt timed out)."""
        return _Attempts(self, factory, timeout).next()

    # ---- serving (IRunsInBackground: the gateway starts and stops each configuration's)

    def start_service(self) -> None:
        shared = _SHARED.setdefault(self._key, self._shared)
        if shared is not self._shared:  # another configuration started meanwhile: share its states
            self._shared, self.pool.states = shared, shared.states
        shared.serving.append(self)
        for key in shared.states.adopt(u.key for u in self.pool.upstreams):
            state = shared.states.state(key)
            self.emit(PoolEvent.DRAINING, f"{_address(key)} {state.active} live streams")
        if shared.prober is not None:
            shared.prober.stop()
            shared.prober = None
        if self.pool.settings.active:
            shared.prober = _Prober(self)
            shared.prober.start()
        else:
            for upstream in self.pool.upstreams:
                if not self.pool.state(upstream).up:
                    self._rejoin_later(upstream)

    def stop_service(self) -> None:
        shared = self._shared
        if self in shared.serving:
            shared.serving.remove(self)
        if shared.prober is not None and shared.prober.client is self:
            shared.prober.stop()
            shared.prober = None
        if not shared.serving:
            for call in shared.rejoins.values():
                if call.active():
                    call.cancel()
            shared.rejoins.clear()
            if _SHARED.get(self._key) is shared:
                del _SHARED[self._key]

    # ---- health

    def emit(self, event: PoolEvent, details: str) -> None:
        self.events.emit(0, f"BINDING_TCP_{event.value}", details)

    def report(self, upstream: Upstream, transition: Transition, why: str) -> None:
        if transition is Transition.WENT_DOWN:
            self.emit(PoolEvent.DOWN, f"{upstream.address} {why}")
            if not self.pool.settings.active:
                self._rejoin_later(upstream)
        elif transition is Transition.WENT_UP:
            self.emit(PoolEvent.UP, f"{upstream.address} {why}")

    def _rejoin_later(self, upstream: Upstream) -> None:
        rejoins = self._shared.rejoins
        if upstream.key in rejoins and rejoins[upstream.key].active():
            return

        def rejoin() -> None:
            rejoins.pop(upstream.key, None)
            self.report(upstream, self.pool.rejoin(upstream), f"tried again after {PASSIVE_REJOIN:g} s")
        rejoins[upstream.key] = self.reactor.callLater(PASSIVE_REJOIN, rejoin)


def superseded(reactor: Any, qname: str) -> None:
    """The tcp client `qname` serves without a pool now (a reload gave it host and port):
    nothing probes the pool's upstreams any more, and they drain."""
    shared = _SHARED.get((id(reactor), qname))
    if shared is None:
        return
    if shared.prober is not None:
        shared.prober.stop()
        shared.prober = None
    shared.states.adopt(())


def _address(key: Key) -> str:
    return Upstream(*key).address


def _in_a_row(failures: int, why: str) -> str:
    """Why an upstream went down: the failures that did it, and the last one's reason."""
    return f"{failures} failure{'s' if failures != 1 else ''}, the last: {why}"


class _Attempts:
    """One connection's attempts, on distinct upstreams, until one connects or none is left
    to try: `retries` more after the first, within the caller's timeout, which each
    attempt shares with those that may follow it."""

    def __init__(self, client: PooledTcpClient, factory: IProtocolFactory, timeout: float):
        self.client = client
        self.factory = factory
        self.deadline = client.reactor.seconds() + timeout
        self.tried: list[Key] = []
        self.failures: list[str] = []
        self.all_timed_out = True
        self.current: defer.Deferred | None = None
        self.cancelled = False
        self.result: defer.Deferred = defer.Deferred(self._cancel)

    def _cancel(self, _: defer.Deferred) -> None:
        self.cancelled = True
        if self.current is not None:
            self.current.cancel()

    def next(self) -> defer.Deferred:
        client, pool = self.client, self.client.pool
        remaining = self.deadline - client.reactor.seconds()
        upstream = pool.choose(self.tried)
        if upstream is None or len(self.tried) > client.retries or (self.tried and remaining <= 0):
            self._give_up(remaining)
            return self.result
        # this attempt and those that may follow share what is left of the time
        after = min(client.retries - len(self.tried), len(pool.available([*self.tried, upstream.key])))
        timeout = max(remaining, 0.001) / (1 + after)
        self.tried.append(upstream.key)
        lease = _Lease(pool, upstream)
        counted = _CountedFactory(self.factory, lease)
        connecting = defer.maybeDeferred(client.dial, client.reactor, upstream.host, upstream.port, timeout, counted)
        self.current = connecting
        connecting.addCallbacks(self._connected, self._failed, callbackArgs=(upstream, lease),
                                errbackArgs=(upstream, lease, timeout))
        return self.result

    def _connected(self, protocol: Any, upstream: Upstream, lease: "_Lease") -> None:
        self.current = None
        self.client.report(upstream, self.client.pool.connected(upstream), "connected")
        if self.result.called:  # given up on meanwhile: nobody wants this connection
            protocol.transport.abortConnection()
            return
        self.result.callback(getattr(protocol, "wrappedProtocol", protocol))

    def _failed(self, failure: Failure, upstream: Upstream, lease: "_Lease", timeout: float) -> None:
        self.current = None
        lease.release()
        if self.cancelled or self.result.called:
            return  # the caller gave up: not the upstream's failure
        timed_out = failure.check(error.TimeoutError) is not None
        self.all_timed_out &= timed_out
        why = f"no connection within {timeout:.3g} s" if timed_out else failure.getErrorMessage()
        self.failures.append(f"{upstream.address} {why}")
        client = self.client
        client.emit(PoolEvent.FAILED, f"{upstream.address} {why}")
        fails = _in_a_row(client.pool.state(upstream).check.failures + 1, why)
        client.report(upstream, client.pool.connect_failed(upstream), fails)
        self.next()

    def _give_up(self, remaining: float) -> None:
        client = self.client
        if not self.tried:
            pool = client.pool
            detail = f"tcp client {client.name}: all {len(pool.upstreams)} upstreams are down"
            self.result.errback(StreamRefused(502, "no upstream available", detail))
            return
        detail = f"tcp client {client.name}: " + "; ".join(self.failures)
        if remaining <= 0 and len(self.tried) <= client.retries:
            detail += " (no time left to try another)"
        if self.all_timed_out:
            self.result.errback(StreamRefused(504, "upstream timed out", detail))
        else:
            self.result.errback(StreamRefused(502, "upstream unreachable", detail))


class _Lease:
    """One live stream of an upstream: released once, when the attempt fails or the
    connection it made closes."""

    __slots__ = ("pool", "upstream", "released")

    def __init__(self, pool: Pool, upstream: Upstream):
        self.pool = pool
        self.upstream = upstream
        self.released = False
        pool.acquire(upstream)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.release(self.upstream)


@implementer(IProtocolFactory)
class _CountedFactory:
    """The caller's factory, whose connection's end releases its lease."""

    def __init__(self, factory: IProtocolFactory, lease: _Lease):
        self.wrappedFactory = factory
        self.lease = lease

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.wrappedFactory.buildProtocol(addr)
        return None if protocol is None else _CountedConnection(protocol, self.lease)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def __getattr__(self, name: str) -> Any:  # logPrefix, the factory's own
        return getattr(self.wrappedFactory, name)


class _CountedConnection:
    """Stands in for the caller's protocol toward the socket only to learn when the
    connection ends; the protocol gets the socket itself (its writes are not wrapped, so
    zillatw.twistedcompat's write-through applies) and reads go to it directly."""

    dataReceived: Callable[[bytes], None]  # the protocol's own, once connected: no call of ours per read

    def __init__(self, wrapped: Any, lease: _Lease):
        self.wrappedProtocol = wrapped
        self.lease = lease
        directlyProvides(self, providedBy(wrapped))  # half-close, TLS handshake listeners

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        self.dataReceived = self.wrappedProtocol.dataReceived
        self.wrappedProtocol.makeConnection(transport)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lease.release()
        self.wrappedProtocol.connectionLost(reason)

    def __getattr__(self, name: str) -> Any:  # logPrefix, readConnectionLost, handshakeCompleted...
        return getattr(self.wrappedProtocol, name)


# ---------------------------------------------------------------------------- probes

class _Probe(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()  # a TCP connect is the whole check


_PROBES = Factory.forProtocol(_Probe)
_PROBES.noisy = False


class _Prober:
    """Active health checks: a TCP connect to every listed upstream each `interval`
    seconds, given `timeout` seconds; at most one in flight per upstream."""

    def __init__(self, client: PooledTcpClient):
        self.client = client
        self.loops: list[task.LoopingCall] = []
        self.in_flight: dict[Key, defer.Deferred] = {}
        self.stopped = False

    def start(self) -> None:
        for upstream in self.client.pool.upstreams:
            loop = task.LoopingCall(self.probe, upstream)
            loop.clock = self.client.reactor
            loop.start(self.client.pool.settings.interval, now=True)
            self.loops.append(loop)

    def probe(self, upstream: Upstream) -> None:
        if upstream.key in self.in_flight:
            return
        client = self.client
        settings = client.pool.settings
        probing = defer.maybeDeferred(client.dial, client.reactor, upstream.host, upstream.port, settings.timeout,
                                      _PROBES)
        self.in_flight[upstream.key] = probing
        probing.addCallbacks(self._passed, self._failed, callbackArgs=(upstream,), errbackArgs=(upstream,))

    def _passed(self, _: Any, upstream: Upstream) -> None:
        self.in_flight.pop(upstream.key, None)
        if not self.stopped:
            self.client.report(upstream, self.client.pool.probe_passed(upstream), "passed its probe")

    def _failed(self, failure: Failure, upstream: Upstream) -> None:
        self.in_flight.pop(upstream.key, None)
        if self.stopped:
            return
        pool = self.client.pool
        why = (f"no connection within {pool.settings.timeout:g} s" if failure.check(error.TimeoutError)
               else failure.getErrorMessage())
        fails = _in_a_row(pool.state(upstream).check.failures + 1, why)
        self.client.report(upstream, pool.probe_failed(upstream), fails)

    def stop(self) -> None:
        self.stopped = True
        for loop in self.loops:
            if loop.running:
                loop.stop()
        for probing in list(self.in_flight.values()):
            probing.cancel()
        self.in_flight.clear()


# ---------------------------------------------------------------------------- metrics

class _PoolCollector:
    """prometheus-client's view of a pool's upstreams (the listed ones and those draining)."""

    def __init__(self, namespace: str, client: PooledTcpClient):
        self.namespace = namespace
        self.client = client

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        labels = ["namespace", "binding", "upstream"]
        up = GaugeMetricFamily("zillatw_upstream_up", "1 while the upstream takes new streams (up, not draining)",
                               labels=labels)
        active = GaugeMetricFamily("zillatw_upstream_active_streams", "connections open or being opened",
                                   labels=labels)
        failures = CounterMetricFamily("zillatw_upstream_connect_failures", "failed connection attempts "
                                       "(real traffic, not probes)", labels=labels)
        downs = CounterMetricFamily("zillatw_upstream_downs", "times the upstream was marked down", labels=labels)
        states = self.client.pool.states
        for key in states.known():
            state = states.state(key)
            values = [self.namespace, self.client.name, _address(key)]
            up.add_metric(values, float(state.available))
            active.add_metric(values, state.active)
            failures.add_metric(values, state.connect_failures)
            downs.add_metric(values, state.downs)
        yield from (up, active, failures, downs)


def build_client(binding: BindingConfig, graph: Any, dial: Dial = dial) -> PooledTcpClient:
    """A pooled tcp client from its checked options (upstreams, balance, retries, health)."""
    upstreams, balance, retries, settings = pool_options(binding.options)
    events = graph.events(binding.namespace).binding(binding.namespace, binding.name, "tcp")
    client = PooledTcpClient(binding.qname, Pool(upstreams, balance, settings), retries, events,
                             reactor=graph.reactor, dial=dial)
    if graph.metrics is not None:
        graph.metrics.registry.register(_PoolCollector(binding.namespace, client))
    return client
