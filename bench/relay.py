#!/usr/bin/env python
"""The floor of any CPython proxy: a bare byte relay, for the proxy scenario's table.

    python bench/relay.py PORT UPSTREAM_PORT

Each connection accepted on 127.0.0.1:PORT is joined to a new one to the upstream, and bytes
go both ways as they come: one recv and one send per read, on one epoll loop, nothing else
(no WebSocket framing, no timers, no logging: the handshake passes through as bytes). A
proxy in CPython that reads and writes each message with a syscall cannot spend less than
this; bench/suite.py puts it beside nginx and zillatw in the same run, so the gap between
it and nginx is the part of zillatw's gap that no Python code can close. Bounded: a side
whose peer cannot take more is not read until the peer drains.
"""

from __future__ import annotations

import select
import socket
import sys

READ_SIZE = 65536


def serve(port: int, upstream_port: int) -> None:
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    sockets: dict[int, socket.socket] = {}
    peer: dict[int, int] = {}
    pending: dict[int, bytes] = {}  # fd -> bytes its socket has still to send
    paused: set[int] = set()        # fds not read until their peer drains

    def update(fd: int) -> None:
        poller.modify(fd, (0 if fd in paused else select.EPOLLIN) | (select.EPOLLOUT if fd in pending else 0))

    def close(fd: int) -> None:
        for side in (fd, peer.get(fd)):
            if side is not None and side in sockets:
                poller.unregister(side)
                sockets.pop(side).close()
                peer.pop(side, None)
                pending.pop(side, None)
                paused.discard(side)

    while True:
        for fd, event in poller.poll():
            if fd == listener.fileno():
                try:
                    client, _ = listener.accept()
                except BlockingIOError:
                    continue
                upstream = socket.create_connection(("127.0.0.1", upstream_port))
                for side in (client, upstream):
                    side.setblocking(False)
                    side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sockets[side.fileno()] = side
                    poller.register(side.fileno(), select.EPOLLIN)
                peer[client.fileno()], peer[upstream.fileno()] = upstream.fileno(), client.fileno()
                continue
            if fd not in sockets:
                continue
            if event & select.EPOLLOUT:  # a full socket drained: send the rest, read its peer again
                data = pending.pop(fd)
                try:
                    sent = sockets[fd].send(data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    close(fd)
                    continue
                if sent < len(data):
                    pending[fd] = data[sent:]
                    continue
                paused.discard(peer[fd])
                update(fd)
                update(peer[fd])
                continue
            try:
                data = sockets[fd].recv(READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(fd)
                continue
            to = peer[fd]
            try:
                sent = sockets[to].send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                close(fd)
                continue
            if sent < len(data):
                pending[to] = data[sent:]
                paused.add(fd)  # not read until its peer drains
                update(to)
                update(fd)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
