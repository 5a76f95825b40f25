"""A WebSocket connection after its opening handshake, relaying a stream: the socket on one
side (driven through zillatw.wire's sans-IO core), a stream peer (zillatw.stream) on the
other. Shared by the ws server and ws client bindings, which do the handshakes.

What the socket sends goes to the peer as it is read: fragments with their opcode and FIN
(frames up to GATHER bytes whole, bigger ones in pieces as they arrive, so a large message's
first bytes reach the far side before its last arrive), closes with their code. What the
peer sends goes out as one frame per fragment, head and payload written without a copy.
When both ends are WebSocket connections that agreed compatible permessage-deflate
parameters and nothing stands between them (no validation, no metering), compressed
messages pass as they are (`stream_deflated`), neither inflated nor compressed again.

Timers are the binding's reactor's, one or two per connection: the keepalive (ping every
`ping_interval`, drop when its pong is `ping_timeout` late) and the close handshake (abort
when the peer has not answered our close within `close_timeout`; an evicted fan member gets
the fan's drain timeout instead). Flow control is Twisted's push producers both ways: the
peer is our transport's producer, and we are the peer's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocol, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw.stream import ABNORMAL, CONTINUATION, NO_STATUS, IEvictableEnd, IStreamEnd
from zillatw.twistedcompat import write_sequence
from zillatw.wire import CloseCode, CloseReceived, Connection, Failed, Fragment, Ping, Pong, State, is_wire_code

GATHER = 64 * 1024  # frames up to this size are relayed whole (their boundaries kept)
CLIENT_CLOSE_WAIT = 1.0  # seconds a client gives the server to close TCP after the closing handshake

log = Logger()
_OPEN, _CLOSE_SENT, _CLOSED = State.OPEN, State.CLOSE_SENT, State.CLOSED


def no_delay(transport: Any) -> None:
    """TCP_NODELAY on the socket under `transport` (a TLS protocol passes the call down).
    A relay writes each message as it comes: with Nagle's algorithm, a small write waits for
    the ACK of the one before, which the peer delays (40 ms on Linux)."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:  # the socket is already gone: connectionLost follows
            pass


MAX_MESSAGE_SIZE = 1024 * 1024
CLOSE_TIMEOUT = 2.0  # seconds to wait for the peer's close frame before dropping
GOING_AWAY = 1001  # the close code of a shutting-down gateway (RFC 6455 §7.4.1)


def drop(protocols: list[Any]) -> None:
    """Abort each still-connected protocol's socket (a binding's drop_all at the drain's end)."""
    for protocol in protocols:
        if protocol.connected:
            protocol.transport.abortConnection()


class Deadlines:
    """One delay, many connections, one reactor call: a binding's keepalive. Each idle
    connection would otherwise hold a DelayedCall (about 500 bytes, with its dicts); here it
    is one entry of a shared dict. Entries are kept in the order they were added, which
    with a single delay is the order they fall due; `fire(connection)` is called for each."""

    __slots__ = ("reactor", "delay", "fire", "_due", "_call", "_running")

    def __init__(self, reactor: Any, delay: float, fire: Any) -> None:
        self.reactor = reactor
        self.delay = delay
        self.fire = fire
        self._due: dict[Any, float] = {}
        self._call: Any = None
        self._running = False

    def __contains__(self, item: Any) -> bool:
        return item in self._due

    def __len__(self) -> int:
        return len(self._due)

    def add(self, item: Any) -> None:
        """(Re)start `item`'s delay."""
        due = self._due
        due.pop(item, None)
        due[item] = self.reactor.seconds() + self.delay
        if self._call is None and not self._running:
            self._call = self.reactor.callLater(self.delay, self._run)

    def discard(self, item: Any, condition: bool = True) -> bool:
        """Forget `item` (if `condition`); True if it was waiting."""
        due = self._due
        if not condition or item not in due:
            return False
        del due[item]
        if not due and self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None
        return True

    def _run(self) -> None:
        self._call = None
        self._running = True
        due = self._due
        now = self.reactor.seconds() + 1e-9  # a delay's float rounding must not make it a turn late
        try:
            while due:
                item = next(iter(due))
                if due[item] > now:
                    break
                del due[item]
                self.fire(item)  # may add it again: at the end, due after `now`
        finally:
            self._running = False
        if due and self._call is None:
            self._call = self.reactor.callLater(max(0.0, due[next(iter(due))] - self.reactor.seconds()), self._run)


@implementer(IProtocol, IEvictableEnd)
class WsRelay:
    """The relay; subclasses do the handshake, then call `start(connection, peer)`.
    `binding` gives the settings: reactor, close_timeout, ping_interval, ping_timeout."""

    # slots: a gateway's connections are mostly idle, and each is one of these
    __slots__ = ("transport", "connected", "binding", "conn", "stream_peer", "pings_sent", "_close_call",
                 "_peer_paused")

    is_server = True  # closes TCP first after the closing handshake (RFC 6455 §7.1.1)

    def __init__(self, binding: Any) -> None:
        self.transport: Any = None
        self.connected = 0
        self.binding = binding
        self.conn: Connection | None = None  # once the handshake is done
        self.stream_peer: IStreamEnd | None = None
        self.pings_sent = 0
        self._close_call: Any = None  # the close timeout, an evicted member's drain timeout, a client's wait
        self._peer_paused = False    # the peer asked us to stop reading (its socket is full)

    # ---- IProtocol

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        """The handshake's, in subclasses."""

    def logPrefix(self) -> str:
        return type(self).__name__

    def before_open(self, data: bytes) -> None:
        """Bytes read before the handshake is done: the subclass's."""
        raise NotImplementedError

    def start(self, conn: Connection, peer: IStreamEnd | None) -> None:
        """The handshake is done: relay between the socket and `peer`."""
        self.conn = conn
        self.stream_peer = peer
        if peer is not None:
            self.transport.registerProducer(peer, True)
        pings = self.binding.pings
        if pings is not None:
            pings.add(self)

    def dataReceived(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            self.before_open(data)
            return
        conn.receive_data(data)
        for event in conn.events_received():
            if type(event) is Fragment:
                peer = self.stream_peer
                if peer is not None:
                    if event.compressed:  # only toward a WsRelay (wire.deflate.can_relay) or a mirror (can_mirror)
                        peer.stream_deflated(event.opcode, event.data, event.fin)  # type: ignore[attr-defined]
                    else:
                        peer.stream_data(event.opcode, event.data, event.fin)
            elif type(event) is Ping:  # answered here, in order: after what answers the frames before it
                if conn.may_send:
                    conn.send_pong(event.data)
                    write_sequence(self.transport, conn.data_to_send())
            elif type(event) is Pong:
                self._pong(event.data)
            elif type(event) is CloseReceived:
                self._close_received(event.code, event.reason)
            elif type(event) is Failed:
                self._failed(event.code, event.reason)
        self._flush()

    def _flush(self) -> None:
        conn = self.conn
        assert conn is not None  # flushed only once open
        out = conn.data_to_send()
        if out:
            write_sequence(self.transport, out)
        if conn.state is not _OPEN:
            self._closing(conn.state)

    def _closing(self, state: State) -> None:
        if state is _CLOSED:
            call = self._close_call
            if call is not None and (call.func == self._lose or call.func == self._linger_expired):
                return  # already on its way out
            self._cancel_ping()
            self._cancel_close_call()  # the close timeout, or an evicted member's drain timeout
            self._unregister()  # TLS would wait for its producer to go before closing
            reactor = self.binding.reactor
            if not self.is_server:
                self._close_call = reactor.callLater(CLIENT_CLOSE_WAIT, self._lose)
            elif self.conn is not None and self.conn.failure is not None:
                # Failed: our close frame, then FIN, while what the peer still sends is read
                # (and ignored): closing a socket with unread bytes would send a RST, which
                # can discard the close frame before the peer reads it.
                self._close_call = reactor.callLater(self.binding.close_timeout, self._linger_expired)
                self._shut_writing()
            else:
                self.transport.loseConnection()  # not an abort: our close frame is still to go
        elif state is _CLOSE_SENT and self._close_call is None:
            self._close_call = self.binding.reactor.callLater(self.binding.close_timeout, self._close_timed_out)

    def _lose(self) -> None:
        self._close_call = None
        self.transport.loseConnection()

    def _linger_expired(self) -> None:
        """A failed connection's peer did not close within the close timeout."""
        self._close_call = None
        self.transport.abortConnection()

    def _close_timed_out(self) -> None:
        self._close_call = None
        self.transport.abortConnection()

    def _close_received(self, code: int, reason: str) -> None:
        conn = self.conn
        assert conn is not None  # an event of the open connection
        peer, self.stream_peer = self.stream_peer, None
        if peer is not None:
            peer.stream_end(code, reason)
        if conn.state is State.CLOSE_RECEIVED:  # the peer closed first: echo its code (RFC 6455 §5.5.1)
            conn.send_close(code, reason)  # the core read it: NO_STATUS or a code a close frame may carry

    def _failed(self, code: int, reason: str) -> None:
        assert self.conn is not None  # an event of the open connection
        self.conn.complete_failure()
        peer, self.stream_peer = self.stream_peer, None
        if peer is not None:
            peer.stream_end(ABNORMAL, f"the other side broke the protocol ({code} {reason})")
        if self._peer_paused:
            self._peer_paused = False
            self.transport.resumeProducing()

    def _unregister(self) -> None:
        """The peer stops being our transport's producer (not every transport allows
        unregistering when none is registered; TCP's is `producer`, TLS's `_producer`)."""
        transport = self.transport
        if getattr(transport, "producer", None) is not None or getattr(transport, "_producer", None) is not None:
            transport.unregisterProducer()

    def _shut_writing(self) -> None:
        """FIN once what is queued is written; reading goes on. TLS has no half-close (a
        wrapper would pass it to the TCP below, under the TLS records): it closes."""
        transport = self.transport
        half_close = None if ISSLTransport.providedBy(transport) else getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:
            transport.loseConnection()

    # ---- keepalive: the binding's Deadlines, one reactor call for all its connections

    def _ping(self) -> None:
        conn = self.conn
        if conn is None or conn.state is not _OPEN:
            return
        self.pings_sent += 1
        conn.send_ping(self.pings_sent.to_bytes(4, "big"))
        write_sequence(self.transport, conn.data_to_send())
        binding = self.binding
        (binding.pongs if binding.pongs is not None else binding.pings).add(self)

    def _pong(self, data: bytes) -> None:
        pongs = self.binding.pongs
        if pongs is not None and pongs.discard(self, data == self.pings_sent.to_bytes(4, "big")):
            self.binding.pings.add(self)

    def _pong_missed(self) -> None:
        self.transport.abortConnection()  # no close handshake with a peer that does not answer

    def _cancel_ping(self) -> None:
        binding = self.binding
        if binding.pings is not None:
            binding.pings.discard(self)
            if binding.pongs is not None:
                binding.pongs.discard(self)

    def _cancel_close_call(self) -> None:
        call, self._close_call = self._close_call, None
        if call is not None and call.active():
            call.cancel()

    @property
    def was_clean(self) -> bool:
        """Both close frames were exchanged and nothing failed (the peer's view: not 1006)."""
        conn = self.conn
        return (conn is not None and conn.failure is None and conn.close_sent is not None
                and conn.close_received is not None)

    # ---- from the peer to the socket (IStreamEnd)

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        conn = self.conn
        if conn is not None and conn.may_send:
            write_sequence(self.transport, conn.encode_fragment(opcode, payload, fin))

    def stream_deflated(self, opcode: int, payload: bytes, fin: bool) -> None:
        """A fragment of a message compressed by a peer whose parameters fit ours
        (wire.deflate.can_relay): written as it is."""
        conn = self.conn
        if conn is not None and conn.may_send:
            write_sequence(self.transport, conn.encode_fragment(opcode, payload, fin, opcode != CONTINUATION))

    def stream_end(self, code: int, reason: str) -> None:
        self.stream_peer = None
        conn = self.conn
        if conn is None or not conn.may_send:
            return
        if self._peer_paused:  # the peer is gone: read our close's answer
            self._peer_paused = False
            self.transport.resumeProducing()
        if code == NO_STATUS:
            conn.send_close(NO_STATUS)
        elif is_wire_code(code):
            conn.send_close(code, reason)
        else:
            conn.send_close(CloseCode.INTERNAL_ERROR, reason or "the stream's other side failed")
        self._flush()

    def stream_evicted(self, code: int, reason: str, drain_timeout: float) -> None:
        """Close with `code` behind what is already queued for a peer that fell behind, and
        give it `drain_timeout` seconds to read all of it. The close timeout would abort
        the socket, and an abort (RST) discards what the kernel still holds for the peer,
        the close frame among it; instead the write side is shut (FIN after the close
        frame) while we keep reading its close reply, and only the drain bound aborts."""
        conn = self.conn
        if conn is None or conn.state is not _OPEN:
            return
        self.stream_peer = None
        transport = self.transport
        self._unregister()  # a paused producer would hold the FIN back
        conn.send_close(code, reason)
        write_sequence(transport, conn.data_to_send())
        self._cancel_ping()
        self._cancel_close_call()
        self._close_call = self.binding.reactor.callLater(drain_timeout, self._drain_expired)
        self._peer_paused = False
        transport.resumeProducing()  # bytes left unread when the socket closes would turn its FIN into a RST
        self._shut_writing()

    def _drain_expired(self) -> None:
        self._close_call = None
        self.transport.abortConnection()

    # ---- flow control: the peer is our producer's consumer (IPushProducer)

    def pauseProducing(self) -> None:
        if self.transport is not None and self.connected:
            self._peer_paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None and self.connected:
            self._peer_paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The peer is gone; its stream_end carries the close."""

    # ---- the end

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = 0
        conn = self.conn
        if conn is not None:
            conn.receive_eof()
        self._cancel_ping()
        self._cancel_close_call()
        peer, self.stream_peer = self.stream_peer, None
        if peer is not None:
            peer.stream_end(ABNORMAL, "the connection ended without a close frame")
