"""Every place zillatw relies on what Twisted (or pyOpenSSL) does not promise: private
attributes and internal methods, touched for speed or for a TLS feature with no public API.
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
   `TLS` and calls `writeSomeData` (which zillatw.telemetry.metrics also wraps, to count bytes); a
   frame's head and payload go in one `sendmsg` on `tcp.Connection.socket` (the same object
   as `getHandle()`), unless writeSomeData is wrapped.

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

Nothing of Autobahn's is touched: the WebSocket protocol is zillatw.wire's own; Autobahn
is only used for its public UTF-8 validator.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from twisted.internet import tcp
from twisted.python import log

epollreactor: Any
try:
    from twisted.internet import epollreactor
except ImportError:  # pragma: no cover - not Linux
    epollreactor = None

_TCP = (tcp.Server, tcp.Client)


def _idle(transport: Any) -> bool:
    """A plain TCP transport with nothing buffered, open for writing."""
    return (type(transport) in _TCP and not transport.dataBuffer and not transport._tempDataBuffer
            and transport.connected and not transport.disconnecting and not transport._aborting
            and not transport._writeDisconnecting and not transport.TLS)


def write(transport: Any, data: bytes) -> None:
    """transport.write(data), sent at once when the socket is idle."""
    if _idle(transport):
        sent = transport.writeSomeData(data)  # an int, or an exception instance when the connection is lost
        if type(sent) is int and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)


def write_sequence(transport: Any, chunks: Sequence[bytes]) -> None:
    """transport.writeSequence(chunks) (a frame's head and payload: no concatenation),
    sent at once when the socket is idle: in one sendmsg (scatter-gather), or, when
    zillatw.telemetry.metrics counts what writeSomeData sends, chunk by chunk through it."""
    if len(chunks) == 1:
        write(transport, chunks[0])
        return
    if _idle(transport) and "writeSomeData" not in transport.__dict__:
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
        return
    if _idle(transport):
        for index, chunk in enumerate(chunks):
            sent = transport.writeSomeData(chunk)
            if type(sent) is not int or sent != len(chunk):
                rest = list(chunks[index + 1:])
                if type(sent) is int and sent > 0:
                    rest.insert(0, chunk[sent:])
                elif type(sent) is not int or not sent:
                    rest.insert(0, chunk)
                transport.writeSequence(rest)
                return
        return
    transport.writeSequence(chunks)


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
