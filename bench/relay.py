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


class Relay:
    def __init__(self, port: int, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", port), backlog=1024)
        self.listener.setblocking(False)
        self.poller = select.epoll()
        self.poller.register(self.listener.fileno(), select.EPOLLIN)
        self.sockets: dict[int, socket.socket] = {}
        self.peer: dict[int, int] = {}
        self.pending: dict[int, bytes] = {}  # fd -> bytes its socket has still to send
        self.paused: set[int] = set()        # fds not read until their peer drains

    def serve(self) -> None:
        listening = self.listener.fileno()
        while True:
            for fd, event in self.poller.poll():
                if fd == listening:
                    self.accept()
                elif fd in self.sockets:
                    if event & select.EPOLLOUT:
                        self.drain(fd)
                    else:
                        self.read(fd)

    def accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        for side in (client, upstream):
            side.setblocking(False)
            side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets[side.fileno()] = side
            self.poller.register(side.fileno(), select.EPOLLIN)
        self.peer[client.fileno()], self.peer[upstream.fileno()] = upstream.fileno(), client.fileno()

    def read(self, fd: int) -> None:
        try:
            data = self.sockets[fd].recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(fd)
            return
        to = self.peer[fd]
        sent = self.send(to, data)
        if sent is None:
            return
        if sent < len(data):
            self.pending[to] = data[sent:]
            self.paused.add(fd)  # not read until its peer drains
            self.update(to)
            self.update(fd)

    def drain(self, fd: int) -> None:
        """A full socket can take more: the rest to it, and its peer read again once sent."""
        data = self.pending.pop(fd)
        sent = self.send(fd, data)
        if sent is None:
            return
        if sent < len(data):
            self.pending[fd] = data[sent:]
            return
        self.paused.discard(self.peer[fd])
        self.update(fd)
        self.update(self.peer[fd])

    def send(self, fd: int, data: bytes) -> int | None:
        """What of `data` fd's socket took (0 when full), or None: it failed, both sides closed."""
        try:
            return self.sockets[fd].send(data)
        except BlockingIOError:
            return 0
        except OSError:
            self.close(fd)
            return None

    def update(self, fd: int) -> None:
        self.poller.modify(fd, (0 if fd in self.paused else select.EPOLLIN)
                           | (select.EPOLLOUT if fd in self.pending else 0))

    def close(self, fd: int) -> None:
        for side in (fd, self.peer.get(fd)):
            if side is not None and side in self.sockets:
                self.poller.unregister(side)
                self.sockets.pop(side).close()
                self.peer.pop(side, None)
                self.pending.pop(side, None)
                self.paused.discard(side)


if __name__ == "__main__":
    Relay(int(sys.argv[1]), int(sys.argv[2])).serve()
