"""Every place zillatw relies on what Twisted (or pyOpenSSL, or h2) does not promise: private
attributes and internal methods, touched for speed or for a TLS or HTTP/2 feature with no
public API.
Each touch is listed here, and test_twistedcompat fails loudly when a release changes one
(the names exist and behave as assumed). setup.cfg pins twisted below its next major.

1. Writing through to an idle TCP socket (`write`, `write_sequence`). Twisted's
   `transport.write` always buffers: it registers the socket for writability (epoll_ctl),
   sends on the next reactor turn, then unregisters (epoll_ctl again): two syscalls and a
   reactor turn per relayed message. When the transport's buffer is empty, sending at once
   through its own `writeSomeData` is what `doWrite` would do next turn anyway, and keeps
   the byte order; what is not sent goes to `transport.write`, so buffering, producer
   pausing and error handling stay Twisted's. Reads `tcp.Connection.dataBuffer`,
   `_tempDataBuffer`, `connected`, `disconnecting`, `_aborting`, `_writeDisconnecting`,
   `TLS` and calls `writeSomeData`; a frame's head and payload go in one `sendmsg` on
   `tcp.Connection.socket` (the same object as `getHandle()`). A `CountedTransport` (the
   metrics' byte count, a wrapper in the manner of ProtocolWrapper) is seen through: its
   count is taken and its transport written through.

2. The epoll reactor without its per-event log context (`EPollReactor`, installed by
   zillatw.runtime.reactor). EPollReactor.doPoll calls each handler through `log.callWithLogger`,
   which asks the selectable for its logPrefix and pushes a copy of the legacy log context
   around the call: ~6 % of the gateway's CPU per relayed message in the proxy benchmark.
   Ours calls `_doReadOrWrite` directly, from `_poller.poll` and `_selectables`. What
   changes: legacy `log.msg`/`log.err` lines emitted while handling a socket event are
   prefixed with "-" instead of the connection's logPrefix; `twisted.logger` events never
   used that context.

3. pyOpenSSL's cffi bindings (`OpenSSL._util.ffi` / `lib`), in zillatw.bindings.tls.context: the
   text OpenSSL has for a certificate verify error code, and a servername callback that
   can answer an unknown SNI name with the `unrecognized_name` alert (pyOpenSSL's own
   callback cannot send an alert). Should those move, refused names still fail the
   handshake (with a generic alert) and verify errors show their number.

4. h2's connection (`H2ServerConnectionCore`, used by zillatw.bindings.http.h2server): a
   request whose header block h2's validation refuses (RFC 9113 §8.1.1, malformed) is a
   stream error, as the RFC says, where h2 ends the whole connection. Overrides h2's private
   `H2Connection._receive_headers_frame` and tells h2's header validation from its other
   protocol errors by the module that raised it (`h2.utilities`). Should either change,
   test_twistedcompat fails; at run time a malformed block then ends the connection (h2's
   own answer), nothing worse. setup.cfg pins h2 below its next minor release.

Nothing of Autobahn's is touched: the WebSocket protocol is zillatw.wire's own; Autobahn
is only used for its public UTF-8 validator.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.exceptions
from h2.errors import ErrorCodes
from twisted.internet import tcp
from twisted.python import log
from zope.interface import directlyProvides, providedBy

epollreactor: Any
try:
    from twisted.internet import epollreactor
except ImportError:  # pragma: no cover - not Linux
    epollreactor = None

_TCP = (tcp.Server, tcp.Client)


class CountedTransport:
    """A transport whose writes are counted (the bytes a binding sends, for its metrics). It
    stands between a protocol and the real transport, which does everything else; it
    provides what the real one provides (ISSLTransport, ITCPTransport...). `write` and
    `write_sequence` below see through it, so a counted socket is still written through."""

    def __init__(self, transport: Any, count: Callable[[int], None]):
        self.transport = transport
        self.count = count
        directlyProvides(self, providedBy(transport))

    def write(self, data: bytes) -> None:
        self.count(len(data))
        self.transport.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.count(sum(map(len, data)))
        self.transport.writeSequence(data)

    def __getattr__(self, name: str) -> Any:  # loseConnection, getPeer, registerProducer, ...
        return getattr(self.transport, name)


def _idle(transport: Any) -> bool:
    """A plain TCP transport with nothing buffered, open for writing."""
    return (type(transport) in _TCP and not transport.dataBuffer and not transport._tempDataBuffer
            and transport.connected and not transport.disconnecting and not transport._aborting
            and not transport._writeDisconnecting and not transport.TLS)


def write(transport: Any, data: bytes) -> None:
    """transport.write(data), sent at once when the socket is idle."""
    while type(transport) is CountedTransport:  # counted by each metered binding it passes
        transport.count(len(data))
        transport = transport.transport
    if _idle(transport):
        sent = transport.writeSomeData(data)  # an int, or an exception instance when the connection is lost
        if type(sent) is int and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def write_sequence(transport: Any, chunks: Sequence[bytes]) -> None:
    """transport.writeSequence(chunks) (a frame's head and payload: no concatenation),
    sent at once in one sendmsg (scatter-gather) when the socket is idle."""
    if len(chunks) == 1:
        write(transport, chunks[0])
        return
    while type(transport) is CountedTransport:
        transport.count(sum(map(len, chunks)))
        transport = transport.transport
    if not _idle(transport):
        transport.writeSequence(chunks)
        return
    try:
        sent = transport.socket.sendmsg(chunks)
    except BlockingIOError:
        sent = 0
    except OSError:  # the connection is failing: Twisted's own write finds out and reports it
        transport.writeSequence(chunks)
        return
    for index, chunk in enumerate(chunks):
        if sent < len(chunk):
            transport.writeSequence([chunk[sent:], *chunks[index + 1:]] if sent else list(chunks[index:]))
            return
        sent -= len(chunk)


if epollreactor is not None:
    class EPollReactor(epollreactor.EPollReactor):
        """Twisted's epoll reactor, its handlers called without a log context (touch 2)."""

        def doPoll(self, timeout: float | None) -> None:
            try:
                events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
            except OSError as err:
                if err.errno == errno.EINTR:
                    return
                raise
            selectables = self._selectables
            handle = self._doReadOrWrite
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is not None:
                    try:  # free in Python >= 3.11 unless something raises
                        handle(selectable, fd, event)
                    except KeyboardInterrupt:
                        raise
                    except BaseException:  # as callWithLogger: the other events still run
                        log.err(None, f"handling an event of {selectable!r}")

        doIteration = doPoll
else:  # pragma: no cover - not Linux
    EPollReactor = None  # type: ignore[assignment,misc]


class H2ServerConnectionCore(h2.connection.H2Connection):
    """h2's connection, but a request whose header block h2 finds malformed (RFC 9113
    §8.1.1: an extended CONNECT without :path, a CONNECT with one, a pseudo-header it does
    not know...) costs its stream (RST_STREAM PROTOCOL_ERROR), as the RFC has it, not the
    whole connection, which h2 would end. Only h2's header validation is so taken: it runs
    once the block is decoded (the HPACK state stays right) and the stream exists."""

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        self.malformed: list[tuple[int, str]] = []  # streams reset so, and why: for the events

    def _receive_headers_frame(self, frame: Any) -> Any:
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as e:
            stream = self.streams.get(frame.stream_id)
            if not _raised_by_validation(e) or stream is None or stream.closed:
                raise
            self.malformed.append((frame.stream_id, str(e)))
            self.reset_stream(frame.stream_id, ErrorCodes.PROTOCOL_ERROR)
            return [], []


def _raised_by_validation(error: BaseException) -> bool:
    """Whether h2's header validation (h2.utilities) raised `error`."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") == "h2.utilities"
