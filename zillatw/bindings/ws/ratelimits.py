"""Admission control, sans-IO: token buckets and a bounded table of clients.

Everything here is plain numbers: the caller passes the time (`reactor.seconds()` in the
gateway, any float in tests), nothing schedules a timer. A bucket refills continuously at
`rate` tokens per second up to `burst`; it is computed when it is asked, so a client that
stays away costs nothing until it comes back.

The table holds one entry per client address: its handshake bucket and how many of its
connections are open. It holds at most `max_clients` entries. An entry whose client has no
open connection is *idle* and may be dropped, oldest idle first, to make room (its client
then starts again with a full bucket); an entry with open connections is never dropped, so
a count can always be decremented. When every entry is busy, a new client is refused
(TOO_MANY_CLIENTS) rather than the table growing.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

MAX_CLIENTS = 65_536  # client addresses the table holds (about 200 bytes each)


class Refusal(enum.Enum):
    """Why a handshake is refused, with the HTTP status its answer carries."""

    CONNECTIONS = "connections"          # the client holds max-connections-per-client already: 503
    HANDSHAKE_RATE = "handshake-rate"    # the client's handshake bucket is empty: 429
    TOO_MANY_CLIENTS = "too-many-clients"  # every table entry has open connections: 503

    @property
    def status(self) -> int:
        return 429 if self is Refusal.HANDSHAKE_RATE else 503


class Verdict(NamedTuple):
    """What admit() decided: `refusal` None to admit; `retry_after` whole seconds (429)."""

    refusal: Refusal | None
    retry_after: int = 0


ADMITTED = Verdict(None)


class TokenBucket:
    """`rate` tokens per second, at most `burst` held; full when made. take() runs per
    message under a message rate: it is kept to a few float operations."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a bucket needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate = float(rate)
        self.burst = float(burst)  # floats only: comparing a float with an int is CPython's slow path
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """One token if there is one (True); else False and nothing taken."""
        tokens = self.tokens
        elapsed = now - self.stamp
        self.stamp = now  # a clock set back refills nothing, takes nothing, and counts on from there
        if elapsed > 0.0:
            tokens += elapsed * self.rate
            if tokens > self.burst:
                tokens = self.burst
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def retry_after(self) -> int:
        """Whole seconds until the next token (at least 1), as of the last take()."""
        return max(1, math.ceil((1.0 - self.tokens) / self.rate))


class _Client:
    __slots__ = ("bucket", "open")

    def __init__(self, bucket: TokenBucket | None) -> None:
        self.bucket = bucket
        self.open = 0


class Admission:
    """Per-client limits of one ws server: open connections (`max_connections`, 0: none)
    and handshakes (`handshake_rate` per second, `handshake_burst`; rate 0: none).

    admit(client, now) decides a handshake (and takes a token); opened(client) counts a
    connection admitted, closed(client) its end: the caller calls closed() once for every
    opened(), whichever way the connection ends."""

    def __init__(self, max_connections: int = 0, handshake_rate: float = 0.0, handshake_burst: int = 1,
                 max_clients: int = MAX_CLIENTS) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.max_connections = max_connections
        self.handshake_rate = handshake_rate
        self.handshake_burst = handshake_burst
        self.max_clients = max_clients
        # Entries with open connections, and idle ones in the order they were last used
        # (the oldest first: dropped first). A client is in one of them, never both.
        self._busy: dict[str, _Client] = {}
        self._idle: dict[str, _Client] = {}
        self.refused = {refusal: 0 for refusal in Refusal}  # handshakes refused, by reason
        self.dropped = 0  # idle entries dropped to make room

    def __len__(self) -> int:
        return len(self._busy) + len(self._idle)

    def open_count(self, client: str) -> int:
        entry = self._busy.get(client)
        return entry.open if entry is not None else 0

    def clients(self) -> list[str]:
        """The addresses the table holds (busy ones first)."""
        return [*self._busy, *self._idle]

    def admit(self, client: str, now: float) -> Verdict:
        """Whether a handshake from `client` may go on; takes a token from its bucket."""
        entry = self._busy.get(client)
        if entry is None:
            entry = self._idle.pop(client, None)
            if entry is None:
                if not self.handshake_rate:  # no bucket to keep, no connection open: no entry yet
                    return ADMITTED if len(self._busy) < self.max_clients else self._refuse(Refusal.TOO_MANY_CLIENTS)
                entry = self._new_entry(now)
                if entry is None:
                    return self._refuse(Refusal.TOO_MANY_CLIENTS)
            self._idle[client] = entry  # idle still, and now the most recently used
        bucket = entry.bucket
        if bucket is not None and not bucket.take(now):
            return self._refuse(Refusal.HANDSHAKE_RATE, bucket.retry_after())
        if self.max_connections and entry.open >= self.max_connections:
            return self._refuse(Refusal.CONNECTIONS)
        return ADMITTED

    def opened(self, client: str) -> bool:
        """A connection of `client` is admitted: counted until closed(). False (and not
        counted) when the table is full of busy clients."""
        entry = self._busy.get(client)
        if entry is None:
            entry = self._idle.pop(client, None) or self._new_entry(None)
            if entry is None:
                self.refused[Refusal.TOO_MANY_CLIENTS] += 1
                return False
            self._busy[client] = entry
        entry.open += 1
        return True

    def closed(self, client: str) -> None:
        """A connection opened() for `client` has ended."""
        entry = self._busy.get(client)
        if entry is None:  # not counted (opened() said False): nothing to take back
            return
        entry.open -= 1
        if entry.open == 0:
            del self._busy[client]
            if entry.bucket is not None:  # its bucket still matters for a while; else forget it
                self._idle[client] = entry

    def _new_entry(self, now: float | None) -> _Client | None:
        """An entry for a new client, dropping the oldest idle one if the table is full;
        None when every entry is busy. `now` None: the bucket starts full at its first use."""
        if len(self._busy) + len(self._idle) >= self.max_clients:
            if not self._idle:
                return None
            del self._idle[next(iter(self._idle))]
            self.dropped += 1
        bucket = None
        if self.handshake_rate:
            bucket = TokenBucket(self.handshake_rate, self.handshake_burst, now if now is not None else -math.inf)
        return _Client(bucket)

    def _refuse(self, refusal: Refusal, retry_after: int = 0) -> Verdict:
        self.refused[refusal] += 1
        return Verdict(refusal, retry_after)
