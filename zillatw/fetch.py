"""The HTTP GETs the gateway makes on its own behalf (a jwt guard's JWKS, a registry catalog's
schemas), in one place and with one client: Twisted's own `Agent` (no second HTTP library).

- The reactor is passed in; every fetch ends within its timeout.
- A body is read within a bound as it arrives: a `Content-Length` over it is refused before
  reading, and a chunked body that grows past it is cut off there (the connection dropped).
- `SingleFlight`: however many callers want a resource at once, one request is in flight;
  each of them hears when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers


class FetchError(Exception):
    """Why a fetch gave no body: an HTTP status other than 200, or a body over its bound."""


def agent(reactor: Any) -> Agent:
    """An agent for occasional fetches: no connection is kept between them."""
    return Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))


def get(agent: Any, url: str, *, headers: Mapping[bytes, list[bytes]], max_bytes: int, timeout: float,
        reactor: Any) -> Deferred:
    """GET `url`: a Deferred of the body of a 200 answer, at most `max_bytes` long; it fails
    with FetchError (status, size) or the transport's error, and with a TimeoutError after
    `timeout` seconds however far the answer got."""
    fetching = agent.request(b"GET", url.encode("ascii"), Headers(dict(headers)))
    fetching.addCallback(_read, max_bytes)
    fetching.addTimeout(timeout, reactor)
    return fetching


def _read(response: Any, max_bytes: int) -> Deferred:
    if isinstance(response.length, int) and response.length > max_bytes:
        dropped: Deferred = Deferred()
        dropped.addErrback(lambda _: None)  # the refusal below is the answer
        response.deliverBody(_Bounded(dropped, 0))  # drops the connection at the first byte
        raise FetchError(f"answer larger than {max_bytes} bytes")
    body: Deferred = Deferred()
    response.deliverBody(_Bounded(body, max_bytes))
    if response.code != 200:
        def refuse(_: Any) -> None:
            raise FetchError(f"HTTP {response.code}")
        body.addBoth(refuse)
    return body


class _Bounded(Protocol):
    """Collects a response body up to `limit` bytes; past it, fails and drops the connection."""

    def __init__(self, done: Deferred, limit: int):
        self.done: Deferred | None = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done is None:
            return
        self.size += len(data)
        if self.size > self.limit:
            done, self.done = self.done, None
            if self.transport is not None:  # the response's body producer: stop it, drop the connection
                self.transport.stopProducing()  # type: ignore[attr-defined]
            done.errback(FetchError(f"answer larger than {self.limit} bytes"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done is None:
            return
        done, self.done = self.done, None
        if reason is not None and reason.check(ResponseDone, PotentialDataLoss):
            done.callback(b"".join(self.parts))
        else:
            done.errback(reason)


class SingleFlight:
    """One fetch at a time for one resource. `start(fetch)` begins one unless one is in
    flight; `join(fetch)` also gives a Deferred that fires with None (never fails) when the
    flight ends, successful or not: the caller then looks at what the fetch left behind."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: list[Deferred] | None = None

    @property
    def in_flight(self) -> bool:
        return self._waiting is not None

    def start(self, fetch: Callable[[], Deferred]) -> None:
        if self._waiting is not None:
            return
        self._waiting = []
        try:
            flight = fetch()
        except Exception as e:  # noqa: BLE001 - a bug in a fetch must not wedge the resource
            flight = Deferred()
            flight.errback(e)
        flight.addBoth(self._landed)

    def join(self, fetch: Callable[[], Deferred]) -> Deferred:
        waiter: Deferred = Deferred()
        self.start(fetch)
        if self._waiting is None:  # the flight ended at once
            waiter.callback(None)
        else:
            self._waiting.append(waiter)
        return waiter

    def _landed(self, result: Any) -> None:
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(None)
        if isinstance(result, Failure):
            result.trap(Exception)  # handled by the fetch's own errback; nothing left unhandled
