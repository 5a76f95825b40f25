"""The http server's `options.authorization`: find a request's credentials (cookie, then
header, then query parameter, as Zilla looks them up) and have the guard authorize them.

    authorization:
      my_jwt_guard:
        credentials:
          headers:
            authorization: Bearer {credentials}
          query:
            access_token: "{credentials}"
          cookies:
            access_token: "{credentials}"

`{credentials}` captures a run of non-space characters (in a query value, up to the next
`&`); the rest of a pattern is literal and must match the whole value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from zillatw.guards import Authorization, Rejected, Session

log = Logger()
PLACEHOLDER = "{credentials}"
REDACTED = "REDACTED"
# Query parameters that carry credentials by convention (README shows `access_token` for
# browsers): redacted in what is logged or answered even where no authorization names them.
CONVENTIONAL_SECRETS = frozenset({"access_token", "id_token", "token", "jwt", "auth", "authorization",
                                  "api_key", "apikey", "password", "secret"})


def redact_target(target: str, secret_params: frozenset[str] = CONVENTIONAL_SECRETS) -> str:
    """The request target as it may be logged or echoed: the values of query parameters
    that carry credentials (names compared case-insensitively) replaced by REDACTED."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        parts.append(f"{name}={REDACTED}" if eq and unquote(name).lower() in secret_params else part)
    return f"{path}?{'&'.join(parts)}"


def credentials_pattern(pattern: str, capture: str = r"[^\s]+") -> re.Pattern[str]:
    before, _, after = pattern.partition(PLACEHOLDER)
    return re.compile(re.escape(before) + f"({capture})" + re.escape(after))


def parse_cookies(header: str | None) -> dict[str, str]:
    cookies: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def query_params(path: str) -> dict[str, str]:
    params: dict[str, str] = {}
    _, mark, query = path.partition("?")
    if mark:
        for part in query.split("&"):
            name, _, value = part.partition("=")
            params.setdefault(unquote(name), value)
    return params


class CredentialsFinder:
    """Where a request carries its credentials, from `credentials` of an authorization."""

    def __init__(self, credentials: Mapping[str, Mapping[str, str]]):
        self.cookies = [(name, credentials_pattern(p)) for name, p in (credentials.get("cookies") or {}).items()]
        self.headers = [(name.lower(), credentials_pattern(p))
                        for name, p in (credentials.get("headers") or {}).items()]
        self.query = [(name, credentials_pattern(p, r"[^&]+"))
                      for name, p in (credentials.get("query") or {}).items()]

    def find(self, headers: Mapping[str, str]) -> str | None:
        if self.cookies:
            cookies = parse_cookies(headers.get("cookie"))
            for name, pattern in self.cookies:
                if name in cookies and (match := pattern.fullmatch(cookies[name])):
                    return match.group(1)
        for name, pattern in self.headers:
            value = headers.get(name)
            if value is not None and (match := pattern.fullmatch(value)):
                return match.group(1)
        if self.query:
            params = query_params(headers.get(":path", ""))
            for name, pattern in self.query:
                if name in params and (match := pattern.fullmatch(params[name])):
                    return unquote(match.group(1))
        return None


class HttpAuthorization:
    """One http server's authorization: its guard and where credentials are found."""

    def __init__(self, guard: Any, credentials: Mapping[str, Mapping[str, str]]):
        self.guard = guard
        self.finder = CredentialsFinder(credentials)
        self.secret_params = CONVENTIONAL_SECRETS | {name.lower() for name in credentials.get("query") or {}}

    def authorize(self, headers: Mapping[str, str], trace_id: int = 0) -> "Authorization | Deferred[Authorization]":
        """What the request's credentials are worth; a Deferred while the guard fetches keys."""
        credentials = self.finder.find(headers)
        if credentials is None:
            return Authorization(None, credentials_found=False)
        try:
            result = self.guard.authorize(credentials, trace_id)
        except Rejected:
            return Authorization(None, credentials_found=True)
        except Exception:  # a guard's bug must refuse the request, not break the connection
            log.failure("zillatw: guard failed while authorizing")
            return Authorization(None, credentials_found=True)
        if isinstance(result, Deferred):
            return result.addCallbacks(_granted, _refused)
        return _granted(result)


def _granted(session: Session) -> Authorization:
    return Authorization(session, credentials_found=True)


def _refused(failure: Any) -> Authorization:
    if not failure.check(Rejected):
        log.failure("zillatw: guard failed while authorizing", failure)
    return Authorization(None, credentials_found=True)


# What h2 quotes in its errors (a header's name or value, as a bytes or str repr)
_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')


def without_values(error: str) -> str:
    """h2's error text without what it quotes: a refused header's value may be a credential
    (an `authorization` with a byte HTTP/2 refuses), and the text goes to events and logs."""
    return _QUOTED.sub("(not shown)", error)
