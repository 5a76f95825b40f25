"""Guards: what authorizes a session and what a `guarded` route asks of it.

One module per guard type, as for bindings (zillatw.protocols). Each module gives:

- SCHEMA_PATCH: the JSON Schema a `guards.<name>` entry of that type must satisfy;
- check(name, options) (optional): extra checks yielding (sub-path under the guard, message);
- build(namespace, name, options, graph): the guard object (see Guard).

A Session is what a guard grants for one set of credentials: who (identity), which roles,
until when. Routes test it with `permits(route.guarded, session)`, as Zilla does: every guard
a route names must have authorized the session, with every role the route lists.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from twisted.internet.defer import Deferred

GUARD_TYPES = {
    "jwt": "zillatw.guards.jwt",
    "x509": "zillatw.guards.x509",
}


def guard_types() -> dict[str, ModuleType]:
    return {name: importlib.import_module(module) for name, module in GUARD_TYPES.items()}


@dataclass(frozen=True, slots=True)
class Session:
    """An authorized session: the guard (qualified `namespace:name`) that granted it."""
    guard: str
    identity: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    expires_at: float = math.inf  # epoch seconds; the session ends then (leeway included)


class Rejected(Exception):
    """Credentials a guard refuses; `reason` is for the event log, never the client."""

    def __init__(self, reason: str, identity: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.identity = identity


class Guard(Protocol):
    name: str       # qualified namespace:name
    challenge: float | None

    def authorize(self, credentials: str, trace_id: int = 0) -> "Session | Deferred[Session]":
        """A Session, or a Deferred of one while keys are being fetched; raise (or fail with)
        Rejected when the credentials do not verify."""


@dataclass(frozen=True, slots=True)
class Authorization:
    """What the http server learned of a request's credentials, for routing and statuses:
    no credentials (401 if nothing routes), rejected ones (403), or a session (404)."""
    session: Session | None = None
    credentials_found: bool = False
    guarded: bool = True  # False when the http server has no authorization configured

    @property
    def refusal(self) -> tuple[int, str]:
        """The status for a request that no route took."""
        if not self.guarded or self.session is not None:
            return 404, "Not Found"
        if not self.credentials_found:
            return 401, "Unauthorized"
        return 403, "Forbidden"


NO_AUTHORIZATION = Authorization(guarded=False)


def connection_authorization(transport: Any) -> Authorization:
    """What the connection's own layers authorized: a tls server's `authorization` (the x509
    guard) leaves it on its transport, for the http server behind it; else NO_AUTHORIZATION."""
    return getattr(transport, "zillatw_authorization", NO_AUTHORIZATION)


def permits(guarded: Mapping[str, tuple[str, ...]], session: Session | None, namespace: str) -> bool:
    """Zilla's route check: every guard named authorized the session, with all the roles."""
    if not guarded:
        return True
    if session is None:
        return False
    for guard, roles in guarded.items():
        qualified = guard if ":" in guard else f"{namespace}:{guard}"
        if qualified != session.guard or not session.roles.issuperset(roles):
            return False
    return True


def build_guard(type_: str, namespace: str, name: str, options: Mapping[str, Any], graph: Any) -> Any:
    return guard_types()[type_].build(namespace, name, options, graph)
