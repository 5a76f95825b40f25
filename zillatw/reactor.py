"""Twisted's epoll reactor without its per-event log context.

For every socket event, EPollReactor.doPoll calls the handler through
`log.callWithLogger`, which asks the selectable for its logPrefix and pushes a copy of the
legacy log context (the "system" of `twisted.python.log` messages) around the call: ~6 % of
the gateway's CPU per relayed message in the proxy benchmark. This reactor calls the handler
directly. What changes: legacy `log.msg`/`log.err` lines emitted while handling a socket
event (Twisted's own "Unhandled Error" tracebacks among them) are prefixed with "-" instead
of the connection's logPrefix; the traceback and message are the same. `twisted.logger`
events (zillatw's, Autobahn's) never used that context.

`install()` installs it when no reactor is installed yet and epoll exists; `twistd -r ...`
and embedders keep the reactor they chose.
"""

from __future__ import annotations

import errno
import sys

from twisted.python import log

try:
    from twisted.internet import epollreactor
except ImportError:  # pragma: no cover - not Linux
    epollreactor = None


if epollreactor is not None:
    class EPollReactor(epollreactor.EPollReactor):
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


def install() -> bool:
    """Install zillatw's reactor if none is installed yet; True if it was."""
    if epollreactor is None or "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor
    installReactor(EPollReactor())
    return True
