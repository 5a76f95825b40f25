"""Relaying a WebSocket connection's messages to and from a stream peer, fragment by
fragment, on top of Autobahn's protocol; shared by the ws server and ws client bindings."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import ISSLTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from zillatw import writethrough
from zillatw.stream import ABNORMAL, BINARY, CONTINUATION, NO_STATUS, TEXT, IStreamEnd
from zillatw.wsframes import apply_mask, encode_frame, whole_message


class ReactorTimer:
    """Autobahn's timer interface on plain reactor calls. Autobahn batches its timers into
    shared buckets whose reactor calls outlive cancelled timers; ours end with them."""

    def __init__(self, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor

    def call_later(self, delay: float, func: Any, *args: Any, **kwargs: Any) -> Any:
        return self.reactor.callLater(delay, func, *args, **kwargs)


# Codes a close frame may carry (RFC 6455 §7.4); others are mapped before sending.
_SENDABLE = frozenset([1000, 1001, 1002, 1003, *range(1007, 1015)]) | frozenset(range(3000, 5000))

# What Autobahn keeps of the opening handshake for a connection's whole life, though nothing
# reads it once the connection is open (about 1.4 KiB on an idle connection).
_HANDSHAKE_STATE = ("http_headers", "http_request_data", "http_response_data", "http_status_line",
                    "http_request_params", "http_request_uri", "_wskey")


class _SendQueue(list):
    """Autobahn's queue of delayed writes (chopped or "sync" sends, which zillatw never asks
    for) with the deque methods Autobahn calls: an empty list is 56 bytes, a deque 760."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


_TIMERS = ("openHandshakeTimeoutCall", "closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall",
           "autoPingPendingCall", "autoPingTimeoutCall", "_drainCall")



@implementer(IStreamEnd)
class StreamRelay:
    """Mixed in before an Autobahn protocol class: its socket on one side, `peer` on the other."""

    stream_peer: IStreamEnd | None = None
    _opcode = TEXT
    _last = b""
    _peer_closing = False
    masked_in: bool   # frames from the socket are masked (a server's) or not (a client's)
    masked_out: bool

    # ---- the fast path: a frame that is a whole text or binary message, with no extension
    # and no message in progress, goes to the peer without Autobahn's per-frame machinery
    # (parsing, a cffi masker per frame, debug-log formatting: over half of a relayed
    # message's CPU, see bench/README.md). Everything else, and any frame Autobahn would
    # refuse (bad UTF-8, limits, encoding), is left to Autobahn, which parses it from the
    # same bytes: the fast path consumes nothing it does not relay.

    _held: bytearray | None = None  # a server's bytes before its 101 (WsServerProtocol.hold)

    def dataReceived(self, data: bytes) -> None:
        if self._held is not None:
            self.hold(data)  # type: ignore[attr-defined]
            return
        # Autobahn's dataReceived formats the arguments of a debug log line on every call.
        self._dataReceived(data)

    def processData(self) -> bool:
        if (self.current_frame is None and not self.inside_message and self.state == self.STATE_OPEN
                and self._perMessageCompress is None and self.stream_peer is not None
                # a pending auto-ping: Autobahn's data frames restart its timeout
                and self.autoPingTimeoutCall is None and not self.failedByMe):
            data = self.data
            limit = min(self.maxFramePayloadSize or 0xFFFF, self.maxMessagePayloadSize or 0xFFFF)
            frame = whole_message(data, self.masked_in, limit)
            if type(frame) is tuple:
                opcode, start, end = frame
                payload = data[start:end]
                if self.masked_in:
                    payload = apply_mask(payload, data[start - 4:start])
                if opcode == TEXT:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        return super().processData()  # fails the connection with 1007
                self.data = data[end:]
                self.stream_peer.stream_data(opcode, payload, True)
                return len(data) > end
            if frame is not None and data[0] == 0x82:
                return False  # a binary frame waits for its end; text goes to Autobahn (UTF-8 fails fast)
        return super().processData()

    # ---- from the socket to the peer: fragments as they complete. The last one waits for onMessageEnd,
    # which Autobahn calls only after its end-of-message UTF-8 and inflate checks.

    def onMessageBegin(self, isBinary: bool) -> None:
        self._opcode = BINARY if isBinary else TEXT
        self.message_data_total_length = 0  # Autobahn counts it against maxMessagePayloadSize

    def onMessageFrameEnd(self) -> None:
        if self.failedByMe:
            return
        parts = self.frame_data
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        self.frame_data = None
        if self.current_frame.fin:
            self._last = payload
        elif self.stream_peer is not None:
            self.stream_peer.stream_data(self._opcode, payload, False)
            self._opcode = CONTINUATION

    def onMessageEnd(self) -> None:
        if not self.failedByMe and self.stream_peer is not None:
            payload, self._last = self._last, b""
            self.stream_peer.stream_data(self._opcode, payload, True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        peer, self.stream_peer = self.stream_peer, None
        if peer is not None:
            if wasClean:
                peer.stream_end(NO_STATUS if code is None else code, reason or "")
            else:
                peer.stream_end(ABNORMAL, reason or "")

    def shed_handshake_state(self) -> None:
        """Called at open: idle connections are most of a gateway's, so let go of what only
        the opening handshake needed."""
        state = self.__dict__
        for name in _HANDSHAKE_STATE:
            if name in state:
                state[name] = None
        if not self.send_queue:
            self.send_queue = _SendQueue()

    # ---- closing. When the client's close frame arrives, Autobahn aborts the socket, which
    # would discard a close frame of ours still in the write buffer (say, our 1002 for its
    # invalid close code). The client is reading, so a graceful close is right then.

    def onCloseFrame(self, code: int | None, reasonRaw: bytes | None) -> bool | None:
        self._peer_closing = True
        try:
            return super().onCloseFrame(code, reasonRaw)
        finally:
            self._peer_closing = False

    def dropConnection(self, abort: bool = False) -> None:
        super().dropConnection(abort=abort and not self._peer_closing)

    def unregisterProducer(self) -> None:
        # Autobahn unregisters on every drop, registered or not; not every transport allows that.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        # Autobahn leaves some of its timers running after the socket is gone.
        for name in _TIMERS:
            call = getattr(self, name, None)
            if call is not None:
                setattr(self, name, None)
                if call.active():
                    call.cancel()

    # ---- from the peer to the socket (IStreamEnd)

    def stream_data(self, opcode: int, payload: bytes, fin: bool) -> None:
        if self.state != self.STATE_OPEN:
            return
        if self._perMessageCompress is None:  # one frame per fragment, exactly
            if self.send_queue:  # Autobahn's delayed writes: stay behind them
                self.sendFrame(opcode, payload, fin)
            else:
                writethrough.write(self.transport, encode_frame(opcode, payload, fin, self.masked_out))
        elif opcode != CONTINUATION and fin:
            self.sendMessage(payload, opcode == BINARY)
        else:
            # Compressed fragments: the message keeps its boundaries; deflate's trailing
            # flush adds one frame at the end.
            if opcode != CONTINUATION:
                self.beginMessage(isBinary=opcode == BINARY)
                self.sendMessageFrame(payload)
            elif payload:
                self.sendMessageFrame(payload)
            if fin:
                self.endMessage()

    def stream_end(self, code: int, reason: str) -> None:
        if self.state != self.STATE_OPEN:
            return
        if code == NO_STATUS:
            self.sendCloseFrame()
            return
        if code not in _SENDABLE:
            code, reason = 1011, reason or "the stream's other side failed"
        self.sendCloseFrame(code, reason.encode("utf-8")[:123])

    def stream_evicted(self, code: int, reason: str, drain_timeout: float) -> None:
        """Close with `code` behind what is already queued for a peer that fell behind, and
        give it `drain_timeout` seconds to read all of it. Autobahn's close timeout would
        abort the socket, and an abort (RST) discards what the kernel still holds for the
        peer, the close frame among it; instead the write side is shut (FIN after the close
        frame) while we keep reading its close reply, and only the drain bound aborts."""
        if self.state != self.STATE_OPEN:
            return
        self.stream_peer = None
        self.unregisterProducer()  # a paused producer would hold the FIN back
        self.stream_end(code, reason)
        for name in ("closeHandshakeTimeoutCall", "autoPingPendingCall", "autoPingTimeoutCall"):
            call = getattr(self, name, None)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        self._drainCall = self.factory._batched_timer.call_later(drain_timeout, self._drain_expired, drain_timeout)
        transport = self.transport
        transport.resumeProducing()  # bytes left unread when the socket closes would turn its FIN into a RST
        # TLS has no half-close (a wrapper would pass it to the TCP below, under the TLS records)
        half_close = None if ISSLTransport.providedBy(transport) else getattr(transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        else:
            transport.loseConnection()

    def _drain_expired(self, seconds: float) -> None:
        self._drainCall = None
        self.wasClean = False
        self.wasNotCleanReason = f"evicted peer did not read its close frame within {seconds:g} s"
        self.dropConnection(abort=True)

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The exit is gone; its stream_end carries the close."""


