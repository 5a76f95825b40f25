"""Installing zillatw's reactor: Twisted's epoll reactor without its per-event log context
(zillatw.twistedcompat.EPollReactor, which documents what that changes).

`install()` installs it when no reactor is installed yet and epoll exists; `twistd -r ...`
and embedders keep the reactor they chose.
"""

from __future__ import annotations

import sys

from zillatw.twistedcompat import EPollReactor

__all__ = ["EPollReactor", "install"]


def install() -> bool:
    """Install zillatw's reactor if none is installed yet; True if it was."""
    if EPollReactor is None or "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor
    installReactor(EPollReactor())
    return True
