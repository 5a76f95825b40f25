"""The `health` exporter (ours): liveness and readiness over HTTP, on a listener of its own.

```yaml
telemetry:
  exporters:
    health0:
      type: health
      options: {host: 0.0.0.0, port: 7180}
```

- `GET /health`: 200 while the process serves (draining included: an orchestrator must not
  kill a process that is closing its connections);
- `GET /ready`: 200 once every listener is bound and the configuration is loaded, 503 while
  starting or draining (the Gateway's `Readiness`; under `-w N` the supervisor's: ready when
  every worker is);
- `HEAD` on either answers the same head without a body; anything else is 404.

It is not a binding: it has its own socket, outside every tcp server, http server and ws
server and their limits, so that it answers when every ws server is at `max-connections`
(Zilla #1495: a full gateway failed its load balancer's health checks). It is bounded on its
own terms: at most MAX_CONNECTIONS connections at a time (more are closed at once), a request
head of at most MAX_HEAD_BYTES, read within HEAD_TIMEOUT seconds, one request per connection.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from zillatw.wire.http1 import HttpError, RequestHeadParser, render_response

DEFAULT_HOST = "0.0.0.0"  # noqa: S104 - probes come from the orchestrator, not from loopback
HEAD_TIMEOUT = 5.0        # seconds a connection has to send its request head
MAX_HEAD_BYTES = 2048     # request line and headers, each; a probe sends a few dozen bytes
MAX_HEADERS = 32
MAX_CONNECTIONS = 64      # at a time, per listener: probes are few and short
OPTIONS = ("host", "port")


class Readiness(enum.Enum):
    """Where a gateway (or a supervisor of workers) is in its life, for `/ready`."""

    STARTING = "starting"  # configuration loaded, listeners not all bound yet
    READY = "ready"        # every listener bound: new connections are served
    DRAINING = "draining"  # stopping: listeners closed, connections being closed


Address = tuple[str, int]


def check(namespace: Any, where: str) -> Iterator[str]:
    """Problems in a namespace's health exporters' options (a namespace check)."""
    for name, exporter in (namespace.telemetry.get("exporters") or {}).items():
        if exporter["type"] != "health":
            continue
        path = f"{where}telemetry.exporters.{name}.options"
        options = exporter.get("options")
        if not isinstance(options, Mapping) or "port" not in options:
            yield f"{path}: missing required key 'port' (options: {{host, port}})"
            continue
        for key in options:
            if key not in OPTIONS:
                yield f"{path}.{key}: not allowed here (expected one of: {', '.join(OPTIONS)})"
        port = options["port"]
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            yield f"{path}.port: expected a port number (0-65535), got {port!r}"
        host = options.get("host", DEFAULT_HOST)
        if not isinstance(host, str) or not host:
            yield f"{path}.host: expected an address to listen on (e.g. 0.0.0.0 or 127.0.0.1), got {host!r}"


def health_addresses(config: Any) -> list[Address]:
    """Every (host, port) the health exporters of `config` listen on, once each, in order."""
    found: dict[Address, None] = {}
    for ns in config.namespaces:
        for exporter in (ns.telemetry.get("exporters") or {}).values():
            if exporter["type"] == "health":
                options = exporter["options"]
                found[(options.get("host", DEFAULT_HOST), options["port"])] = None
    return list(found)


def answer(method: str, target: str, readiness: Readiness) -> bytes:
    """The whole response to one request (sans-IO)."""
    path = target.partition("?")[0]
    if method not in ("GET", "HEAD") or path not in ("/health", "/ready"):
        response = render_response(404, "not found (GET /health or /ready)")
    elif path == "/health":
        response = render_response(200, "ok", (("Cache-Control", "no-store"),))
    elif readiness is Readiness.READY:
        response = render_response(200, "ready", (("Cache-Control", "no-store"),))
    else:
        response = render_response(503, readiness.value, (("Cache-Control", "no-store"),))
    if method == "HEAD":  # the same head, Content-Length included (RFC 9110 §9.3.2), no body
        response = response[: response.index(b"\r\n\r\n") + 4]
    return response


class HealthProtocol(Protocol):
    factory: "HealthFactory"
    transport: Any  # a TCP transport (abortConnection)

    def connectionMade(self) -> None:
        self.parser = RequestHeadParser(MAX_HEAD_BYTES, MAX_HEAD_BYTES, MAX_HEADERS)
        self.timer = self.factory.reactor.callLater(HEAD_TIMEOUT, self._timed_out)
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return  # one request per connection; the rest is not read
        try:
            request = self.parser.feed(data)
        except HttpError as e:
            self._respond(render_response(e.status, e.reason))
            return
        if request is not None:
            self._respond(answer(request.method, request.target, self.factory.readiness()))

    def _respond(self, response: bytes) -> None:
        self.answered = True
        if self.timer.active():
            self.timer.cancel()
        self.transport.write(response)
        self.transport.loseConnection()

    def _timed_out(self) -> None:
        self.answered = True
        self.transport.write(render_response(408, f"no request within {HEAD_TIMEOUT:g} s"))
        self.transport.loseConnection()
        # a peer that reads nothing must not hold its slot: abort after as long again
        self.timer = self.factory.reactor.callLater(HEAD_TIMEOUT, self.transport.abortConnection)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.timer.active():
            self.timer.cancel()
        self.factory.connections.discard(self)


class HealthFactory(Factory):
    """Builds at most MAX_CONNECTIONS protocols at a time; `readiness` is asked per request."""

    noisy = False

    def __init__(self, reactor: Any, readiness: Callable[[], Readiness]):
        self.reactor = reactor
        self.readiness = readiness
        self.connections: set[HealthProtocol] = set()

    def buildProtocol(self, addr: Any) -> Any:  # a HealthProtocol, or None: refused
        if len(self.connections) >= MAX_CONNECTIONS:
            return None  # the reactor closes the socket at once
        protocol = HealthProtocol()
        protocol.factory = self
        self.connections.add(protocol)
        return protocol


class HealthEndpoints:
    """The health listeners of a process, by address. They outlive a configuration: a reload
    keeps the addresses it still names (no probe is refused meanwhile), opens the new ones
    and closes the others; readiness stays what the gateway says throughout."""

    def __init__(self, reactor: Any, readiness: Callable[[], Readiness]):
        self.reactor = reactor
        self.factory = HealthFactory(reactor, readiness)
        self.listening: dict[Address, Any] = {}

    def open(self, addresses: Iterable[Address]) -> defer.Deferred:
        """open_now, as a Deferred (the gateway's listeners are Deferreds)."""
        return defer.maybeDeferred(self.open_now, addresses)

    def open_now(self, addresses: Iterable[Address]) -> list[int]:
        """Listen on those of `addresses` not listened on yet, and return the ports; on a
        failure, close the ones this call opened and raise (CannotListenError)."""
        opened: list[Address] = []
        try:
            for host, port in addresses:
                if (host, port) not in self.listening:
                    self.listening[(host, port)] = self.reactor.listenTCP(port, self.factory, interface=host)
                    opened.append((host, port))
        except Exception:
            self._close(opened)  # stopListening on a TCP port is immediate
            raise
        return self.ports()

    def close_except(self, addresses: Iterable[Address]) -> defer.Deferred:
        """Stop listening on every address but `addresses`."""
        keep = set(addresses)
        return self._close([address for address in self.listening if address not in keep])

    def stop(self) -> defer.Deferred:
        """Stop listening, and close the connections still open (a probe gets no answer from
        a process that has exited anyway)."""
        for protocol in list(self.factory.connections):
            protocol.transport.abortConnection()
        return self._close(list(self.listening))

    def _close(self, addresses: list[Address]) -> defer.Deferred:
        ports = [self.listening.pop(address) for address in addresses]
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports], consumeErrors=True)

    def ports(self) -> list[int]:
        """The ports listened on, in the order of their addresses (useful with port 0)."""
        return [port.getHost().port for port in self.listening.values()]
