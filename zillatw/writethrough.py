"""Writing to a TCP transport without waiting for the next reactor turn when nothing is
buffered.

Twisted's `transport.write` always buffers: it registers the socket for writability
(epoll_ctl), sends on the next reactor turn, then unregisters (epoll_ctl again). For a
relayed message that is two extra syscalls and one reactor turn. When the transport's buffer
is empty, sending at once through its own `writeSomeData` is what `doWrite` would do next
turn anyway, and keeps the byte order. Whatever is not sent (socket full, error) goes to
`transport.write`, so buffering, producer pausing and error handling stay Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_TCP = (tcp.Server, tcp.Client)


def write(transport: Any, data: bytes) -> None:
    if (type(transport) in _TCP and not transport.dataBuffer and not transport._tempDataBuffer
            and transport.connected and not transport.disconnecting and not transport._aborting
            and not transport._writeDisconnecting and not transport.TLS):
        sent = transport.writeSomeData(data)  # an int, or an exception instance when the connection is lost
        if type(sent) is int and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
