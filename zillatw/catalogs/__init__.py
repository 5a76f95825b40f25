"""Catalogs: where the schemas that models validate against come from.

One module per catalog type, each describing itself with a `PLUGIN` record
(zillatw.config.plugins.CatalogType: its schema patch, checks of the entry and of the schema
references models make, and build(); the catalog object is used by zillatw.catalogs.validation).

A catalog hands out SchemaHandles: one per (subject, version) or id, shared by every stream
that uses it. A handle is ready when it holds a schema (`value`); `ensure()` fetches it when
it is not (a Deferred that never fails; a fetch in flight is shared, so however many streams
ask at once, one request goes out) and `current()` gives the value for a message, starting a
background refresh once it is older than the catalog's `max-age` (stale-while-revalidate: a
registry that is down leaves the cached schema in use).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed


@dataclass(frozen=True, slots=True)
class Resolved:
    """A schema as the catalog gave it: its id (None for inline subjects) and its text."""
    id: int | None
    text: str


class SchemaHandle:
    """A handle on one schema of a catalog; see the module docstring."""

    __slots__ = ("describe", "value", "error", "_fetch", "_seconds", "_max_age", "_fetched_at", "_retry_at",
                 "_backoff", "_waiting", "fetches")

    def __init__(self, describe: str, fetch: Callable[[], Deferred] | None, seconds: Callable[[], float],
                 max_age: float, value: Resolved | None = None):
        self.describe = describe          # for events: "subject orders version latest", "id 7"
        self.value = value
        self.error: str | None = None
        self._fetch = fetch               # None: static (inline); else -> Deferred[Resolved]
        self._seconds = seconds
        self._max_age = max_age           # math.inf: never refreshed (ids are immutable)
        self._fetched_at = seconds() if value is not None else 0.0
        self._retry_at = 0.0
        self._backoff = 0.0
        self._waiting: list[Deferred] | None = None
        self.fetches = 0

    def current(self) -> Resolved | None:
        """The schema for a message now; a stale one starts a refresh in the background."""
        if self._fetch is not None and self._waiting is None:
            now = self._seconds()
            if now - self._fetched_at >= self._max_age and now >= self._retry_at:
                self._start()
        return self.value

    def ensure(self) -> Deferred:
        """Fires (never fails) once the handle holds a schema or a fetch has failed."""
        if self.value is not None:  # a refresh in flight does not hold anyone up
            self.current()
            return succeed(self.value)
        if self._fetch is None:
            return succeed(None)
        if self._waiting is None:
            if self._seconds() < self._retry_at:  # failed a moment ago: do not hammer the registry
                return succeed(None)
            self._start()
            if self._waiting is None:  # the fetch ended at once
                return succeed(self.value)
        d: Deferred = Deferred()
        self._waiting.append(d)  # type: ignore[union-attr]
        return d

    def _start(self) -> None:
        self._waiting = []
        self.fetches += 1
        try:
            fetching = self._fetch()  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - a bug in a fetch must not wedge the handle
            fetching = Deferred()
            fetching.errback(e)
        fetching.addCallbacks(self._fetched, self._failed)

    def _fetched(self, value: Resolved) -> None:
        self.value, self.error = value, None
        self._fetched_at = self._seconds()
        self._backoff = 0.0
        self._settle()

    def _failed(self, failure: Any) -> None:
        self.error = failure.getErrorMessage() or failure.type.__name__
        # Retry after 1 s, doubling up to max-age; meanwhile the cached value (if any) serves.
        self._backoff = min(max(self._backoff * 2, 1.0), max(self._max_age, 1.0))
        self._retry_at = self._seconds() + self._backoff
        self._settle()

    def _settle(self) -> None:
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(self.value)


# The handle's former name, which zillatw.catalogs.validation still imports.
Schema = SchemaHandle


class Unavailable(Exception):
    """A schema the catalog cannot provide now (registry down, unknown subject or id)."""
