"""The idle-connections scenario: how much memory a server process needs per open, idle
WebSocket connection, and how long opening them takes.

`measure_idle(...)` starts a fresh server, opens 200 warm-up connections and closes them,
reads the server's VmRSS, then opens `count` connections from several client processes and
reads VmRSS again 2 s after the last one: RSS per connection = the difference / count. The
clients are raw asyncio streams that write the upgrade request, read up to the `101`, then only
answer the server's keepalive pings (zillatw and websockets drop a peer that does not pong);
each process has IDLE_CONCURRENCY handshakes in progress at a time. At the end they reset
their connections (SO_LINGER 0, so no TIME_WAIT is left behind).

Past one source address's ephemeral ports (net.ipv4.ip_local_port_range, about 28,000 here) a
client cannot open more connections to one server address and port, so each client process
binds its sockets to its own loopback source address, 127.0.0.2, 127.0.0.3, ... (the whole of
127.0.0.0/8 is the loopback interface's on Linux), and holds at most PER_SOURCE connections
(fewer when RLIMIT_NOFILE is lower: per_process()).
The server needs a file descriptor per connection: `raise_nofile` lifts RLIMIT_NOFILE (the
hard limit too when running as root, and fs.nr_open when that is lower) before any process is
started, so every process the benchmark starts inherits it.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import resource
import socket
import struct
import time
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event, Semaphore
from pathlib import Path
from typing import Any

IDLE_CONCURRENCY = 16  # handshakes in progress per client process (the servers' backlogs are 50-100)
MIN_PROCESSES = 4
PER_SOURCE = 25_000  # connections from one source address: below its ~28,000 ephemeral ports
HANDSHAKE = ("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the source port at connect(), by the whole 4-tuple


NOFILE_MARGIN = 500  # the server's other descriptors: listeners, logs, epoll, the reactor's waker


def raise_nofile(need: int = 0) -> int:
    """RLIMIT_NOFILE to at least `need` (hard limit included, if allowed), soft = hard;
    inherited by the processes started afterwards. -> the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if need > hard:
        nr_open = Path("/proc/sys/fs/nr_open")
        try:
            if int(nr_open.read_text()) < need:
                nr_open.write_text(str(need))
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot raise RLIMIT_NOFILE to {need} (hard limit {hard}; {exc}): raising the "
                             "hard limit takes root with CAP_SYS_RESOURCE (`ulimit -Hn`, or prlimit on this shell)"
                             ) from None
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def per_process() -> int:
    """Connections one client process holds: PER_SOURCE, or fewer if RLIMIT_NOFILE is lower."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1000, min(PER_SOURCE, soft - NOFILE_MARGIN))


def client_processes(count: int) -> int:
    return max(MIN_PROCESSES, math.ceil(count / per_process()))


class _IdleClients:
    """One client process's idle connections from `source`: opened IDLE_CONCURRENCY handshakes
    at a time, kept alive by answering pings, reset at the end."""

    def __init__(self, port: int, source: str) -> None:
        self.port, self.source = port, source
        self.request = HANDSHAKE.format(port=port).encode()
        self.gate = asyncio.Semaphore(IDLE_CONCURRENCY)
        self.writers: list[asyncio.StreamWriter] = []
        self.keepalives: list[asyncio.Future[None]] = []
        self.errors: list[str] = []
        self.lost = 0  # connections the server closed or dropped

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def _keepalive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answers pings (a masked pong, mask 0); anything else from the server is skipped."""
        try:
            while True:
                b0, b1 = await reader.readexactly(2)
                length = b1 & 0x7F
                if length >= 126:
                    length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
                payload = await reader.readexactly(length)
                if b0 & 0x0F == 0x9 and length < 126:
                    writer.write(bytes((0x8A, 0x80 | length)) + b"\0\0\0\0" + payload)
                elif b0 & 0x0F == 0x8:
                    break
        except (OSError, asyncio.IncompleteReadError):
            pass
        self.lost += 1

    async def _open_one(self) -> None:
        """One connection through its upgrade, in 5 attempts; the last attempt's failure is kept."""
        async with self.gate:
            for attempt in range(5):
                try:
                    reader, writer = await self._connect()
                    writer.write(self.request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                    if not head.startswith(b"HTTP/1.1 101"):
                        raise RuntimeError(head.split(b"\r\n")[0].decode(errors="replace"))
                    self.writers.append(writer)
                    self.keepalives.append(asyncio.ensure_future(self._keepalive(reader, writer)))
                    return
                except Exception as exc:
                    if attempt == 4:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(0.2)

    async def open_all(self, n: int) -> None:
        await asyncio.gather(*(self._open_one() for _ in range(n)))

    def still_open(self) -> int:
        return len(self.writers) - self.lost

    async def reset_all(self) -> None:
        """Ends every connection with a reset (SO_LINGER 0): no TIME_WAIT left behind."""
        for task in self.keepalives:
            task.cancel()
        for writer in self.writers:
            try:
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           struct.pack("ii", 1, 0))
            except OSError:
                pass
            writer.transport.abort()
        await asyncio.sleep(0.1)


async def _open_hold_reset(port: int, n: int, source: str, opened: Semaphore, release: Event,
                           results: Queue[Any]) -> None:
    clients = _IdleClients(port, source)  # made in the running loop its semaphore belongs to
    t0 = time.perf_counter()
    await clients.open_all(n)
    results.put((len(clients.writers), time.perf_counter() - t0, clients.errors[:3]))
    opened.release()
    await asyncio.get_running_loop().run_in_executor(None, release.wait, 600)
    results.put(clients.still_open())
    await clients.reset_all()


def idle_worker(port: int, n: int, source: str, opened: Semaphore, release: Event, results: Queue[Any]) -> None:
    """Opens n WebSocket connections from `source`, reports (opened, seconds, errors), holds them
    until `release` is set, reports how many are still open, then resets them."""
    raise_nofile()
    asyncio.run(_open_hold_reset(port, n, source, opened, release, results))


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def open_idle(port: int, count: int, procs_n: int,
              hold: Callable[[list[int]], None]) -> tuple[int, float, list[str], int]:
    """Opens `count` idle connections over procs_n processes, the i-th from 127.0.0.(2 + i);
    calls hold(client pids) while they are all open. -> (opened, seconds to open, errors, still
    open at the release)."""
    ctx = multiprocessing.get_context("spawn")
    opened, release, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    share = [count // procs_n + (i < count % procs_n) for i in range(procs_n)]
    workers = [ctx.Process(target=idle_worker, daemon=True,
                           args=(port, n, f"127.0.0.{2 + i}", opened, release, results))
               for i, n in enumerate(share)]
    for w in workers:
        w.start()
    try:
        got = [results.get(timeout=300 + count / 100) for _ in workers]
        for _ in workers:
            opened.acquire(timeout=10)
        hold([w.pid for w in workers if w.pid is not None])  # all of them: every one has started
        release.set()
        still = sum(results.get(timeout=60) for _ in workers)  # connections still open at the release
    finally:
        release.set()
        for w in workers:
            w.join(30)
            if w.is_alive():
                w.kill()
                w.join()
    return sum(g[0] for g in got), max(g[1] for g in got), [e for g in got for e in g[2]], still


def measure_idle(start: Callable[[], tuple[int, Callable[[], list[int]], Callable[[], bool]]],
                 stop: Callable[[], None], count: int) -> dict:
    """start() -> (port, the server's pids now, is-alive check) starts a fresh server; stop()
    ends it. The pids are asked for at each reading: a supervisor starts its workers after it
    listens."""
    try:
        port, pids, alive = start()
        open_idle(port, 200, 1, lambda _: time.sleep(0.5))  # warm-up: first connections, lazy imports
        time.sleep(1.0)
        before = rss_kib(pids())
        sample = {}

        def hold(clients: list[int]) -> None:
            time.sleep(2.0)  # let the server settle (timers, buffers)
            sample["after"] = rss_kib(pids())
            sample["clients"] = rss_kib(clients)
            sample["alive"] = alive()

        opened, seconds, errors, still = open_idle(port, count, client_processes(count), hold)
    finally:
        stop()
    after = sample.get("after", before)
    return {"opened": opened, "seconds": seconds, "errors": errors, "before": before, "after": after,
            "per_conn": (after - before) / max(1, opened), "alive": sample.get("alive", False), "still": still,
            "clients": sample.get("clients", 0)}
