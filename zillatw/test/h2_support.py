"""Test support: an HTTP/2 client (the h2 library over a loopback socket) for the h2 tests."""

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

    def connectionMade(self) -> None:
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.lost:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            self.events.append(event)
            stream_id = getattr(event, "stream_id", None)
            response: dict[str, Any] = self.responses.setdefault(stream_id, {"body": b"", "ended": False}) \
                if stream_id else {}
            if isinstance(event, h2.events.ResponseReceived):
                response["headers"] = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                response["body"] += event.data
                if self.acking:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                else:
                    self.unacked.append((event.flow_controlled_length, event.stream_id))
            elif isinstance(event, h2.events.StreamEnded):
                response["ended"] = True
            elif isinstance(event, h2.events.StreamReset):
                response["reset"] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated) and event.error_code == 0:
                # h2 closes its state at any GOAWAY; RFC 9113 §6.8 lets the streams it names finish
                self.h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
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
