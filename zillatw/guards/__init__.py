"""Guards: what authorizes a session and what a `guarded` route asks of it.

One module per guard type, as for bindings (zillatw.protocols). Each module gives:

- SCHEMA_PATCH: the JSON Schema a `guards.<name>` entry of that type must satisfy;
- check(name, options) (optional): extra checks yielding (sub-path under the guard, message);
- build(namespace, name, options, graph): the guard object (see Guard).

A Session is what a guard grants for one set of credentials: who (identity), which roles,
until when. Routes test it with `permits(route.guarded, session, namespace, headers)`, as
Zilla does: every guard a route names must have authorized the session, with every role the
route lists. A role may be dynamic (Zilla's "dynamic guarded routes"): `${method}` and
`${path}` are replaced with the request's before the check, so `${method}${path}` asks a
token for the role `GET/items` on `GET /items`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Iterator, Mapping
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


# The placeholders of a dynamic role, and the request header each is replaced with.
ROLE_PLACEHOLDERS = {"${method}": ":method", "${path}": ":path"}
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")


def check_roles(roles: tuple[str, ...] | list[str]) -> Iterator[tuple[int, str]]:
    """(index, problem) for each role with a placeholder Zilla does not resolve."""
    for index, role in enumerate(roles):
        for placeholder in _PLACEHOLDER.findall(role):
            if placeholder not in ROLE_PLACEHOLDERS:
                from zillatw.errors import did_you_mean
                yield index, (f"unknown placeholder '{placeholder}'{did_you_mean(placeholder, ROLE_PLACEHOLDERS)} "
                              f"(a dynamic role may use {' and '.join(ROLE_PLACEHOLDERS)})")


def resolve_role(role: str, headers: Mapping[str, str] | None) -> str:
    """The role a request asks for: `${method}` is its method, `${path}` its path without the
    query (Zilla substitutes the whole :path, query included, so a `?access_token=` would
    make the role unmatchable). Without a request a dynamic role stays as written, which no
    token should hold."""
    if headers is None or "${" not in role:
        return role
    values = {"${method}": headers.get(":method", ""), "${path}": headers.get(":path", "").partition("?")[0]}
    for placeholder, value in values.items():
        role = role.replace(placeholder, value)
    return role


def permits(guarded: Mapping[str, tuple[str, ...]], session: Session | None, namespace: str,
            headers: Mapping[str, str] | None = None) -> bool:
    """Zilla's route check: every guard named authorized the session, with all the roles,
    dynamic ones resolved against the request's `headers` (pseudo-headers included)."""
    if not guarded:
        return True
    if session is None:
        return False
    for guard, roles in guarded.items():
        qualified = guard if ":" in guard else f"{namespace}:{guard}"
        if qualified != session.guard:
            return False
        if not all(resolve_role(role, headers) in session.roles for role in roles):
            return False
    return True


def build_guard(type_: str, namespace: str, name: str, options: Mapping[str, Any], graph: Any) -> Any:
    return guard_types()[type_].build(namespace, name, options, graph)
