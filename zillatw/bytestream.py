"""Byte streams between bindings (issue 15): a tcp or tls server hands a whole connection
to an exit that provides `zillatw.stream.IBytesExit` (echo, fan), as Zilla's tcp.echo,
tcp.reflect, tls.echo and tls.reflect examples do.

- `BytesConnection` is the protocol a server builds for such an exit: the connection's
  bytes go to the exit's IBytesEnd chunk by chunk as they are read, what the exit sends is
  written to the socket. Flow control is Twisted's producer API both ways: the exit pauses
  the socket's reading through `pauseProducing`; a full socket buffer pauses the exit's end.
  Nothing here buffers but the transport (whose growth the producer API stops).
- `ByteStreams` is what an exit holds its byte connections in, so the gateway can close
  them on stop and drop them at the drain timeout (IDrainsGracefully).
- `MeteredBytesExit`: an IBytesExit whose streams are counted for a binding's metrics.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer

from zillatw.stream import IBytesEnd, IBytesExit, IStreamExit, StreamInfo, StreamRefused

# What may be read while an exit's stream is still opening (a fan waiting for its group's
# exit): the socket is paused at once, so this only holds what one read brought.
MAX_EARLY = 256 * 1024


@implementer(IPushProducer)
class _WriteFlow:
    """Registered on the transport: a full socket buffer pauses what the exit sends."""

    __slots__ = ("connection",)

    def __init__(self, connection: "BytesConnection"):
        self.connection = connection

    def pauseProducing(self) -> None:
        end = self.connection.end
        if end is not None:
            end.pauseProducing()

    def resumeProducing(self) -> None:
        end = self.connection.end
        if end is not None:
            end.resumeProducing()

    def stopProducing(self) -> None:
        """The transport is going away: connectionLost tells the exit."""


@implementer(IBytesEnd, IHalfCloseableProtocol)
class BytesConnection(Protocol):
    """A server connection handed whole to an IBytesExit."""

    log = Logger()
    transport: Any  # a socket's or TLS's: producer, abortConnection

    def __init__(self, exit_: Any, info: StreamInfo):
        self.exit = exit_
        self.info = info
        self.end: IBytesEnd | None = None
        self.lost = False
        self.closing = False
        self._early: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.transport.registerProducer(_WriteFlow(self), True)
        try:
            opened = self.exit.open_bytes(self.info, self)
        except StreamRefused as refusal:
            self.log.info("zillatw: connection refused by its exit: {reason}", reason=refusal.logged)
            self.transport.loseConnection()
            return
        if isinstance(opened, Deferred):  # the exit has to wait (a fan's group opening its own exit)
            self._early = []
            self.transport.pauseProducing()
            opened.addCallbacks(self._opened, self._refused)
        else:
            self.end = opened

    def _opened(self, end: IBytesEnd) -> None:
        early, self._early = self._early or [], None
        if self.lost:
            end.bytes_end("connection lost while its stream opened")
            return
        self.end = end
        self.transport.resumeProducing()
        for chunk in early:
            if self.end is not None:
                self.end.bytes_data(chunk)

    def _refused(self, failure: Failure) -> None:
        self._early = None
        reason = failure.value.logged if failure.check(StreamRefused) else failure.getErrorMessage()
        self.log.info("zillatw: connection refused by its exit: {reason}", reason=reason)
        if not self.lost:
            self.transport.loseConnection()

    # ---- from the socket

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return  # the exit ended the stream: what the client still sends is not for anyone
        end = self.end
        if end is not None:
            end.bytes_data(data)
        elif self._early is not None:
            if sum(map(len, self._early)) + len(data) > MAX_EARLY:
                self.transport.abortConnection()
                return
            self._early.append(data)

    def readConnectionLost(self) -> None:
        """The client sent EOF (half-close, `nc -N`): the stream ends; what is still in our
        socket buffer is written before the connection closes."""
        self._ended("client closed its side")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Never asked for: we do not half-close our side."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = True
        self._ended(reason.getErrorMessage() if reason is not None else "connection closed")

    def _ended(self, reason: str) -> None:
        end, self.end = self.end, None
        if end is not None:
            end.bytes_end(reason)

    # ---- IBytesEnd: from the exit, toward the socket

    def bytes_data(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    def bytes_end(self, reason: str) -> None:
        """The exit is done: what it sent is flushed, then the connection closes; the exit
        is still told when it is gone (connectionLost), which is when it stops counting it."""
        self.closing = True
        if not self.lost:
            self.transport.loseConnection()

    def pauseProducing(self) -> None:
        if not self.lost:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.lost:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """Drop the connection now (the drain timeout, an evicted member's deadline)."""
        if not self.lost:
            self.transport.abortConnection()


def server_info(scheme: str, authority: str | None = None) -> StreamInfo:
    """What a tcp or tls server tells the exit of a byte stream."""
    return StreamInfo(scheme=scheme, authority=authority)


class ByteStreams:
    """The byte connections an exit serves (its peers), for the gateway's stop."""

    __slots__ = ("peers",)

    def __init__(self) -> None:
        self.peers: dict[IBytesEnd, None] = {}

    def add(self, peer: IBytesEnd) -> None:
        self.peers[peer] = None

    def remove(self, peer: IBytesEnd) -> None:
        self.peers.pop(peer, None)

    def open_count(self) -> int:
        return len(self.peers)

    def going_away(self) -> None:
        """Close each connection after what it has been sent (a byte stream has no close
        message to send)."""
        for peer in list(self.peers):
            peer.bytes_end("the gateway is stopping")

    def drop_all(self) -> None:
        peers, self.peers = self.peers, {}
        for peer in peers:
            peer.stopProducing()


@implementer(IBytesEnd)
class _Counted:
    """One end of a metered byte stream: counts what passes through `count`."""

    __slots__ = ("_end", "_count", "_ended", "pauseProducing", "resumeProducing", "stopProducing")

    def __init__(self, end: IBytesEnd, count: Any, ended: Any):
        self._end, self._count, self._ended = end, count, ended
        self.pauseProducing, self.resumeProducing = end.pauseProducing, end.resumeProducing
        self.stopProducing = end.stopProducing

    def bytes_data(self, data: bytes) -> None:
        self._count(len(data))
        self._end.bytes_data(data)

    def bytes_end(self, reason: str) -> None:
        self._ended()
        self._end.bytes_end(reason)


class MeteredBytesExit:
    """`exit_` (an IBytesExit, maybe also a metered IStreamExit) whose byte streams are
    counted for `m` (zillatw.telemetry.metrics.BindingMetrics): opens, data each way, closes, active.
    Anything else asked of it is the exit's own."""

    def __init__(self, exit_: Any, m: Any):
        self.exit = exit_
        self.m = m
        directlyProvides(self, IBytesExit, *([IStreamExit] if IStreamExit.providedBy(exit_) else []))

    def open_bytes(self, info: StreamInfo, peer: IBytesEnd) -> Any:
        m = self.m
        m.opens_received += 1
        over = [False]

        def ended() -> None:  # whichever side ends first ends the stream for this binding
            if not over[0]:
                over[0] = True
                m.active -= 1
                m.closes_received += 1
                m.closes_sent += 1

        def received(size: int) -> None:
            m.data_received += size

        def sent(size: int) -> None:
            m.data_sent += size

        end = self.exit.open_bytes(info, _Counted(peer, sent, ended))
        m.opens_sent += 1
        m.active += 1
        if isinstance(end, Deferred):
            return end.addCallback(lambda opened: _Counted(opened, received, ended))
        return _Counted(end, received, ended)

    def __getattr__(self, name: str) -> Any:  # open, name, the exit's own
        return getattr(self.exit, name)
