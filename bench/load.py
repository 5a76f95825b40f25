"""The load generator the benchmarks share: closed-loop round trips over many connections.

`measure(url, size, ...)` spreads CONNECTIONS WebSocket connections over PROCESSES worker
processes, each connection with exactly one message in flight (send, wait for the whole echo,
send again). After a warm-up, the round trips completed in the window are counted and each
one's time goes into a latency histogram (LATENCY_BUCKETS buckets 1 % wide from 1 µs to 100 s,
so the memory is bounded whatever the rate; percentiles are exact to 1 %).

Two clients:
- picows + uvloop (the default): binary messages of `size` random bytes (or `payload`),
  `wss://` with an ssl context that trusts `cafile`; picows offers no extension.
- websockets (`client="websockets"`): offers permessage-deflate (its default
  `client_max_window_bits`), sends `payload` as a text message and fails the run if the server
  did not accept the extension, so both ends really compress. It is much slower per message
  than picows, so its figures are for comparing servers under the same client only.
"""

from __future__ import annotations

import asyncio
import enum
import math
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

if TYPE_CHECKING:  # picows is imported in the worker processes only
    from picows import WSListener, WSTransport

CONNECTIONS = 50
PROCESSES = 2
LATENCY_STEP = 1.01  # each histogram bucket is 1 % wider than the one before
LATENCY_BUCKETS = int(math.log(1e8) / math.log(LATENCY_STEP)) + 1  # 1 µs .. 100 s
_LOG_STEP = 1 / math.log(LATENCY_STEP)


def latency_bucket(seconds: float) -> int:
    micros = seconds * 1e6
    return 0 if micros <= 1.0 else min(LATENCY_BUCKETS - 1, int(math.log(micros) * _LOG_STEP))


def percentile(histogram: list[int], fraction: float) -> float:
    """The round-trip time (µs) below which `fraction` of the round trips fall."""
    total = sum(histogram)
    if not total:
        return float("nan")
    target, seen = fraction * total, 0
    for index, n in enumerate(histogram):
        seen += n
        if seen >= target:
            return LATENCY_STEP ** (index + 0.5)  # the bucket's middle
    return LATENCY_STEP ** LATENCY_BUCKETS


def client_ssl_context(cafile: str | None):
    if cafile is None:
        return None
    import ssl
    return ssl.create_default_context(cafile=cafile)


def negotiated_extensions(url: str, cafile: str | None = None) -> str:
    """What the server answers to the deflate client's offer (its Sec-WebSocket-Extensions):
    the window sizes and context takeover it picked set how much each side's zlib works."""
    from websockets.asyncio.client import connect

    async def handshake() -> str:
        async with connect(url, ssl=client_ssl_context(cafile), compression="deflate") as ws:
            answer = ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
            return answer or "(none)"

    return asyncio.run(handshake())


# ---------------------------------------------------------------- worker processes

T = TypeVar("T")


class Phase(enum.IntEnum):
    WARMUP = 0
    WINDOW = 1
    DONE = 2


@dataclass
class _Tally:
    """One load worker's counts; only the round trips completed in the window are counted and timed."""
    phase: Phase = Phase.WARMUP
    count: int = 0
    errors: int = 0  # echoes of the wrong length
    closed: int = 0  # connections lost before the end
    histogram: list[int] = field(default_factory=lambda: [0] * LATENCY_BUCKETS)

    def completed(self, seconds: float) -> None:
        """A round trip that took `seconds` came back."""
        if self.phase == Phase.WINDOW:
            self.count += 1
            self.histogram[latency_bucket(seconds)] += 1


async def _connect_retrying(connect: Callable[[], Awaitable[T]], retry_on: type[Exception]) -> T:
    """A busy server's listen queue may be full for a moment: 5 attempts, 0.2 s apart."""
    for _ in range(4):
        try:
            return await connect()
        except retry_on:
            await asyncio.sleep(0.2)
    return await connect()


async def _warm_up_and_measure(tally: _Tally, warmup: float, seconds: float) -> tuple[int, float]:
    """The load is running: warm up, then the window -> (round trips completed in it, its length)."""
    await asyncio.sleep(warmup)
    tally.phase = Phase.WINDOW
    t0 = time.perf_counter()
    await asyncio.sleep(seconds)
    tally.phase = Phase.DONE
    return tally.count, time.perf_counter() - t0


def _report(results: Any, barrier: Any, tally: _Tally, run: Callable[[], tuple[int, float]]) -> None:
    """Runs the worker's loop and puts its result tuple, or its failure, on `results`."""
    try:
        count, elapsed = run()
        results.put((count, elapsed, tally.errors, tally.closed, None, tally.histogram))
    except BaseException as exc:  # report, do not hang the parent
        barrier.abort()
        results.put((0, 1.0, 0, 0, f"{type(exc).__name__}: {exc}", None))


class _LoadClient(Protocol):
    """What load_worker uses of _picows_client's listeners."""
    lost: bool
    transport: WSTransport

    def kick(self) -> None: ...


def _picows_client(payload: bytes, tally: _Tally) -> type[WSListener]:
    """picows' listener class (picows is imported in the worker process only): it sends `payload`
    again as soon as the whole echo is back."""
    from picows import WSListener, WSMsgType

    size = len(payload)
    clock = time.perf_counter

    class Client(WSListener):
        received = 0
        lost = False
        sent_at = 0.0

        def on_ws_connected(self, transport):
            self.transport = transport

        def kick(self):
            self.sent_at = clock()
            self.transport.send(WSMsgType.BINARY, payload)

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.CLOSE:
                if tally.phase < Phase.DONE:
                    self.lost = True  # closed on us mid-run
                return
            self.received += frame.payload_size
            if not frame.fin:
                return
            now = clock()
            if self.received != size:
                tally.errors += 1
            self.received = 0
            tally.completed(now - self.sent_at)
            if tally.phase < Phase.DONE:
                self.sent_at = now
                transport.send(WSMsgType.BINARY, payload)

        def on_ws_disconnected(self, transport):
            if tally.phase < Phase.DONE:
                self.lost = True

    return Client


def load_worker(url: str, conns: int, size: int, warmup: float, seconds: float,
                barrier: Any, results: Any, payload: bytes | None = None, cafile: str | None = None) -> None:
    """picows + uvloop: `conns` connections, each sending binary messages of `size` random bytes
    (or `payload`) one at a time; reports its result tuple on `results`."""
    import logging

    import uvloop
    from picows import WSCloseCode, ws_connect
    logging.getLogger("picows").setLevel(logging.CRITICAL)

    payload = os.urandom(size) if payload is None else payload  # bench/validation.py sends JSON
    tally = _Tally()
    client_class = _picows_client(payload, tally)

    async def main() -> tuple[int, float]:
        context = client_ssl_context(cafile)
        clients: list[_LoadClient] = []
        for _ in range(conns):
            _, listener = await _connect_retrying(
                lambda: ws_connect(client_class, url, ssl_context=context, max_frame_size=64 * 1024 * 1024), Exception)
            clients.append(cast(_LoadClient, listener))  # the Client that client_class made, typed as its base
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        for client in clients:
            client.kick()
        count, elapsed = await _warm_up_and_measure(tally, warmup, seconds)
        tally.closed = sum(client.lost for client in clients)
        await asyncio.sleep(0.3)  # let the last round trips come back before closing
        for client in clients:
            client.transport.send_close(WSCloseCode.OK)  # picows defaults to 0, not a valid code
        await asyncio.sleep(0.1)
        for client in clients:
            client.transport.disconnect()
        return count, elapsed

    _report(results, barrier, tally, lambda: uvloop.run(main()))


def deflate_worker(url: str, conns: int, size: int, warmup: float, seconds: float,
                   barrier: Any, results: Any, payload: bytes | None = None, cafile: str | None = None) -> None:
    """As load_worker with the websockets client offering permessage-deflate; `payload` is sent
    as text (it must be UTF-8: the deflate scenario sends JSON)."""
    from websockets.asyncio.client import ClientConnection, connect

    if payload is None:
        raise ValueError("deflate_worker sends `payload` as a text message: it needs one")
    text = payload.decode()
    tally = _Tally()
    clock = time.perf_counter

    async def one(ws: ClientConnection) -> None:
        try:
            while tally.phase < Phase.DONE:
                sent_at = clock()
                await ws.send(text)
                echo = await ws.recv()
                if len(echo) != len(text):
                    tally.errors += 1
                tally.completed(clock() - sent_at)
        except Exception:
            if tally.phase < Phase.DONE:
                tally.closed += 1

    async def open_deflate(context: Any) -> ClientConnection:
        ws = await _connect_retrying(
            lambda: connect(url, ssl=context, compression="deflate", max_size=None, ping_interval=None), OSError)
        answer = ws.response.headers.get("Sec-WebSocket-Extensions") if ws.response else None
        if "permessage-deflate" not in (answer or ""):
            raise RuntimeError(f"{url} did not accept permessage-deflate")
        return ws

    async def main() -> tuple[int, float]:
        context = client_ssl_context(cafile)
        sockets = [await open_deflate(context) for _ in range(conns)]
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        tasks = [asyncio.ensure_future(one(ws)) for ws in sockets]
        count, elapsed = await _warm_up_and_measure(tally, warmup, seconds)
        await asyncio.wait(tasks, timeout=5)
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        return count, elapsed

    _report(results, barrier, tally, lambda: asyncio.run(main()))


# ---------------------------------------------------------------- CPU accounting, the window

def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """CPU time these processes used, and time they spent runnable but waiting for a CPU
    (all their threads; /proc/PID/task/*/schedstat, nanoseconds)."""
    ran = waited = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                fields = (task / "schedstat").read_text().split()
            except OSError:
                continue
            ran += int(fields[0])
            waited += int(fields[1])
    return ran / 1e9, waited / 1e9


def family(pid: int) -> list[int]:
    """pid and its children (nginx: master and worker; twistd -w N: supervisor and workers)."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    return [pid, *map(int, kids)]


def run_window(workers: list, barrier: Any, results: Any, watched: Callable[[], dict[str, list[int]]],
               warmup: float, seconds: float, what: str) -> tuple[list, dict[str, float], float]:
    """Start the load processes, wait until they are all connected (the barrier), warm up, then
    measure `seconds`: -> (each worker's result tuple, CPU % in the window for each watched
    name and "<name> wait" for its time runnable but waiting for a CPU, the window's length).
    A worker that fails before the start fails the run with its problem."""
    for w in workers:
        w.start()
    cpu: dict[str, float] = {}
    started = threading.Event()

    def watchdog() -> None:  # a worker that dies before the start must not leave us waiting
        while not started.wait(0.2):
            if any(not w.is_alive() for w in workers):
                barrier.abort()
                return
    threading.Thread(target=watchdog, daemon=True).start()
    try:
        try:
            barrier.wait(timeout=120)  # every connection is open; the warm-up starts
            started.set()
        except threading.BrokenBarrierError:
            started.set()
            problems: list[str | None] = []
            while not results.empty() or not problems:
                try:
                    problems.append(results.get(timeout=5)[4])
                except queue.Empty:
                    break
            raise RuntimeError(f"{what} failed: " + "; ".join(filter(None, problems))) from None
        pids = watched()
        time.sleep(warmup)
        t0, before = time.perf_counter(), {name: cpu_seconds(p) for name, p in pids.items()}
        time.sleep(seconds)
        elapsed = time.perf_counter() - t0
        after = {name: cpu_seconds(p) for name, p in pids.items()}
        for name in pids:
            cpu[name] = 100 * (after[name][0] - before[name][0]) / elapsed
            cpu[name + " wait"] = 100 * (after[name][1] - before[name][1]) / elapsed
        got = [results.get(timeout=warmup + seconds + 60) for _ in workers]
    finally:
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.kill()
                w.join()
    return got, cpu, elapsed


def measure(url: str, size: int, warmup: float, seconds: float, watch: dict[str, int],
            payload: bytes | None = None, cafile: str | None = None, client: str = "picows") -> dict:
    """Runs the load; watch names processes (pid) whose CPU use in the window is reported, in %.
    -> msgs/s, MB/s (payload each way), CPU, bad echoes, connections lost, and the latency
    histogram with its p50 and p99 (µs)."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES + 1), ctx.Queue()
    share = [CONNECTIONS // PROCESSES + (i < CONNECTIONS % PROCESSES) for i in range(PROCESSES)]
    target = {"picows": load_worker, "websockets": deflate_worker}[client]
    workers = [ctx.Process(target=target, daemon=True,
                           args=(url, n, size, warmup, seconds, barrier, results, payload, cafile)) for n in share]
    got, cpu, _ = run_window(workers, barrier, results, lambda: {name: family(pid) for name, pid in watch.items()},
                             warmup, seconds, f"load generator against {url}")
    problems = [g[4] for g in got if g[4]]
    if problems:
        raise RuntimeError("; ".join(problems))
    rate = sum(count / elapsed for count, elapsed, *_ in got)
    histogram = [sum(column) for column in zip(*(g[5] for g in got), strict=True)]  # LATENCY_BUCKETS each
    size = len(payload) if payload is not None else size
    return {"msgs": rate, "mbs": rate * size / 1e6, "cpu": cpu,
            "errors": sum(g[2] for g in got), "closed": sum(g[3] for g in got),
            "latency": histogram, "p50": percentile(histogram, 0.5), "p99": percentile(histogram, 0.99)}
