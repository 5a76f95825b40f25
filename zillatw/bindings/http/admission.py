"""What the http server decides about a request, whichever version carried it: its
authority with the scheme's default port, the guard's authorization, the refusal when no
route takes it, and the event of an accepted request. The HTTP/1.1 connection
(zillatw.bindings.http.binding) and the HTTP/2 one (zillatw.bindings.http.h2server) call
these so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from zillatw.guards import Authorization, Session, connection_authorization
from zillatw.wire.http1 import HttpError, check_host

if TYPE_CHECKING:
    from zillatw.bindings.http.binding import HttpServer


def authority_with_port(host: str, secure: bool) -> str:
    """Zilla's :authority: the Host (or HTTP/2 :authority) with the scheme's default port
    added when none is given."""
    bracket = host.rfind("]")
    if host.rfind(":") <= bracket:
        return f"{host}:{443 if secure else 80}"
    return host


def h2_authority(headers: dict[str, str], secure: bool) -> str | None:
    """An HTTP/2 request's `:authority` (or `host`) checked as an HTTP/1.1 Host is, then its
    `:authority` and `:scheme` set as an HTTP/1.1 request's would be: what refuses it (400),
    or None."""
    authority = headers.get(":authority") or headers.get("host")
    try:
        check_host(authority)
    except HttpError as e:
        return e.reason.replace("the Host header", "the :authority")
    headers.pop("host", None)
    if authority:
        headers[":authority"] = authority_with_port(authority, secure)
    headers[":scheme"] = "https" if secure else "http"  # what carried it, as HTTP/1.1's
    return None


def authorize(factory: "HttpServer", headers: Mapping[str, str], transport: Any,
              trace_id: int) -> "Authorization | Deferred[Authorization]":
    """The request's authorization: the http server's guard's (a Deferred while it fetches
    keys), else what the connection's own layers authorized (a tls server's x509 guard)."""
    if factory.authorization is None:
        return connection_authorization(transport)
    return factory.authorization.authorize(headers, trace_id)


def authorize_then(factory: "HttpServer", headers: Mapping[str, str], transport: Any, trace_id: int,
                   then: Callable[[Authorization], None]) -> None:
    """`then(authorization)`: at once, or once the guard has fetched its keys (an HTTP/2
    stream's DATA waits unacknowledged meanwhile)."""
    authorization = authorize(factory, headers, transport, trace_id)
    if isinstance(authorization, Deferred):
        authorization.addCallback(then)
    else:
        then(authorization)


Refusal = tuple[int, str, tuple[tuple[str, str], ...]]  # status, reason, extra response headers


def no_route(authorization: Authorization, method: str, shown_target: str) -> Refusal:
    """The answer when no route takes the request: 404, or the guard's 401/403."""
    status, text = authorization.refusal
    reason = f"no route for {method} {shown_target}" if status == 404 else text
    return status, reason, (("WWW-Authenticate", "Bearer"),) if status == 401 else ()


def routed(factory: "HttpServer", headers: dict[str, str], authorization: Authorization, method: str,
           shown_target: str, refuse: Callable[..., None]) -> Any:
    """The exit the server's routes pick for the request, or None once `refuse(status,
    reason, headers)` has answered that none takes it (404, or the guard's 401/403)."""
    exit_ = factory.route(headers, authorization.session)
    if exit_ is None:
        refuse(*no_route(authorization, method, shown_target))
    return exit_


def emit_accepted(factory: "HttpServer", trace_id: int, method: str, shown_target: str,
                  headers: Mapping[str, str], session: Session | None) -> None:
    if not factory.events.enabled:
        return  # no exporter: not even the line is made (every plain request passes here)
    identity = session.identity if session is not None and session.identity is not None else "-"
    factory.events.emit(factory.namespace, factory.name, trace_id, "BINDING_HTTP_REQUEST_ACCEPTED",
                        f"{identity} {method} {headers[':scheme']}://{headers.get(':authority', '')}{shown_target}",
                        {"identity": None if identity == "-" else identity, "method": method,  # json
                         "scheme": headers[":scheme"], "authority": headers.get(":authority"),
                         "path": shown_target})


def emit_rejected(factory: "HttpServer", trace_id: int, status: int, reason: str, detail: str = "") -> None:
    factory.events.emit(factory.namespace, factory.name, trace_id, "BINDING_HTTP_REQUEST_REJECTED",
                        f"- {status} {reason} ({detail})" if detail else f"- {status} {reason}",
                        {"identity": None, "status": status, "reason": reason})
