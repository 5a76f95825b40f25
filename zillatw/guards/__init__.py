"""Guards: what authorizes a session and what a `guarded` route asks of it.

One module per guard type, each describing itself with a `PLUGIN` record
(zillatw.config.plugins.GuardType). A guard's `authorize(credentials, trace_id)` returns a Session,
or a Deferred of one while keys are being fetched, and raises (or fails with) Rejected when
the credentials do not verify; `challenge` is how many seconds before expiry a session is
told to re-authorize (None: never).

A Session is what a guard grants for one set of credentials: who (identity), which roles,
until when. Routes test it with `permits(route.guarded, session, namespace, headers)`, as
Zilla does: every guard a route names must have authorized the session, with every role the
route lists. A role may be dynamic (Zilla's "dynamic guarded routes"): `${method}` and
`${path}` are replaced with the request's before the check, so `${method}${path}` asks a
token for the role `GET/items` on `GET /items`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
