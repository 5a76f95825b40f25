"""The stream by which one binding hands a WebSocket connection to the binding it exits to.

A stream has two ends, each an IStreamEnd held by the other side. Data flows as message
fragments with their opcode (TEXT or BINARY on a message's first fragment, CONTINUATION
after) and FIN, so message boundaries survive end to end. A close carries a code and reason.

Flow control is Twisted's push-producer contract, end to end: each end is the producer of
what it sends to its peer. When a binding cannot take more (its socket's buffer is full), it
calls `peer.pauseProducing()`; the peer stops sending until `resumeProducing()`. Nothing
buffers without bound, and no call returns a Deferred: one method call per fragment.

Opening: `exit.open(info, peer) -> IStreamEnd`, or a Deferred of one when the exit has to
wait (a proxy waiting for its upstream). Refusal is `raise StreamRefused(status, reason)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import Attribute, Interface

CONTINUATION, TEXT, BINARY = 0x0, 0x1, 0x2

# Close codes carried on stream_end that have no wire form of their own.
NO_STATUS = 1005      # the peer's close frame had no code
ABNORMAL = 1006       # the connection ended without a close frame


class SubprotocolOffer:
    """The subprotocols a client offered when its ws route fixed none of them (issue 15):
    an exit that can choose among them (a ws client: its upstream's choice) answers here,
    and the ws server answers the client with that."""

    __slots__ = ("offered", "chosen", "answered")

    def __init__(self, offered: tuple[str, ...]):
        self.offered = offered
        self.chosen: str | None = None
        self.answered = False

    def answer(self, protocol: str | None) -> None:
        self.chosen, self.answered = protocol, True


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What a ws server learned from the handshake; a ws client reuses it upstream.
    `protocol` is the one the route chose (the first offered when it fixes none);
    `offer`, when the route fixes none, lets the exit choose another of those offered;
    `compressing`, whether the client offered permessage-deflate."""
    protocol: str | None = None
    scheme: str | None = None
    authority: str | None = None
    path: str | None = None
    identity: str | None = None
    offer: SubprotocolOffer | None = None
    # Whether the client offered permessage-deflate (and its ws server would take it); None
    # when the stream did not come from a ws server. A proxy offers compression upstream
    # only to a client that compresses: relayed frames are then not re-encoded either way.
    compressing: bool | None = None


class StreamRefused(Exception):
    """An exit declines a stream; the HTTP status is what the client's handshake gets.
    `reason` is for the client (short, nothing internal); `detail`, if any, only for the
    event log (say, why the upstream could not be reached)."""

    def __init__(self, status: int = 404, reason: str = "Not Found", detail: str = ""):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.detail = detail

    @property
    def logged(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


class IStreamEnd(IPushProducer):
    """One end of a stream; calls on it carry data *to* the binding that owns it."""

    def stream_data(opcode: int, payload: bytes, fin: bool) -> None:
        """A message fragment: opcode is TEXT/BINARY on a first fragment, CONTINUATION after."""

    def stream_end(code: int, reason: str) -> None:
        """The other side closed with `code` (NO_STATUS, ABNORMAL, or a wire close code)."""


class IEvictableEnd(IStreamEnd):
    """A stream end that can close behind what it has queued (a ws connection): a fan
    evicting a slow member lets it read its backlog and the close first."""

    def stream_evicted(code: int, reason: str, drain_timeout: float) -> None:
        """Close with `code` after what is queued; abort if not drained in `drain_timeout` s."""


class IMirrorEnd(IStreamEnd):
    """A stream end that sends every fragment back to its own peer as it came, in order,
    and sends nothing else (echo). A ws server whose permessage-deflate parameters allow it
    (zillatw.wire.deflate.can_mirror) then sends compressed messages back as they came,
    after inflating and checking them, instead of compressing them again."""

    def stream_deflated(opcode: int, payload: bytes, fin: bool) -> None:
        """A fragment of a permessage-deflate message as the peer read it: back to the peer the same way."""


class IHttpUpstream(Interface):
    """An http client as a ws client's exit: the upgrade request's headers as the client's
    overrides make them, and the connection to the upstream."""

    def request_headers(headers: Mapping[str, str]) -> dict[str, str]:
        """The request's headers (`:scheme :authority :path` and the rest) with the overrides."""

    def connect(factory: Any, headers: dict[str, str], timeout: float) -> Any:
        """Connect `factory`'s protocol to where `headers` route: a Deferred of it."""


class IStreamExit(Interface):
    """A binding that accepts streams (echo, fan, ws client)."""

    def open(info: StreamInfo, peer: IStreamEnd) -> "IStreamEnd | Deferred[IStreamEnd]":
        """Accept a stream from `peer`; raise StreamRefused to decline it."""


class IHttpExit(Interface):
    """A binding that takes over an HTTP request's connection (the ws server)."""

    def accept_request(request: Any, headers: Any, transport: Any, trace_id: int = 0, authorization: Any = None,
                       client_address: str | None = None) -> Any:
        """The protocol (an IHttpConnection) that takes the connection; raise HttpError to
        refuse the request. `client_address` is the client's, as the http server decided it
        (zillatw.bindings.http.clientaddress: the peer's, or the one a trusted proxy stated)."""


class IHttpConnection(Interface):
    """The protocol an IHttpExit returns: it takes the connection after the request head."""

    def take_over(request: Any, rest: bytes) -> None:
        """Called once, after makeConnection: `request` is the head the http server parsed
        (the one to act on), `rest` the bytes that followed it."""

    def session_expired() -> None:
        """The session the request was authorized with has expired: end the connection as
        the protocol does (a WebSocket closes with 1008)."""


class IWebSocketTunnel(Interface):
    """The transport of a WebSocket carried on a stream of another protocol (HTTP/2's
    extended CONNECT, RFC 8441) rather than on the connection itself: it checked the request
    as its protocol defines it, and answers the handshake its own way (no HTTP/1.1 101)."""

    def accept_websocket(protocol: str | None, extensions: str | None) -> None:
        """The handshake succeeded: answer with the subprotocol and extensions chosen."""

    def refuse_websocket(status: int, reason: str) -> None:
        """The handshake is refused with `status`: answer it and end the stream."""


class IUpstreamConnector(Interface):
    """A client binding that opens byte connections upstream (tcp client, tls client); a
    binding that takes byte connections is a Twisted IProtocolFactory (http, tls server)."""

    host = Attribute("The one host it connects to as configured, or None (a pool, a tls client, "
                     "a tcp client routing by authority): the name a tls client in front sends and verifies")

    def connect(factory: Any, authority: str | None, timeout: float) -> Any:
        """Connect `factory`'s protocol upstream: a Deferred of it, failing with why not."""


# ---------------------------------------------------------------------------- byte streams

class IBytesEnd(IPushProducer):
    """One end of a byte stream (a tcp or tls connection handed on whole, issue 15); calls
    on it carry data *to* the binding that owns it. No message boundaries: each call is one
    chunk as it was read. Flow control as IStreamEnd's: push-producer, both ways."""

    def bytes_data(data: bytes) -> None:
        """A chunk of the stream."""

    def bytes_end(reason: str) -> None:
        """The other side is done. To the exit: the connection is gone (told once, also
        when the exit ended the stream first). To the connection: the exit ended the
        stream; it flushes what it holds and closes."""


class IBytesExit(Interface):
    """A binding that takes byte streams from a tcp or tls server (echo, fan). A binding
    may provide it besides IStreamExit: the methods differ so one object can be both."""

    def open_bytes(info: StreamInfo, peer: IBytesEnd) -> "IBytesEnd | Deferred[IBytesEnd]":
        """Accept a byte stream from `peer` (or a Deferred of its end, when the exit has to
        wait: the connection is not read meanwhile); raise StreamRefused to decline it (the
        connection is closed)."""
# ---------------------------------------------------------------------------- plain HTTP
@dataclass(slots=True)
class HttpHead:
    """A plain request's or response's head as it passes between bindings. `headers` are
    lower-cased names, hop-by-hop fields already removed (the body's framing is the
    receiver's to write); a request carries `:method :scheme :authority :path`, a response
    `:status`. `length` is the body's size when known (0: no body), None when it streams
    without one (chunked or until close)."""
    headers: dict[str, str]
    length: int | None = 0
class IHttpExchangeEnd(IPushProducer):
    """One end of a plain HTTP exchange; calls on it carry data *to* the binding that owns
    it. The http server's end takes the response (`exchange_head` once, then the body); the
    exit's end takes the request's body. Flow control is IStreamEnd's: the receiver calls
    `pauseProducing()` / `resumeProducing()` on the sender's end; one call per piece, no
    Deferred."""
    def exchange_head(head: HttpHead) -> None:
        """The response head (called on the server's end only, once, before any data)."""
    def exchange_data(data: bytes) -> None:
        """A piece of the body."""
    def exchange_end() -> None:
        """The body is complete."""
    def exchange_abort(status: int, reason: str, detail: str) -> None:
        """The other side failed (an upstream unreachable, a client gone). A server end that
        has not sent a response head answers `status` with `reason` (detail goes to the
        event); otherwise the exchange's connection is closed, never left half written."""
@dataclass(slots=True)
class SpliceSink:
    """Where the rest of a Content-Length body may go without passing through Python: a
    plain TCP transport with nothing buffered, and what counts the bytes written to it (a
    metered connection's count, a measured body's size)."""
    transport: Any
    counts: list[Callable[[int], None]]


class ISpliceSink(Interface):
    """An exchange end that writes a Content-Length body's pieces unchanged to a plain TCP
    socket, so the body can be moved there in the kernel (zillatw.twistedcompat.Splice).
    An end that re-frames, checks or holds the body does not provide it, nor does a
    wrapper that cannot pass it on."""
    def splice_sink() -> SpliceSink | None:
        """The socket the rest of the body would be written to, or None (not now). An end
        that answers one writes nothing more of this body (`exchange_data` is not called)
        until `exchange_end`, or an abort."""


def splice_sink_of(end: Any) -> SpliceSink | None:
    """`end`'s socket for the rest of a body (ISpliceSink), or None: it has none now, or it
    is an end that reads, re-frames or holds bodies (it does not provide ISpliceSink)."""
    return end.splice_sink() if ISpliceSink.providedBy(end) else None


class IHttpRequestExit(Interface):
    """A binding that answers plain (non-upgrade) HTTP requests: echo, an http client."""
    def open_request(head: HttpHead, peer: IHttpExchangeEnd, trace_id: int) -> IHttpExchangeEnd:
        """Take a request whose head is `head`; the returned end receives its body, `peer`
        receives the response. Raise StreamRefused to decline (its status is answered)."""
