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

5. Moving a body socket to socket in the kernel (`Splice`, splice(2) through a pipe), for
   the plain HTTP proxy's Content-Length bodies that nothing on the route reads. While it
   runs, the reactor's calls of the source's `doRead` and, when the sink's socket is full,
   of the sink's `doWrite` (IReadDescriptor's and IWriteDescriptor's methods, which the
   reactor looks up on the selectable at each event) go to the splice: it shadows them
   with attributes of the transport instance and deletes those when it ends, so Twisted's
   own methods take over again. It also calls FileDescriptor's `stopReading`,
   `startReading` and `startWriting`, reads `connected`, and sees through Twisted's
   endpoint wrapper (`endpoints._WrappingProtocol._wrappedProtocol`) to the protocol a
   client connection serves. A source that ends or fails is handed back to Twisted's
   `doRead`, which finds out why and closes it as it would have.

Nothing of Autobahn's is touched: the WebSocket protocol is zillatw.wire's own; Autobahn
is only used for its public UTF-8 validator.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.exceptions
from h2.errors import ErrorCodes
from twisted.internet import endpoints, tcp
from twisted.python import log
from zope.interface import directlyProvides, providedBy

from zillatw.stream import SpliceSink

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


# Whether `transport` is a plain TCP one, open, with no write waiting: a write now goes
# straight to its socket (zillatw.bindings.http.express takes a request only then).
nothing_buffered = _idle


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
    if len(chunks) == 2 and sent == len(chunks[0]) + len(chunks[1]):
        return  # the usual case (a head and its payload), without the loop
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


# ---------------------------------------------------------------------------- 5. splice(2)

SPLICE_MIN = 64 * 1024   # a body with fewer bytes left goes through Python: not worth a pipe
PIPE_SIZE = 1 << 20      # Linux's default pipe-max-size; a pipe of this holds one read's worth
MAX_IDLE_PIPES = 16      # empty pipes kept for the next splice
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_idle_pipes: list[tuple[int, int, int]] = []  # (read end, write end, capacity)
CAN_SPLICE = hasattr(os, "splice")

# Protocol wrappers a spliced connection's bytes may bypass: the wrapper's type -> (the
# protocol it wraps, what counts the bytes it was to be handed, or None). Registered by
# the module that defines the wrapper (zillatw.telemetry.instrument's metered connection).
PASS_THROUGH: dict[type, Callable[[Any], tuple[Any, Callable[[int], None] | None]]] = {
    endpoints._WrappingProtocol: lambda wrapper: (wrapper._wrappedProtocol, None),
}


def plain_tcp(transport: Any) -> Any | None:
    """The open plain TCP transport under a binding's transport (CountedTransports seen
    through), or None: TLS, a test's transport, one closing."""
    while type(transport) is CountedTransport:
        transport = transport.transport
    if type(transport) in _TCP and not transport.TLS and transport.connected and not transport.disconnecting:
        return transport
    return None


def idle_sink(transport: Any) -> SpliceSink | None:
    """The plain TCP transport under `transport` with what counts its writes, when it has
    nothing buffered (a splice may write to it); else None."""
    real = plain_tcp(transport)
    if real is None or not _idle(real):
        return None
    return SpliceSink(real, sent_counts(transport))


def sent_counts(transport: Any) -> list[Callable[[int], None]]:
    """What counts the bytes written to `transport` (its CountedTransports' counts)."""
    counts = []
    while type(transport) is CountedTransport:
        counts.append(transport.count)
        transport = transport.transport
    return counts


def received_counts(transport: Any, protocol: Any) -> list[Callable[[int], None]] | None:
    """What counts the bytes `transport` reads for `protocol` (the metered wrappers between
    them), or None when a wrapper in between is not known to pass bytes on unchanged."""
    counts: list[Callable[[int], None]] = []
    current = transport.protocol
    while current is not protocol:
        unwrap = PASS_THROUGH.get(type(current))
        if unwrap is None:
            return None
        wrapped, count = unwrap(current)
        if wrapped is current or wrapped is None:  # a wrapper not passing anything on yet
            return None
        current = wrapped
        if count is not None:
            counts.append(count)
    return counts


def _take_pipe() -> tuple[int, int, int]:
    if _idle_pipes:
        return _idle_pipes.pop()
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # over the user's pipe pages (pipe-user-pages-soft): the default size works too
        pass
    return read_end, write_end, fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)


def _give_back(pipe: tuple[int, int, int], empty: bool) -> None:
    if empty and len(_idle_pipes) < MAX_IDLE_PIPES:
        _idle_pipes.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


class SpliceOwner(Protocol):
    """The exchange whose body a Splice moves: told of its progress and its end."""

    def splice_moved(self, size: int) -> None:
        """`size` more bytes reached the sink."""

    def splice_blocked(self, blocked: bool) -> None:
        """The sink's socket is full (True): the source is not read until it drains (False)."""

    def splice_done(self, size: int) -> None:
        """All `size` bytes reached the sink; both connections are Twisted's again."""

    def splice_lost(self) -> None:
        """A connection failed (or the source ended early): the splice is over, the bytes in
        its pipe are dropped, and Twisted closes that connection as it would have."""


class Splice:
    """Moves the next `length` bytes that `source` (a plain TCP transport) reads to `sink`'s
    socket through a kernel pipe: splice(2) from the socket to the pipe, from the pipe to
    the other socket. The bytes never reach Python: no copy into or out of user space, and
    one reactor event per read. Bounded: the pipe holds at most its capacity, and the
    source is not read while the sink cannot take what the pipe holds. The sink must have
    nothing buffered when it starts, and nothing else writes to it until the owner is told
    it is done (or cancels it)."""

    def __init__(self, source: Any, sink: Any, length: int, owner: SpliceOwner,
                 read_counts: list[Callable[[int], None]], write_counts: list[Callable[[int], None]]):
        self.source, self.sink, self.owner = source, sink, owner
        self._read_counts, self._write_counts = read_counts, write_counts
        self._left = length      # still to read from the source
        self._in_pipe = 0        # read, not yet written
        self._moved = 0          # written to the sink
        self._source_stopped = False
        self._blocked = False
        self._pipe = _take_pipe()
        self._from, self._to = source.fileno(), sink.fileno()
        self.over = False
        source.doRead = self._readable  # touch 5: the reactor's read events of the source come here

    def _readable(self) -> Any:
        room = min(self._left, self._pipe[2] - self._in_pipe)
        if room <= 0:  # the pipe waits for the sink (someone resumed the source): not read till then
            self._source_stopped = True
            self.source.stopReading()
            return None
        try:
            size = os.splice(self._from, self._pipe[1], room, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return None
        except OSError:
            size = 0
        if size == 0:  # the source ended or failed before the body did: Twisted's read says which
            source = self.source
            self._end(empty=False)
            self.owner.splice_lost()
            return source.doRead()
        self._left -= size
        self._in_pipe += size
        for count in self._read_counts:
            count(size)
        self._flush()
        return None

    def _flush(self) -> None:
        """The pipe into the sink, as far as it takes it; then done, or waiting for it."""
        read_end = self._pipe[0]
        moved = 0
        try:
            while self._in_pipe:
                size = os.splice(read_end, self._to, self._in_pipe, flags=_SPLICE_FLAGS)
                if size <= 0:
                    break
                self._in_pipe -= size
                moved += size
        except BlockingIOError:
            pass
        except OSError:
            self._count_moved(moved)
            sink = self.sink
            self._end(empty=False)
            self.owner.splice_lost()
            sink.abortConnection()
            return
        self._count_moved(moved)
        if self._in_pipe:
            if not self._blocked:
                self._blocked = True
                if not self._source_stopped:  # nor read by Twisted: what follows the body waits
                    self._source_stopped = True
                    self.source.stopReading()
                self.sink.doWrite = self._flush  # touch 5: the sink's write events come here (None: no error)
                self.sink.startWriting()
                self.owner.splice_blocked(True)
            return
        if self._blocked:
            self._blocked = False
            del self.sink.doWrite  # Twisted's own doWrite stops the writing (nothing buffered)
            self.owner.splice_blocked(False)
            if self._left and self._source_stopped and self.source.connected:
                self._source_stopped = False
                self.source.startReading()
        if not self._left:
            self._end(empty=True)
            self.owner.splice_done(self._moved)

    def _count_moved(self, size: int) -> None:
        if size:
            self._moved += size
            for count in self._write_counts:
                count(size)
            self.owner.splice_moved(size)

    def cancel(self) -> None:
        """The owner's exchange ended: both connections are Twisted's again (what the pipe
        held is dropped)."""
        if not self.over:
            self._end(empty=self._in_pipe == 0)

    def _end(self, empty: bool) -> None:
        self.over = True
        self.source.__dict__.pop("doRead", None)
        if self._blocked:
            self._blocked = False
            self.sink.__dict__.pop("doWrite", None)  # Twisted's doWrite: stops writing once it finds nothing
        if self._source_stopped:
            self._source_stopped = False
            if self.source.connected:
                self.source.startReading()
        _give_back(self._pipe, empty)
