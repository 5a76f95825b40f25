"""SIGTERM and SIGINT for `twistd zillaws`: the first one stops the reactor, whose shutdown
runs Gateway.stopService (stop accepting, close every WebSocket with 1001, wait for them up
to the drain timeout) and the process exits 0; a second one ends the process at once, by
that signal.

twistd's own handlers stop the reactor too, but then re-raise the signal so the process
dies by it; an orchestrator that sent SIGTERM and waited for the drain should see exit 0.
The handlers are installed once the reactor runs (it installs its own at start), and only
by the twistd plugin: an application embedding the Gateway keeps its own signal handling.
"""

from __future__ import annotations

import os
import signal
from types import FrameType
from typing import Any

from twisted.logger import Logger

log = Logger()
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulExit:
    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.stopping = False

    def install(self) -> None:
        for number in SIGNALS:
            signal.signal(number, self.received)

    def received(self, number: int, frame: FrameType | None = None) -> None:
        name = signal.Signals(number).name
        if self.stopping:
            # The second signal: no more waiting, die by the signal as an unhandled one does.
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.stopping = True
        log.info("zillatw: {name} received: closing connections, then exiting; "
                 "send it again to exit at once", name=name)
        self.reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        if self.reactor.running:
            self.reactor.stop()


def install_when_running(reactor: Any) -> GracefulExit:
    """Replace the reactor's SIGTERM/SIGINT handlers once it has installed them."""
    graceful = GracefulExit(reactor)
    reactor.callWhenRunning(graceful.install)
    return graceful
