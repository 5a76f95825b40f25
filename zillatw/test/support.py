"""Test support: what more than one test module uses lives here, and no test module imports
another (zillatw.test.test_structure fails if one does).

- support.py (this module): gateways on ephemeral loopback ports or on a clock (OnAClock), the
  configurations tests start from (chain, echo_chain, proxy_config), an Autobahn client that
  records frames, a raw TCP client for handshakes and frames no well-behaved client would send,
  an upstream WebSocket server.
- process_support.py: twistd in a child process (spawn_twistd, start_twistd, spawn_workers,
  Collect), a Redis server, a gateway on a configuration file (GatewayOnAFile).
- http_support.py: plain HTTP clients and upstreams (connect_http, request, plain_chain,
  Sender, Counting), and `websockets` clients run in a thread (attempt, in_thread).
- pki.py: keys and certificates made at run time, the TLS clients and servers that use them
  (tls_chain, connect_wss, TlsTestCase), JWT signing keys and guarded configurations.
- wire_support.py, wire_echo.py: the sans-IO core's tests (zillatw.wire) and their echo server;
  validation_support.py: a fake schema registry and schemas.
- reference_samples.py: a value for every key of docs/config-reference.md (test_reference).
- netns.py: a test's own network namespace, so Zilla's examples run on their written ports.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import socket
import struct
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from zope.interface import implementer

from zillatw import build_gateway

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")


class ReactorTimer:
    """For the Autobahn clients and servers tests talk to (zillatw itself uses none of
    Autobahn's protocol): its timer interface on plain reactor calls. Autobahn batches its
    timers into shared buckets whose reactor calls outlive cancelled timers, which trial
    reports as a dirty reactor; these end with them."""

    def __init__(self, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> Any:
        return self.reactor.callLater(delay, func, *args, **kwargs)


def chain(ws_routes: list[dict[str, Any]] | None = None, apps: dict[str, Any] | None = None,
          ws_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """tcp (port 0) -> http (upgrade: websocket) -> ws -> the given routes and apps."""
    ws: dict[str, Any] = {"type": "ws", "kind": "server", "routes": ws_routes or [{"exit": "echo"}]}
    if ws_options:
        ws["options"] = ws_options
    bindings = {
        "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "127.0.0.1", "port": 0}, "exit": "http0"},
        "http0": {"type": "http", "kind": "server",
                  "routes": [{"when": [{"headers": {"upgrade": "websocket"}}], "exit": "ws0"},
                             {"exit": "ws0"}]},
        "ws0": ws,
    }
    bindings.update(apps if apps is not None else {"echo": {"type": "echo", "kind": "server"}})
    return {"name": "test", "bindings": bindings,
            "telemetry": {"exporters": {"stdout": {"type": "stdout"}}}}


def on_ephemeral_port(config: dict[str, Any], tcp: str) -> dict[str, Any]:
    """The same config with one tcp binding on port 0 and its port conditions dropped."""
    config = copy.deepcopy(config)
    binding = config["bindings"][tcp]
    binding["options"]["host"], binding["options"]["port"] = "127.0.0.1", 0
    for route in binding.get("routes", []):
        route.pop("when", None)
    return config


def port_of(listening: IListeningPort) -> int:
    """The port a listener on port 0 was given."""
    address = listening.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


@defer.inlineCallbacks
def start_gateway(case: Any, config: Any) -> Any:
    """Start a gateway for the test; it and its events are cleaned up after. -> (gateway, port)"""
    events = io.StringIO()
    gateway = build_gateway(config, event_stream=events)
    # The tests' handle on what the gateway logged; Gateway itself keeps only the stream's writer.
    gateway.events_text = events  # type: ignore[attr-defined]
    gateway.startService()
    case.addCleanup(gateway.stopService)
    ports = yield gateway.listening
    return gateway, (ports[0] if ports else None)


class OnAClock:
    """A gateway built and started on a MemoryReactorClock: nothing listens, time moves only
    with `clock.advance`, and `connect()` hands a tcp server's listener a connection over a
    StringTransport (what the gateway writes is `transport.value()`)."""

    def __init__(self, config: Any, watch_interval: float | None = None, **kwargs: Any):
        self.clock = MemoryReactorClock()
        self.events = io.StringIO()
        self.gateway = build_gateway(config, reactor=self.clock, event_stream=self.events, **kwargs)
        self.gateway.watch_interval = watch_interval
        self.gateway.startService()
        self.clock.run()  # MemoryReactor: runs the callWhenRunning hooks, then counts as stopped

    def connect(self, listener: int = 0, client_port: int = 40000) -> tuple[Any, StringTransport]:
        factory = self.clock.tcpServers[listener][1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", client_port))
        assert protocol is not None, "the listener refused the connection"
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", client_port))
        protocol.makeConnection(transport)
        return protocol, transport


def wait(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def eventually(predicate: Any, timeout: float = 5.0) -> Any:
    """Poll until predicate() is true; fail with AssertionError at the timeout."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        yield wait(0.01)
    raise AssertionError(f"condition not met within {timeout} s")


class RecordingClient(WebSocketClientProtocol):
    """Records messages as (is_binary, [frame payloads]) and how the connection closed."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: defer.DeferredQueue = defer.DeferredQueue()
        self.opened: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self._frames: list[bytes] = []
        self.received = 0

    def onOpen(self) -> None:
        self.opened.callback(self)

    def onMessageBegin(self, isBinary: bool) -> None:
        super().onMessageBegin(isBinary)
        self._frames = []

    def onMessageFrameEnd(self) -> None:
        self._frames.append(b"".join(self.frame_data))
        super().onMessageFrameEnd()

    def onMessageEnd(self) -> None:
        self.received += 1
        self.messages.put((self.message_is_binary, self._frames))
        self.message_data = None  # type: ignore[assignment]  # as Autobahn's own onMessageEnd: frames released

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        self.closed.callback((wasClean, code, reason))

    def send_frames(self, opcode: int, payloads: list[bytes]) -> None:
        """One message sent as exactly these frames."""
        for index, payload in enumerate(payloads):
            self.sendFrame(opcode if index == 0 else 0, payload, fin=index == len(payloads) - 1)


def connect_ws(port: int, path: str = "/", protocols: list[str] | None = None, compress: bool = False,
               max_message: int = 0, headers: dict[str, str] | None = None) -> defer.Deferred:
    """An open RecordingClient (sending `headers` with its handshake), or a failure if the
    handshake is refused."""
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}", protocols=protocols or [], headers=headers or {})
    factory.protocol = RecordingClient
    factory._batched_timer = ReactorTimer()
    options: dict[str, Any] = {"maxMessagePayloadSize": max_message, "autoFragmentSize": 0}
    if compress:
        options["perMessageCompressionOffers"] = [PerMessageDeflateOffer()]
        options["perMessageCompressionAccept"] = (
            lambda response: PerMessageDeflateResponseAccept(response)
            if isinstance(response, PerMessageDeflateResponse) else None)
    factory.setProtocolOptions(**options)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    d = endpoint.connect(factory)
    return d.addCallback(when_opened)


def when_opened(client: Any) -> defer.Deferred:
    """For endpoint.connect(...).addCallback: the RecordingClient, once its handshake is done."""
    return client.opened


@defer.inlineCallbacks
def close_ws(client: RecordingClient, code: int = 1000) -> Any:
    if client.state == client.STATE_OPEN:
        client.sendClose(code)
    result = yield client.closed
    return result


class RawClient(Protocol):
    """Bytes in, bytes out: for handshakes and frames outside the happy path."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()
        self.reason: Any = None  # why the connection ended: ConnectionDone (a FIN) or ConnectionLost
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for item in list(self._waiting):
            if len(self.data) >= item[0]:
                self._waiting.remove(item)
                item[1].callback(self.data)

    def until(self, count: int) -> defer.Deferred:
        """Fires once `count` bytes have arrived in all."""
        if len(self.data) >= count:
            return defer.succeed(self.data)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((count, d))
        return d

    def connectionLost(self, reason: Any = None) -> None:
        for _, d in self._waiting:
            d.errback(ConnectionError(f"closed after {len(self.data)} bytes"))
        self._waiting = []
        self.reason = reason
        self.done.callback(self.data)


def connect_raw(port: int) -> defer.Deferred:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())


@defer.inlineCallbacks
def raw_exchange(port: int, request: bytes) -> Any:
    """Send bytes, return everything the server sent until it closed."""
    client = yield connect_raw(port)
    client.transport.write(request)
    data = yield client.done
    return data


def upgrade_request(path: str = "/", headers: dict[str, str] | None = None, version: str = "HTTP/1.1",
                    method: str = "GET") -> bytes:
    base = {"Host": "localhost", "Upgrade": "websocket", "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    for name, value in (headers or {}).items():
        if value is None:
            base.pop(name, None)
        else:
            base[name] = value
    lines = [f"{method} {path} {version}"] + [f"{k}: {v}" for k, v in base.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True, mask: bytes = b"\x01\x02\x03\x04",
                 rsv: int = 0) -> bytes:
    """A masked client frame, built by hand (any opcode, RSV bits, mask key)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def parse_server_frames(data: bytes) -> list[tuple[int, bool, bytes]]:
    """Unmasked server frames as (opcode, fin, payload); stops at an incomplete frame."""
    frames, i = [], 0
    while i + 2 <= len(data):
        b0, b1 = data[i], data[i + 1]
        length, j = b1 & 0x7F, i + 2
        if length == 126:
            length, j = struct.unpack("!H", data[j:j + 2])[0], j + 2
        elif length == 127:
            length, j = struct.unpack("!Q", data[j:j + 8])[0], j + 8
        if j + length > len(data):
            break
        frames.append((b0 & 0x0F, bool(b0 & 0x80), data[j:j + length]))
        i = j + length
    return frames


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """(status line, lower-cased headers, rest) of an HTTP response."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, rest


# ---------------------------------------------------------------------------- configurations

def echo_chain() -> dict[str, Any]:
    """tcp -> http -> ws -> echo, as in ws.echo.yaml."""
    return {
        "name": "test",
        "bindings": {
            "tcp0": {"type": "tcp", "kind": "server", "options": {"host": "0.0.0.0", "port": 7114},
                     "exit": "http0"},
            "http0": {"type": "http", "kind": "server",
                      "routes": [{"when": [{"headers": {"upgrade": "websocket"}}], "exit": "ws0"}]},
            "ws0": {"type": "ws", "kind": "server", "exit": "echo_server"},
            "echo_server": {"type": "echo", "kind": "server"},
        },
    }


def proxy_config(upstream_port: int, **client_options) -> dict:
    ws_client: dict[str, Any] = {"type": "ws", "kind": "client", "exit": "south_http_client"}
    if client_options:
        ws_client["options"] = client_options
    return chain(ws_routes=[{"exit": "south_ws_client"}], apps={
        "south_ws_client": ws_client,
        "south_http_client": {"type": "http", "kind": "client", "exit": "south_tcp_client"},
        "south_tcp_client": {"type": "tcp", "kind": "client",
                             "options": {"host": "127.0.0.1", "port": upstream_port}},
    })


def alias_bomb(levels: int = 9) -> str:
    """'Billion laughs': 9 ** levels strings from about 1 KB of YAML."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "name: bomb\n" + "\n".join(lines) + "\n"


def nine_megabytes() -> str:
    """A valid-looking configuration of 9 MB: ws.echo with 120,000 routes, then a comment to 9 MB."""
    routes = "".join(f"      - when:\n          - path: /p{i}\n        exit: north_echo_server\n"
                     for i in range(120_000))
    text = Path(CONF, "ws.echo.yaml").read_text()
    text = text.replace("    kind: server\n    exit: north_echo_server\n",
                        "    kind: server\n    routes:\n" + routes, 1)
    return text + "#" * max(0, 9_000_000 - len(text)) + "\n"


# ---------------------------------------------------------------------------- an upstream WebSocket server

class Upstream(WebSocketServerProtocol):
    """Echoes; `close:<code>` makes it close with that code, `drop` drops the TCP connection."""

    def onConnect(self, request):
        self.factory.requests.append(request)
        if request.path == "/deny":
            raise ConnectionDeny(404, "no such upstream path")
        return self.factory.select(request.protocols)

    def onOpen(self):
        self.factory.connections.append(self)

    def onMessage(self, payload, isBinary):
        self.factory.received += len(payload)
        if payload.startswith(b"close:"):
            self.sendCloseFrame(int(payload[6:]), b"upstream says bye")
        elif payload == b"drop":
            self.transport.abortConnection()
        elif self.factory.echo:
            self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.closes.append((code, reason))


def start_upstream(case, select=lambda offered: offered[0] if offered else None, echo=True, compress=False, on=0):
    factory = WebSocketServerFactory()
    factory.protocol = Upstream
    factory._batched_timer = ReactorTimer()
    factory.setProtocolOptions(echoCloseCodeReason=True, maxMessagePayloadSize=0, autoFragmentSize=0)
    if compress:
        factory.setProtocolOptions(perMessageCompressionAccept=lambda offers: next(
            (PerMessageDeflateOfferAccept(o) for o in offers if isinstance(o, PerMessageDeflateOffer)), None))
    factory.requests, factory.closes, factory.connections = [], [], []
    factory.select, factory.echo, factory.received = select, echo, 0
    port = reactor.listenTCP(on, factory, interface="127.0.0.1")  # on: the port, 0 for any
    case.addCleanup(port.stopListening)
    return factory, port.getHost().port


# ---------------------------------------------------------------------------- HTTP, raw clients

@defer.inlineCallbacks
def status_of(port: int, path: str = "/", headers: dict[str, str] | None = None) -> Any:
    """The status code (int) and headers a handshake gets, over a raw socket."""
    data = yield raw_exchange(port, upgrade_request(path, headers) + client_frame(0x8, b"\x03\xe8"))
    status, response_headers, _ = split_response(data)
    return int(status.split(" ")[1]), response_headers


@defer.inlineCallbacks
def http_get(port: int, path: str = "/metrics") -> Any:
    """(status code, body text) of a GET on loopback: /metrics by default."""
    response = yield Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    body = yield readBody(response)
    return response.code, body.decode()


def buffered(transport) -> int:
    """Bytes a Twisted TCP transport holds in user space, waiting for the socket."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@defer.inlineCallbacks
def raw_ws(port: int, protocols: str | None = None):
    """A raw client past its handshake; returns (client, offset of the first frame byte)."""
    client = yield connect_raw(port)
    headers = {"Sec-WebSocket-Protocol": protocols} if protocols else None
    client.transport.write(upgrade_request(headers=headers))
    yield client.until(4)
    while b"\r\n\r\n" not in client.data:
        yield client.until(len(client.data) + 1)
    status, _, rest = split_response(client.data)
    assert "101" in status, status
    return client, len(client.data) - len(rest)


@defer.inlineCallbacks
def assert_echoed_under_back_pressure(case: unittest.TestCase, gateway: Any, port: int,
                                      payloads: list[bytes]) -> Any:
    """A raw client that stops reading sends `payloads` (binary messages, more than the socket
    buffers hold) to an echo: the gateway stops reading from it, holding under 1 MiB, and the
    client's own sending is held back; once it reads again every echo comes, whole and in order."""
    client, start = yield raw_ws(port)
    client.transport.pauseProducing()  # the client stops reading its socket
    frames_out = [client_frame(0x2, p) for p in payloads]
    client.transport.writeSequence(frames_out)
    ws = gateway.binding("ws0")
    yield eventually(lambda: len(ws.connections) == 1)
    server = next(iter(ws.connections))
    # The gateway stops reading from a client it cannot write to, so what it holds stays
    # near one socket read plus Twisted's 64 KiB write threshold.
    yield eventually(lambda: server.transport not in reactor.getReaders(), timeout=10)
    case.assertLess(buffered(server.transport), 1024 * 1024)
    case.assertGreater(buffered(client.transport), 0, "the sender was not held back")
    # Nothing is lost once the client reads again (an echo's head is its frame's less the mask).
    client.transport.resumeProducing()
    yield client.until(start + sum(len(f) - 4 for f in frames_out))
    frames = parse_server_frames(client.data[start:])
    case.assertEqual(len(frames), len(payloads))
    case.assertEqual(hashlib.sha256(b"".join(f[2] for f in frames)).digest(),
                     hashlib.sha256(b"".join(payloads)).digest())
    client.transport.loseConnection()
    yield client.done


# ---------------------------------------------------------------------------- twistd in a child process







def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
















# ---------------------------------------------------------------- moved from test modules



















# from test_metrics
def value(gateway, name: str, binding: str):
    return gateway.metrics.registry.get_sample_value(name, {"namespace": "test", "binding": binding})


# from test_metrics
def metered(path: str = "/metrics", bindings: dict[str, list[str]] | None = None) -> dict:
    """chain() with echo behind `protocol: echo`, every metric declared, a prometheus
    exporter on port 0, and `telemetry.metrics` on the bindings given (default: all but tcp0)."""
    config = chain([{"when": [{"protocol": "echo"}], "exit": "echo"}])
    config["telemetry"] = {
        "metrics": STREAM + ["http.active.requests", "http.duration"],
        "exporters": {"stdout": {"type": "stdout"},
                      "prom": {"type": "prometheus", "options": {"endpoints": [
                          {"scheme": "http", "port": 0, "path": path}]}}},
    }
    if bindings is None:
        bindings = {"http0": ["stream.*", "http.*"], "ws0": ["stream.*"], "echo": ["stream.*"]}
    for name, globs in bindings.items():
        config["bindings"][name]["telemetry"] = {"metrics": globs}
    return config


# from test_metrics
STREAM = ["stream.active.received", "stream.active.sent", "stream.opens.received", "stream.opens.sent",
          "stream.data.received", "stream.data.sent", "stream.errors.received", "stream.errors.sent",
          "stream.closes.received", "stream.closes.sent"]


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str):
        self.name = name

    def cancel(self) -> None:
        """Answered at once: nothing to cancel."""


@implementer(IHostnameResolver)
class LocalResolver:
    """`name` is 127.0.0.1 (a compose service's name in Zilla's examples); any other name as before."""

    def __init__(self, real: Any, name: str):
        self.real = real
        self.name = name

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, addressTypes: Any = None,
                        transportSemantics: str = "TCP") -> Any:
        if hostName != self.name:
            return self.real.resolveHostName(receiver, hostName, portNumber, addressTypes, transportSemantics)
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        receiver.resolutionComplete()
        return resolution


def resolve_locally(case: Any, name: str) -> None:
    """Until the test ends, the global reactor (the one a gateway connects with) resolves
    `name` to 127.0.0.1: an example's config runs with its host names as written."""
    the_reactor: Any = reactor
    real_name, real_simple = the_reactor.nameResolver, the_reactor.resolver
    the_reactor.installNameResolver(LocalResolver(real_name, name))

    def restore() -> None:
        the_reactor.installNameResolver(real_name)
        the_reactor.resolver = real_simple
    case.addCleanup(restore)
