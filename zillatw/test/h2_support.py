"""Test support: an HTTP/2 client (the h2 library over a loopback socket) for the h2 tests,
and a WebSocket over one of its streams (RFC 8441; the frames are the `websockets`
library's sans-IO protocol's, independent of our wire core)."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Frame
from websockets.headers import build_extension, parse_extension
from websockets.protocol import OPEN, Side
from websockets.protocol import Protocol as WsProtocol
from websockets.typing import ExtensionName


class H2Client(Protocol):
    """An HTTP/2 client: `request()` opens a stream; `responses[id]` fills in as frames come.
    With `acking` False it never gives window back (a slow reader)."""

    transport: Any

    def __init__(self, acking: bool = True) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.acking = acking
        self.responses: dict[int, dict[str, Any]] = {}
        self.events: list[Any] = []
        self.lost = False
        self.unacked: list[tuple[int, int]] = []
        self.listeners: dict[int, Any] = {}  # stream id -> called with each DATA's bytes, None at END_STREAM

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        events = self.h2.receive_data(data)
        if any(isinstance(e, h2.events.ConnectionTerminated) and e.error_code == 0 for e in events):
            # h2 closes its state at any GOAWAY; RFC 9113 §6.8 lets the streams it names finish
            self.h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        for event in events:
            self.events.append(event)
            stream_id = getattr(event, "stream_id", None)
            response: dict[str, Any] = self.responses.setdefault(stream_id, {"body": b"", "ended": False}) \
                if stream_id else {}
            if isinstance(event, h2.events.ResponseReceived):
                response["headers"] = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                response["body"] += event.data
                if event.stream_id in self.listeners:
                    self.listeners[event.stream_id](event.data)
                if self.acking:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    self.unacked.append((event.flow_controlled_length, event.stream_id))
            elif isinstance(event, h2.events.StreamEnded):
                response["ended"] = True
                if event.stream_id in self.listeners:
                    self.listeners[event.stream_id](None)
            elif isinstance(event, h2.events.StreamReset):
                response["reset"] = event.error_code
        self.flush()

    def ack_all(self) -> None:
        self.acking = True
        for length, stream_id in self.unacked:
            self.h2.acknowledge_received_data(length, stream_id)
        self.unacked = []
        self.flush()

    def request(self, method: str = "GET", path: str = "/", body: bytes | None = None,
                headers: dict[str, str] | None = None, end: bool = True, scheme: str = "http",
                authority: str = "localhost") -> int:
        stream_id = self.h2.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", scheme), (":authority", authority), (":path", path),
                  *(headers or {}).items()]
        self.h2.send_headers(stream_id, fields, end_stream=end and body is None)
        if body is not None:
            self.send_body(stream_id, body, end)
        self.flush()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = True) -> bytes:
        """Send what the windows allow now; the rest is returned (sent by `more`)."""
        while body:
            size = min(len(body), self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if size <= 0:
                break
            self.h2.send_data(stream_id, body[:size])
            body = body[size:]
        if not body and end:
            self.h2.end_stream(stream_id)
        self.flush()
        return body

    def done(self, stream_id: int) -> bool:
        response = self.responses.get(stream_id, {})
        return bool(response.get("ended") or "reset" in response)

    def goaway(self) -> Any:
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True


def h2_options(versions: list[str] | None = None) -> dict[str, Any]:
    return {"versions": versions} if versions else {}


@defer.inlineCallbacks
def connect_h2c(case: unittest.TestCase, port: int, **kwargs: Any) -> Any:
    client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), H2Client(**kwargs))
    case.addCleanup(lambda: client.transport.abortConnection())
    return client


class H2WebSocket:
    """A WebSocket client on one extended CONNECT stream of an H2Client: `open()` sends the
    request; once answered 200, `frames` collects what the server sends (websockets'
    Frame objects, after its permessage-deflate if agreed) and send_* write to the stream."""

    def __init__(self, client: H2Client, path: str = "/", headers: dict[str, str] | None = None,
                 deflate: bool = False, authority: str = "localhost", scheme: str = "http") -> None:
        self.client = client
        self.ws = WsProtocol(Side.CLIENT, state=OPEN)
        self.frames: list[Frame] = []
        self.deflate = ClientPerMessageDeflateFactory() if deflate else None
        fields = {"sec-websocket-version": "13", **(headers or {})}
        if self.deflate is not None:
            fields["sec-websocket-extensions"] = build_extension([(ExtensionName("permessage-deflate"),
                                                                   self.deflate.get_request_params())])
        self.stream_id = client.h2.get_next_available_stream_id()
        client.h2.send_headers(self.stream_id, [(":method", "CONNECT"), (":protocol", "websocket"),
                                                (":scheme", scheme), (":authority", authority), (":path", path),
                                                *fields.items()])
        client.flush()
        client.listeners[self.stream_id] = self._received
        self.agreed = False
        self.ended = False  # our END_STREAM is sent

    @property
    def response(self) -> dict[str, Any]:
        return self.client.responses.get(self.stream_id, {})

    def answered(self) -> bool:
        return "headers" in self.response or "reset" in self.response

    @property
    def status(self) -> str:
        return self.response["headers"][":status"]

    def _received(self, data: bytes | None) -> None:
        if self.status != "200":
            return  # a refusal's text body
        if data is None:  # the server's END_STREAM: as TCP's FIN to the websockets protocol
            self.ws.receive_eof()
            self._send()
            return
        self._agree()
        self.ws.receive_data(data)
        self.frames.extend(event for event in self.ws.events_received() if isinstance(event, Frame))
        self._send()

    def _agree(self) -> None:
        """The extensions the 200 agreed to: from the first message either way."""
        if not self.agreed and "headers" in self.response:
            self.agreed = True
            offered = self.response["headers"].get("sec-websocket-extensions")
            if offered and self.deflate is not None:
                [(_, params)] = parse_extension(offered)
                self.ws.extensions = [self.deflate.process_response_params(params, [])]

    def _send(self) -> None:
        for chunk in self.ws.data_to_send():
            if self.ended or "reset" in self.response:
                return
            self.ended = not chunk  # b"": the websockets protocol would half-close TCP
            self.client.send_body(self.stream_id, chunk, end=self.ended)

    def send_text(self, text: str, fin: bool = True) -> None:
        self._agree()
        self.ws.send_text(text.encode(), fin)
        self._send()

    def send_binary(self, data: bytes, fin: bool = True) -> None:
        self._agree()
        self.ws.send_binary(data, fin)
        self._send()

    def send_continuation(self, data: bytes, fin: bool) -> None:
        self._agree()
        self.ws.send_continuation(data, fin)
        self._send()

    def send_ping(self, data: bytes) -> None:
        self.ws.send_ping(data)
        self._send()

    def send_close(self, code: int = 1000, reason: str = "") -> None:
        self.ws.send_close(code, reason)
        self._send()

    def data_frames(self) -> list[Frame]:
        """Text, binary and continuation frames received (control frames left out)."""
        return [f for f in self.frames if f.opcode.value in (0, 1, 2)]
