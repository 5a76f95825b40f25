"""Upstream pools, sans-IO: which upstream a new stream goes to, and whether each is healthy.

A tcp client with `options.upstreams` (zillatw.bindings.tcp.pool, docs/upstreams.md) asks
its `Pool` for an upstream per connection attempt and tells it what came of the attempt;
its probes tell it what came of theirs. Nothing here touches a socket or a clock: the
Twisted side calls in with outcomes and acts on the `Transition`s it gets back.

- Selection (`Pool.choose`): among the upstreams that are up and not draining, and not
  already tried for this stream, smooth weighted round-robin (nginx's: over a cycle each
  upstream is chosen in proportion to its weight, interleaved, not in bursts); or weighted
  least-connections: the fewest live streams per unit of weight, ties broken by that
  round-robin. A live stream is counted from the attempt until its connection closes.
- Health (`HealthCheck`): two states, UP and DOWN. `fails` consecutive failures (probes or
  real connects) take an UP upstream DOWN; `passes` consecutive successful probes bring a
  DOWN one back. A DOWN upstream gets no new streams; its existing ones are left alone.
- Membership (`PoolStates`): what outlives one configuration. On a reload the tcp client
  built from the new file adopts the states of the one before (same binding, same
  upstream -> same health and live count); an upstream no longer listed drains: no new
  streams, its live ones go on, and it is forgotten when the last one closes.

Bounds: MAX_UPSTREAMS per pool (the schema's), MAX_WEIGHT per upstream; a pool's states
hold at most the upstreams of its current list plus those still draining.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

MAX_UPSTREAMS = 64
MAX_WEIGHT = 1000
# health defaults: a probe every 5 s, 2 s to connect, 2 failures down, 1 success up
DEFAULT_INTERVAL, DEFAULT_TIMEOUT, DEFAULT_FAILS, DEFAULT_PASSES = 5.0, 2.0, 2, 1
MAX_FAILS = MAX_PASSES = 100
# without `health`, nothing probes: a DOWN upstream is tried again this many seconds later
PASSIVE_REJOIN = 10.0

Key = tuple[str, int]


class Balance(enum.Enum):
    ROUND_ROBIN = "round-robin"
    LEAST_CONNECTIONS = "least-connections"


class Health(enum.Enum):
    UP = "up"
    DOWN = "down"


class Transition(enum.Enum):
    """What an outcome did to an upstream's health."""
    NONE = "none"
    WENT_DOWN = "down"
    WENT_UP = "up"


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int
    weight: int = 1

    @property
    def key(self) -> Key:
        return (self.host, self.port)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """`options.health`; `active` false when the option is absent (no probes, passive only)."""
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    fails: int = DEFAULT_FAILS
    passes: int = DEFAULT_PASSES
    active: bool = False


class HealthCheck:
    """One upstream's health: its state and the run of like outcomes that may change it."""

    __slots__ = ("state", "failures", "successes")

    def __init__(self) -> None:
        self.state = Health.UP  # optimistic: a new upstream gets traffic until it fails
        self.failures = 0       # consecutive, while UP
        self.successes = 0      # consecutive, while DOWN

    def failed(self, settings: HealthSettings) -> Transition:
        if self.state is Health.UP:
            self.failures += 1
            if self.failures >= settings.fails:
                self.state, self.failures = Health.DOWN, 0
                return Transition.WENT_DOWN
        else:
            self.successes = 0
        return Transition.NONE

    def passed(self, settings: HealthSettings) -> Transition:
        if self.state is Health.DOWN:
            self.successes += 1
            if self.successes >= settings.passes:
                self.state, self.successes = Health.UP, 0
                return Transition.WENT_UP
        else:
            self.failures = 0
        return Transition.NONE

    def rejoin(self) -> Transition:
        """Passive checking only: the DOWN upstream's time out is over, try it again."""
        if self.state is Health.DOWN:
            self.state, self.successes, self.failures = Health.UP, 0, 0
            return Transition.WENT_UP
        return Transition.NONE


class UpstreamState:
    """What is known of one upstream of a binding, across configurations."""

    __slots__ = ("check", "active", "draining", "connect_failures", "downs")

    def __init__(self) -> None:
        self.check = HealthCheck()
        self.active = 0             # live streams: attempts in progress and open connections
        self.draining = False       # no longer listed: no new streams
        self.connect_failures = 0   # total, real traffic only (not probes)
        self.downs = 0              # times it went DOWN

    @property
    def up(self) -> bool:
        return self.check.state is Health.UP

    @property
    def available(self) -> bool:
        return self.up and not self.draining


class PoolStates:
    """The states of one binding's upstreams, shared by the configurations that use them
    (the current one and the retired ones whose connections are still open)."""

    def __init__(self) -> None:
        self._states: dict[Key, UpstreamState] = {}
        self.listed: frozenset[Key] | None = None  # the serving configuration's, once one adopted them

    def takes_new(self, key: Key) -> bool:
        """Whether `key` may get a new stream: listed now (a drained one stays out, even for
        a retired configuration's pool that still lists it) and up."""
        if self.listed is not None and key not in self.listed:
            return False
        state = self._states.get(key)
        return state is None or state.up

    def state(self, key: Key) -> UpstreamState:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = UpstreamState()
        return state

    def known(self) -> list[Key]:
        return list(self._states)

    def adopt(self, listed: Iterable[Key]) -> list[Key]:
        """The upstreams a new configuration lists serve (a re-listed one stops draining);
        the others drain. Returns those that began draining; drained ones are forgotten."""
        listed = self.listed = frozenset(listed)
        started = []
        for key, state in list(self._states.items()):
            if key in listed:
                state.draining = False
            elif not state.draining:
                state.draining = True
                started.append(key)
        for key in listed:
            self.state(key)
        self.forget_drained()
        return started

    def forget_drained(self) -> list[Key]:
        gone = [key for key, state in self._states.items() if state.draining and state.active == 0]
        for key in gone:
            del self._states[key]
        return gone


class Pool:
    """One configuration's pool: its upstreams (in order, with weights), the balance, and
    the states (shared, see PoolStates) it reads and updates."""

    def __init__(self, upstreams: Sequence[Upstream], balance: Balance = Balance.ROUND_ROBIN,
                 settings: HealthSettings = HealthSettings(), states: PoolStates | None = None):
        if not upstreams or len(upstreams) > MAX_UPSTREAMS:
            raise ValueError(f"a pool has 1 to {MAX_UPSTREAMS} upstreams, not {len(upstreams)}")
        if len({u.key for u in upstreams}) != len(upstreams):
            raise ValueError("an upstream is listed twice")
        self.upstreams = list(upstreams)
        self.balance = balance
        self.settings = settings
        self.states = states if states is not None else PoolStates()
        self._current = {u.key: 0 for u in self.upstreams}  # smooth round-robin's running weights

    def state(self, upstream: Upstream) -> UpstreamState:
        return self.states.state(upstream.key)

    def available(self, exclude: Iterable[Key] = ()) -> list[Upstream]:
        excluded = set(exclude)
        return [u for u in self.upstreams if u.key not in excluded and self.states.takes_new(u.key)]

    def choose(self, exclude: Iterable[Key] = ()) -> Upstream | None:
        """The upstream for a new stream (not one in `exclude`: tried already), or None
        when none is available. Does not count the stream: `acquire` does."""
        candidates = self.available(exclude)
        if self.balance is Balance.LEAST_CONNECTIONS and len(candidates) > 1:
            candidates = list(self._least_loaded(candidates))
        return self._round_robin(candidates)

    def _least_loaded(self, candidates: list[Upstream]) -> Iterator[Upstream]:
        # fewest active per weight: compare a/w < b/v as a*v < b*w, in integers
        best = candidates[0]
        for u in candidates[1:]:
            if self.state(u).active * best.weight < self.state(best).active * u.weight:
                best = u
        best_active = self.state(best).active
        for u in candidates:
            if self.state(u).active * best.weight == best_active * u.weight:
                yield u

    def _round_robin(self, candidates: list[Upstream]) -> Upstream | None:
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        total, best = 0, None
        for u in candidates:
            self._current[u.key] += u.weight
            total += u.weight
            if best is None or self._current[u.key] > self._current[best.key]:
                best = u
        assert best is not None
        self._current[best.key] -= total
        return best

    def acquire(self, upstream: Upstream) -> None:
        """A stream to `upstream` begins (its connection is being attempted)."""
        self.state(upstream).active += 1

    def release(self, upstream: Upstream) -> None:
        """That stream ended: the attempt failed, or its connection closed."""
        state = self.state(upstream)
        state.active = max(0, state.active - 1)
        if state.draining and state.active == 0:
            self.states.forget_drained()

    def connect_failed(self, upstream: Upstream) -> Transition:
        state = self.state(upstream)
        state.connect_failures += 1
        return self._counted(state, state.check.failed(self.settings))

    def connected(self, upstream: Upstream) -> Transition:
        """A real connection worked: the run of failures ends (it cannot bring a DOWN
        upstream up: no stream goes to one)."""
        return self._counted(self.state(upstream), self.state(upstream).check.passed(self.settings))

    def probe_failed(self, upstream: Upstream) -> Transition:
        return self._counted(self.state(upstream), self.state(upstream).check.failed(self.settings))

    def probe_passed(self, upstream: Upstream) -> Transition:
        return self._counted(self.state(upstream), self.state(upstream).check.passed(self.settings))

    def rejoin(self, upstream: Upstream) -> Transition:
        return self._counted(self.state(upstream), self.state(upstream).check.rejoin())

    @staticmethod
    def _counted(state: UpstreamState, transition: Transition) -> Transition:
        if transition is Transition.WENT_DOWN:
            state.downs += 1
        return transition
