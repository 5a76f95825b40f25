"""The ws server's session event: one BINDING_WS_SESSION_ENDED per WebSocket, when it ends,
with the client's address, the route's exit, the subprotocol, the identity, how long it
lasted, messages and bytes each way, the close code and who closed.

It is a decoration of the ws server's observer (zillatw.telemetry.instrument.WsServerObserver), added
only when the namespace has an exporter of events (stdout, otlp logs): without one, the ws
server's streams are not touched. With one, each stream's two ends are wrapped once when it
opens (`_FromClient`, `_ToClient`): one call and two additions per message fragment, as
the metrics' own wrappers. Unlike those, they keep compressed messages passing between two
WebSockets as they are (`relay_behind`): a passed message's bytes are its compressed ones.

Who closed:
- `client`: its close frame came first, or its connection ended without one (1006; a
  client that stopped answering pings is one of these);
- `gateway`: the gateway closed it first: shutdown (1001), the session's expiry (1008), the
  client breaking the protocol (1002, 1007, 1009...), a fan evicting a member that fell behind;
- `upstream`: the route's exit ended the stream first (a proxied upstream's close, or an
  echo / fan end); the code is the one the client was sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from zillatw.stream import ABNORMAL, IEvictableEnd, IStreamEnd, IStreamExit, StreamInfo

CLIENT, GATEWAY, UPSTREAM = "client", "gateway", "upstream"


def client_address(protocol: Any) -> str:
    """The client's address as the session event shows it: the one the http server decided
    (zillatw.bindings.http.clientaddress: a PROXY header's or a trusted proxy's), with the
    peer's port when it is the peer itself."""
    decided = protocol.client_address
    transport = protocol.transport
    peer = transport.getPeer() if transport is not None else None
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if decided is not None and decided != host:
        return decided
    if host is None:
        return "-"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def request_fields(info: StreamInfo, shown_path: str) -> dict[str, Any]:
    """BINDING_WS_REQUEST_ACCEPTED's fields (the names of Zilla's http RequestAccepted event);
    the path as events show it, credentials redacted."""
    scheme = {"http": "ws", "https": "wss"}.get(info.scheme or "", info.scheme)
    return {"identity": info.identity, "scheme": scheme, "authority": info.authority, "path": shown_path,
            "protocol": info.protocol}


class Session:
    """One WebSocket's counts, from the opening of its stream to its first end."""

    __slots__ = ("trace_id", "protocol", "route", "info", "started", "messages_in", "bytes_in",
                 "messages_out", "bytes_out", "ended", "_observer")

    def __init__(self, observer: "SessionObserver", trace_id: int, protocol: Any, route: str, info: StreamInfo):
        self._observer = observer
        self.trace_id = trace_id
        self.protocol = protocol  # the ws server's connection: its transport, its close frames
        self.route = route
        self.info = info
        self.started = observer.seconds()
        self.messages_in = self.bytes_in = self.messages_out = self.bytes_out = 0
        self.ended = False

    def end(self, closer: str, code: int | None) -> None:
        if self.ended:
            return
        self.ended = True
        conn = self.protocol.conn
        if conn is None:  # the client left before the 101: the REJECTED or no event says so
            return
        if closer == CLIENT and conn.failure is not None:
            closer, code = GATEWAY, int(conn.failure[0])  # it broke the protocol; we closed
        elif closer == CLIENT and conn.close_received is None and conn.close_sent is not None:
            closer, code = GATEWAY, conn.close_sent[0]  # shutdown or expiry: our close went first
        elif closer != CLIENT and conn.close_sent is not None:
            code = conn.close_sent[0]  # what the client was sent (a code no frame carries becomes 1011)
        self._observer.ended(self, closer, ABNORMAL if code is None else code)


class _Counting:
    """A stream end with its session's counters beside it: flow control is the end's own,
    and so is anything else asked of it (its connection, its trace id...)."""

    __slots__ = ("_end", "_session", "pauseProducing", "resumeProducing", "stopProducing")

    def __init__(self, end: Any, session: Session):
        self._end, self._session = end, session
        self.pauseProducing, self.resumeProducing = end.pauseProducing, end.resumeProducing
        self.stopProducing = end.stopProducing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._end, name)


@implementer(IStreamEnd)
class _FromClient(_Counting):
    """The exit's end as the ws server sees it: what passes through came from the client."""

    __slots__ = ()

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        session = self._session
        session.bytes_in += len(payload)
        if fin:
            session.messages_in += 1
        self._end.stream_data(opcode, payload, fin)

    def stream_deflated(self, opcode: int, payload: bytes, fin: bool) -> None:
        """A compressed message passed as it is (zillatw.bindings.ws.relay): its compressed bytes counted."""
        session = self._session
        session.bytes_in += len(payload)
        if fin:
            session.messages_in += 1
        self._end.stream_deflated(opcode, payload, fin)

    def stream_end(self, code: int, reason: str) -> None:
        self._session.end(CLIENT, code)
        self._end.stream_end(code, reason)


@implementer(IEvictableEnd)
class _ToClient(_Counting):
    """The ws server's connection as the exit sees it: what passes through goes to the client."""

    __slots__ = ()

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        session = self._session
        session.bytes_out += len(payload)
        if fin:
            session.messages_out += 1
        self._end.stream_data(opcode, payload, fin)

    def stream_deflated(self, opcode: int, payload: bytes, fin: bool) -> None:
        session = self._session
        session.bytes_out += len(payload)
        if fin:
            session.messages_out += 1
        self._end.stream_deflated(opcode, payload, fin)

    def stream_end(self, code: int, reason: str) -> None:
        self._end.stream_end(code, reason)  # first: the code the client gets is then known
        self._session.end(UPSTREAM, code)

    def stream_evicted(self, code: int, reason: str, drain_timeout: float) -> None:
        """A fan evicting a member that fell behind: the gateway's decision."""
        self._end.stream_evicted(code, reason, drain_timeout)
        self._session.end(GATEWAY, code)


def relay_behind(end: Any) -> Any:
    """The end a session's wrapper stands for (the exit's own, e.g. a ws client's upstream
    WebSocket), so that two WebSockets whose deflate parameters fit still pass compressed
    messages as they are (zillatw.bindings.ws.binding): counting does not cost them that."""
    return end._end if type(end) is _FromClient else end


@implementer(IStreamExit)
class _SessionExit:
    """The route's exit, whose streams are counted as sessions; anything else is the exit's."""

    __slots__ = ("exit", "_open")

    def __init__(self, exit_: Any, open_: Callable[[StreamInfo, Any], Any]):
        self.exit = exit_
        self._open = open_

    def open(self, info: StreamInfo, peer: Any) -> Any:
        return self._open(info, peer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.exit, name)


class SessionObserver:
    """A ws server's observer (metrics, REQUEST events: `inner`) that also writes each
    session's end; the ws server calls it as it calls the inner one."""

    __slots__ = ("inner", "events", "seconds")

    def __init__(self, inner: Any, events: Any, seconds: Callable[[], float]):
        self.inner = inner
        self.events = events  # zillatw.telemetry.events.BindingEvents
        self.seconds = seconds  # the reactor's clock

    def rejected(self, trace_id: int, status: int, reason: str, identity: str | None = None) -> None:
        self.inner.rejected(trace_id, status, reason, identity)

    def accepted(self, trace_id: int, info: Any, shown_path: str) -> None:
        self.inner.accepted(trace_id, info, shown_path)

    def opening(self, trace_id: int, info: StreamInfo, shown_path: str, exit_: Any) -> Any:
        inner_exit = self.inner.opening(trace_id, info, shown_path, exit_)
        route = getattr(exit_, "name", None) or "-"

        def open_(info: StreamInfo, peer: Any) -> Any:
            session = Session(self, trace_id, peer, route, info)
            end = inner_exit.open(info, _ToClient(peer, session))
            if isinstance(end, Deferred):
                return end.addCallback(_FromClient, session)
            return _FromClient(end, session)
        return _SessionExit(inner_exit, open_)

    def ended(self, session: Session, closer: str, code: int) -> None:
        info = session.info
        offer = info.offer
        protocol = offer.chosen if offer is not None and offer.answered else info.protocol
        milliseconds = round((self.seconds() - session.started) * 1000)
        fields: Mapping[str, Any] = {
            "client": client_address(session.protocol), "route": session.route, "protocol": protocol,
            "identity": info.identity, "duration_ms": milliseconds,
            "messages_received": session.messages_in, "bytes_received": session.bytes_in,
            "messages_sent": session.messages_out, "bytes_sent": session.bytes_out,
            "code": code, "closed_by": closer,
        }
        details = (f"{info.identity or '-'} {fields['client']} {session.route} {protocol or '-'} {milliseconds}ms "
                   f"received {session.messages_in}/{session.bytes_in}B sent {session.messages_out}/"
                   f"{session.bytes_out}B {code} {closer}")
        self.events.session_ended(session.trace_id, details, fields)
