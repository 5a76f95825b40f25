"""The metering itself: one binding's counters (BindingMetrics) and the decorations that keep
them, handed out by zillatw.telemetry.metrics.Metrics when the graph wires a recording binding:
a stream exit wrapped (MeteredExit), a factory of connections wrapped (MeteredFactory, whose
protocols count bytes through a CountedTransport), a ws server's observer (WsServerObserver).
The data path adds one call and one addition per read, write or message fragment."""

from __future__ import annotations

from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from zillatw.stream import ABNORMAL, IEvictableEnd, IHttpRequestExit, IStreamEnd, IStreamExit, StreamRefused
from zillatw.telemetry.events import BindingEvents
from zillatw.telemetry.sessions import request_fields
from zillatw.twistedcompat import PASS_THROUGH, CountedTransport

# ---------------------------------------------------------------------------- counters

class BindingMetrics:
    """One binding's stream counters. Plain integers: the data path only adds to them. (An
    http server's per-request metrics are zillatw.telemetry.httpexchanges'.)"""

    __slots__ = ("namespace", "binding", "names", "opens_received", "opens_sent", "data_received", "data_sent",
                 "errors_received", "errors_sent", "closes_received", "closes_sent", "active")

    def __init__(self, namespace: str, binding: str, names: tuple[str, ...]):
        self.namespace = namespace
        self.binding = binding
        self.names = names
        self.opens_received = self.opens_sent = self.data_received = self.data_sent = 0
        self.errors_received = self.errors_sent = self.closes_received = self.closes_sent = 0
        self.active = 0

    def value(self, metric: str) -> int:
        if metric in ("stream.active.received", "stream.active.sent"):
            return self.active
        return getattr(self, metric.partition(".")[2].replace(".", "_"))


# ---------------------------------------------------------------------------- streams (messages)

class _Stream:
    """One metered stream's state: which directions have ended."""
    __slots__ = ("m", "received_ended", "sent_ended")

    def __init__(self, m: BindingMetrics):
        self.m = m
        self.received_ended = self.sent_ended = False

    def end_received(self, code: int) -> None:
        """The caller's side ended: the stream is over for this binding."""
        if self.received_ended:
            return
        self.received_ended = True
        m = self.m
        m.active -= 1
        if code == ABNORMAL:
            m.errors_received += 1
        else:
            m.closes_received += 1
        if not self.sent_ended:  # the reply ends with it
            self.sent_ended = True
            m.closes_sent += 1

    def end_sent(self, code: int) -> None:
        """The exit's side ended (it closes, or fails with 1006/1011)."""
        if self.sent_ended:
            return
        self.sent_ended = True
        if code in (ABNORMAL, 1011):
            self.m.errors_sent += 1
        else:
            self.m.closes_sent += 1


class _Metered:
    """A stream end seen through one direction's counting (_ToExit, _ToPeer): its producer
    calls go straight to the end it wraps."""
    __slots__ = ("_end", "_m", "_stream", "pauseProducing", "resumeProducing", "stopProducing")

    def __init__(self, end: IStreamEnd, stream: _Stream):
        self._end, self._m, self._stream = end, stream.m, stream
        self.pauseProducing, self.resumeProducing = end.pauseProducing, end.resumeProducing
        self.stopProducing = end.stopProducing


@implementer(IStreamEnd)
class _ToExit(_Metered):
    """Wraps the exit's stream end: what the caller sends through it was received."""
    __slots__ = ()

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        self._m.data_received += len(payload)
        self._end.stream_data(opcode, payload, fin)

    def stream_end(self, code: int, reason: str) -> None:
        self._stream.end_received(code)
        self._end.stream_end(code, reason)


@implementer(IStreamEnd)
class _ToPeer(_Metered):
    """Wraps the caller's stream end as the exit sees it: what the exit sends was sent."""
    __slots__ = ()

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        self._m.data_sent += len(payload)
        self._end.stream_data(opcode, payload, fin)

    def stream_end(self, code: int, reason: str) -> None:
        self._stream.end_sent(code)
        self._end.stream_end(code, reason)


@implementer(IEvictableEnd)
class _ToEvictablePeer(_ToPeer):
    """_ToPeer for a peer that closes behind its queue when a fan evicts it (a ws connection)."""
    __slots__ = ()

    def stream_evicted(self, code: int, reason: str, drain_timeout: float) -> None:
        self._stream.end_sent(code)
        self._end.stream_evicted(code, reason, drain_timeout)  # type: ignore[attr-defined]


def metered_open(open_: Any, m: BindingMetrics | None, count_received: bool = True,
                 on_open: Any = None, on_refused: Any = None) -> Any:
    """An exit's `open(info, peer)` that meters the stream for `m`'s binding (opens, data,
    ends) and reports the outcome to on_open() / on_refused(StreamRefused)."""

    def opened(end: IStreamEnd, stream: _Stream | None) -> IStreamEnd:
        if on_open is not None:
            on_open()
        if stream is None:
            return end
        stream.m.opens_sent += 1
        stream.m.active += 1
        return _ToExit(end, stream)

    def refused(refusal: StreamRefused) -> None:
        if m is not None:
            m.errors_sent += 1
        if on_refused is not None:
            on_refused(refusal)

    def open(info: Any, peer: IStreamEnd) -> Any:
        stream = None
        if m is not None:
            if count_received:
                m.opens_received += 1
            stream = _Stream(m)
            peer = (_ToEvictablePeer if IEvictableEnd.providedBy(peer) else _ToPeer)(peer, stream)
        try:
            end = open_(info, peer)
        except StreamRefused as e:
            refused(e)
            raise
        if isinstance(end, Deferred):
            def failed(failure: Failure) -> Failure:
                if failure.check(StreamRefused):
                    refused(failure.value)
                return failure
            return end.addCallbacks(opened, failed, callbackArgs=(stream,))
        return opened(end, stream)

    return open


@implementer(IStreamExit)
class MeteredExit:
    """A stream exit (echo, fan, ws client) as its callers see it when it records metrics:
    every stream opened through it is metered for its binding. Anything else asked of it
    (its name, its connections) is the exit's own."""

    __slots__ = ("exit", "open")

    def __init__(self, exit_: Any, open_: Any):
        self.exit = exit_
        self.open = open_

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exit, name)


@implementer(IHttpRequestExit)
class MeteredRequestExit(MeteredExit):
    """A metered stream exit that also answers plain HTTP requests (echo): those pass to
    it unmetered (open_request is the exit's own, by __getattr__)."""

    __slots__ = ()


def _ws_details(info: Any, shown_path: str) -> str:
    scheme = {"http": "ws", "https": "wss"}.get(info.scheme, info.scheme)
    return f"{info.identity or '-'} GET {scheme}://{info.authority or ''}{shown_path} {info.protocol or '-'}"


class WsServerObserver:
    """What a ws server tells its metrics and events (BINDING_WS_REQUEST_ACCEPTED/REJECTED)
    about each upgrade request: a stream is received with the request and sent (opened)
    when the exit its routes chose accepts it. The ws server calls:

    - rejected(trace_id, status, reason, identity=None) when it refuses the upgrade itself;
    - opening(trace_id, info, shown_path, exit_) with the exit it chose, and opens the stream
      through the exit this returns, which reports accepted(trace_id, info, shown_path) or
      the exit's refusal.
    """

    __slots__ = ("m", "events")

    def __init__(self, m: BindingMetrics | None, events: BindingEvents | None):
        self.m = m
        self.events = events

    def rejected(self, trace_id: int, status: int, reason: str, identity: str | None = None) -> None:
        if self.m is not None:
            self.m.opens_received += 1
            self.m.errors_sent += 1
        if self.events is not None:
            self.events.rejected(trace_id, status, reason, identity)

    def accepted(self, trace_id: int, info: Any, shown_path: str) -> None:
        if self.events is not None:
            self.events.accepted(trace_id, _ws_details(info, shown_path), request_fields(info, shown_path))

    def opening(self, trace_id: int, info: Any, shown_path: str, exit_: Any) -> Any:
        if self.m is not None:
            self.m.opens_received += 1
        events = self.events

        def refused(refusal: StreamRefused) -> None:
            if events is not None:
                events.rejected(trace_id, refusal.status, refusal.logged, info.identity)
        return MeteredExit(exit_, metered_open(exit_.open, self.m, False,
                                               lambda: self.accepted(trace_id, info, shown_path), refused))


# ---------------------------------------------------------------------------- connections (bytes)

class _MeteredConnection:
    """A server connection (tcp, tls, http) counted as one stream of bytes. It stands in for
    the binding's protocol toward the transport (reads are counted on the way in) and hands
    that protocol a CountedTransport (zillatw.twistedcompat), which counts what is written:
    nothing is patched, and a counted socket is still written through."""

    def __init__(self, m: BindingMetrics, wrapped: Any):
        self.wrappedProtocol = wrapped
        self.m = m
        directlyProvides(self, providedBy(wrapped))  # half-close, TLS handshake listeners

    def makeConnection(self, transport: Any) -> None:
        m = self.m
        m.opens_received += 1
        m.opens_sent += 1
        m.active += 1
        self.transport = transport
        self.wrappedProtocol.makeConnection(CountedTransport(transport, self._sent))

    def _sent(self, size: int) -> None:
        self.m.data_sent += size

    def dataReceived(self, data: bytes) -> None:
        self.m.data_received += len(data)
        self.wrappedProtocol.dataReceived(data)

    def spliced(self, size: int) -> None:
        """`size` bytes read for the wrapped protocol went by it (zillatw.twistedcompat.Splice)."""
        self.m.data_received += size

    def connectionLost(self, reason: Failure | None = None) -> None:
        m = self.m
        m.active -= 1
        if reason is None or reason.check(error.ConnectionDone):
            m.closes_received += 1
        else:
            m.errors_received += 1
        m.closes_sent += 1
        self.wrappedProtocol.connectionLost(reason)

    def __getattr__(self, name: str) -> Any:  # logPrefix, readConnectionLost, handshakeCompleted...
        return getattr(self.wrappedProtocol, name)


PASS_THROUGH[_MeteredConnection] = lambda wrapper: (wrapper.wrappedProtocol, wrapper.spliced)


@implementer(IProtocolFactory)
class MeteredFactory:
    """A factory of server connections (an http or tls server as the exit of a tcp or tls
    server; or, for a tcp server, each exit it hands connections to) whose protocols are
    metered as streams of one binding. Everything else is the factory's own."""

    def __init__(self, factory: Any, m: BindingMetrics):
        self.wrappedFactory = factory
        self.m = m

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.wrappedFactory.buildProtocol(addr)
        return None if protocol is None else _MeteredConnection(self.m, protocol)

    def __getattr__(self, name: str) -> Any:  # doStart, doStop, logPrefix, the binding's own
        return getattr(self.wrappedFactory, name)


