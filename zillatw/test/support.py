"""Test support: gateways on ephemeral loopback ports, an Autobahn client that records frames,
and a raw TCP client for handshakes and frames no well-behaved client would send."""

from __future__ import annotations

import copy
import io
import os
import struct
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport

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
               max_message: int = 0) -> defer.Deferred:
    """An open RecordingClient, or a failure if the handshake is refused."""
    factory = WebSocketClientFactory(f"ws://127.0.0.1:{port}{path}", protocols=protocols or [])
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
