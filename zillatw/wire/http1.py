"""Sans-IO HTTP/1.1 request head parsing (RFC 9112 §2-5), bytes in, Request or HttpError out;
and, for the ws client, an upstream's response head (Response or ResponseError) by the same rules.

Only the head is parsed here: a WebSocket upgrade's connection is handed over, and a plain
request's body is framed by zillatw.wire.http1body. Limits are Zilla's: an 8 KiB header block
(431), and a request line capped likewise (414).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")
# RFC 9110 §5.5: a field value is visible characters, obs-text, SP and HTAB; any other
# control byte (VT, FF, the C0 range, DEL) makes it invalid. Refusing them also keeps every
# later reader of the head from splitting a line where this parser did not.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 §3.2.1 origin-form: an absolute path and an optional query, visible ASCII only.
_ORIGIN_FORM = re.compile(r"^/[\x21-\x7e]*$")
# RFC 9110 §7.2 / RFC 3986 §3.2.2: the Host is a host and an optional port, nothing more (no
# userinfo, no path); reg-name kept to the characters DNS names and IPv4 addresses use.
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~]+)(?::(\d{1,5}))?$")

REASONS = {
    101: "Switching Protocols", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 408: "Request Timeout", 414: "URI Too Long", 426: "Upgrade Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """The request cannot be served; `reason` tells the client what was wrong."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = headers


@dataclass(slots=True)
class Request:
    method: str
    target: str
    version: tuple[int, int]
    # header names lower-cased; duplicates joined with ", " as Zilla does
    headers: dict[str, str] = field(default_factory=dict)
    raw_head: bytes = b""
    # the target as it may be logged or answered (credentials redacted); set by the http server
    shown_target: str = ""
    # the body's framing and length (zillatw.wire.http1body.request_framing); set by the http server
    framing: tuple[Any, int] = (None, 0)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def render_response(status: int, reason: str = "", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An HTTP/1.1 error response that closes the connection, with a short plain-text body."""
    body = (reason + "\n").encode() if reason else b""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += ["Connection: close", f"Content-Length: {len(body)}"]
    if body:
        lines.append("Content-Type: text/plain; charset=utf-8")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class FieldProblem(enum.Enum):
    FOLDING = "obsolete line folding"
    MALFORMED = "a line that is not `name: value`"
    TOO_MANY = "more header lines than allowed"
    CONTROL = "a control byte in a value"


class FieldError(ValueError):
    """A header line breaking RFC 9112 §5 / RFC 9110 §5.5; each parser words it for its reader.
    `detail`: the header's name (CONTROL), or what of a malformed line can be named safely."""

    def __init__(self, problem: FieldProblem, detail: str = ""):
        super().__init__(problem, detail)
        self.problem = problem
        self.detail = detail


# A header block every line of which is well formed (a token, a colon, a value of field
# characters, a CRLF or LF end): the common case, split at once without the per-line checks
# of header_fields (which a block that does not match goes through, for the error to name).
_FIELD = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\x09\x20-\x7e\x80-\xff]*\r?\n"
_WELL_FORMED_FIELDS = re.compile(rb"(?:%s)*" % _FIELD)
_WELL_FORMED_FIELDS_AND_BLANK = re.compile(rb"(?:%s)*\r?\n" % _FIELD)


def well_formed_fields(text: str, max_headers: int) -> dict[str, str] | None:
    """header_fields' answer for lines known well formed (`text`: latin-1, LF-split, the
    trailing entries dropped); None when there are too many (header_fields says so)."""
    lines = text.split("\n")
    if len(lines) > max_headers:
        return None
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        key = name.lower()
        value = value.strip(" \t\r")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def _fields_at_once(raw_head: bytes, start: int, pattern: re.Pattern[bytes],
                    max_headers: int) -> dict[str, str] | None:
    """The header block from `start` split at once when `pattern` finds every line of it
    well formed; None: header_fields must look at it line by line."""
    if not pattern.fullmatch(raw_head, start):
        return None
    fields = raw_head[start:].decode("latin-1").rstrip("\r\n")  # the blank line, if any, is not a field
    return well_formed_fields(fields, max_headers) if fields else {}


def _split_off(buffer: bytearray, head_length: int, rest_start: int) -> tuple[bytes, bytes]:
    """A head and what follows it out of `buffer` (emptied), each copied once (a bytearray
    slice would be copied twice)."""
    view = memoryview(buffer)
    head, rest = bytes(view[:head_length]), bytes(view[rest_start:])
    view.release()
    buffer.clear()
    return head, rest


def header_fields(lines: list[bytes], max_headers: int) -> dict[str, str]:
    """The header lines of a request or response head (CRLF or LF ended, already free of bare
    CR and NUL): names lower-cased, values trimmed, duplicates joined with ", " as Zilla does."""
    headers: dict[str, str] = {}
    count = 0
    for line in lines:
        line = line.rstrip(b"\r")
        if not line:
            continue
        if line[:1] in b" \t":
            raise FieldError(FieldProblem.FOLDING)
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            # Name only what cannot be a credential: a malformed line may hold a token.
            shown = re.match(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{0,32}", line)
            raise FieldError(FieldProblem.MALFORMED, shown.group().decode("ascii") if shown else "")
        count += 1
        if count > max_headers:
            raise FieldError(FieldProblem.TOO_MANY)
        key = name.decode("ascii").lower()
        value = value.strip(b" \t")
        if _CONTROL.search(value):
            raise FieldError(FieldProblem.CONTROL, key)
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def check_origin_form(target: str) -> None:
    """Refuse a request target that is not origin-form (`/path?query`): the absolute form
    (`http://host/x`), the asterisk form and authority-like targets (`@host/x`) could choose
    what a proxy's upstream request names."""
    if "#" in target or not _ORIGIN_FORM.match(target):
        raise HttpError(400, "the request target must be a path (origin-form, starting with '/')")


def valid_host(host: str) -> bool:
    """Whether a Host is `host[:port]` (RFC 9110 §7.2)."""
    match = _HOST.match(host)
    return match is not None and (match.group(1) is None or int(match.group(1)) <= 65535)


def check_host(host: str | None) -> None:
    """Refuse a Host that is not `host[:port]` (RFC 9110 §7.2)."""
    if host is not None and not valid_host(host):
        raise HttpError(400, "the Host header must be a host name or address and an optional port")


class RequestHeadParser:
    """Feed bytes until a Request comes out; `rest` then holds the bytes that followed it."""

    @property
    def idle(self) -> bool:
        """Nothing of a head read yet, nothing left over: as good as a new parser."""
        return not self._buffer and not self.rest

    def __init__(self, max_request_line: int = 8192, max_header_bytes: int = 8192, max_headers: int = 100):
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.rest = b""
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Request | None:
        self._buffer += data
        buffer = self._buffer
        # RFC 9112 §2.2: ignore empty lines before the request line.
        while buffer[:2] == b"\r\n" or buffer[:1] == b"\n":
            del buffer[: 2 if buffer[:1] == b"\r" else 1]
        line_end = buffer.find(b"\n")
        if line_end < 0:
            if len(buffer) > self.max_request_line:
                raise HttpError(414, f"request line longer than {self.max_request_line} bytes")
            return None
        if line_end > self.max_request_line:
            raise HttpError(414, f"request line longer than {self.max_request_line} bytes")
        head_end = buffer.find(b"\r\n\r\n", line_end - 1)
        end_length = 4
        # An earlier end in bare LFs wins; searched only up to the CRLF one (not the body's bytes)
        limit = head_end + 2 if head_end >= 0 else len(buffer)
        bare = buffer.find(b"\n\n", line_end, limit)
        if bare >= 0 and (head_end < 0 or bare < head_end):
            head_end, end_length = bare, 2
        mixed = buffer.find(b"\n\r\n", line_end, limit)  # LF-terminated lines, then a CRLF blank line
        if mixed >= 0 and (head_end < 0 or mixed < head_end):
            head_end, end_length = mixed, 3
        if head_end < 0:
            # Up to 3 bytes of a still incomplete CRLF CRLF may follow a block of the limit.
            if len(buffer) - line_end > self.max_header_bytes + 3:
                raise HttpError(431, f"request headers larger than {self.max_header_bytes} bytes")
            return None
        if head_end - line_end > self.max_header_bytes:
            raise HttpError(431, f"request headers larger than {self.max_header_bytes} bytes")
        raw_head, self.rest = _split_off(buffer, head_end + end_length, head_end + end_length)
        return self._parse(raw_head)

    def _parse(self, raw_head: bytes) -> Request:
        # RFC 9112 §2.2, RFC 9110 §5.5: a bare CR or a NUL makes the element invalid (and the
        # target and subprotocol may be forwarded upstream).
        if b"\0" in raw_head or b"\r" in raw_head.replace(b"\r\n", b""):
            raise HttpError(400, "bare CR or NUL in the request head")
        first_end = raw_head.find(b"\n")
        request_line = raw_head[:first_end].rstrip(b"\r")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not all(parts):
            raise HttpError(400, "malformed request line (expected 'METHOD target HTTP/1.1')")
        method, target, version = parts
        if not _TOKEN.match(method):
            raise HttpError(400, "malformed request method")
        match = _VERSION.match(version)
        if not match:
            raise HttpError(400, f"malformed HTTP version {version.decode('latin-1')!r}")
        major, minor = int(match.group(1)), int(match.group(2))
        if major != 1:
            raise HttpError(505, f"HTTP version {major}.{minor} is not supported (expected HTTP/1.1)")
        method_text = method.decode("ascii")
        if method_text not in KNOWN_METHODS:
            raise HttpError(501, f"method {method_text} is not implemented")
        # the request's block ends with its blank line
        headers = _fields_at_once(raw_head, first_end + 1, _WELL_FORMED_FIELDS_AND_BLANK, self.max_headers)
        try:
            if headers is None:
                headers = header_fields(raw_head.split(b"\n")[1:], self.max_headers)
        except FieldError as e:
            if e.problem is FieldProblem.FOLDING:
                raise HttpError(400, "obsolete header line folding is not allowed") from None
            if e.problem is FieldProblem.MALFORMED:
                raise HttpError(400, f"malformed header line (starting {e.detail!r})" if e.detail
                                else "malformed header line") from None
            if e.problem is FieldProblem.TOO_MANY:
                raise HttpError(431, f"more than {self.max_headers} request headers") from None
            raise HttpError(400, f"the {e.detail} header contains a control character") from None
        return Request(method_text, target.decode("latin-1"), (major, minor), headers, raw_head)


# ---------------------------------------------------------------------------- responses

_STATUS_LINE = re.compile(rb"^HTTP/(\d)\.(\d) (\d{3})(?: ([\x09\x20-\x7e\x80-\xff]*))?$")


class ResponseError(ValueError):
    """An upstream's response head that breaks HTTP/1.1; the text says how (for the event log)."""


@dataclass(slots=True)
class Response:
    status: int
    reason: str
    version: tuple[int, int]
    # header names lower-cased; duplicates joined with ", "
    headers: dict[str, str] = field(default_factory=dict)


class ResponseHeadParser:
    """An upstream's response head (RFC 9112 §4), parsed with the request parser's rules:
    the same size limits, CRLF or bare LF line ends but never a bare CR or a NUL, no
    obsolete line folding, no control bytes in values. Feed bytes until a Response comes
    out; `rest` then holds what followed the head (the upstream's first frames)."""

    def __init__(self, max_status_line: int = 8192, max_header_bytes: int = 8192, max_headers: int = 100):
        self.max_status_line = max_status_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.rest = b""
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Response | None:
        buffer = self._buffer
        buffer += data
        line_end = buffer.find(b"\n")
        if line_end < 0:
            if len(buffer) > self.max_status_line:
                raise ResponseError(f"status line longer than {self.max_status_line} bytes")
            return None
        if line_end > self.max_status_line:
            raise ResponseError(f"status line longer than {self.max_status_line} bytes")
        if buffer[line_end + 1:line_end + 2] == b"\n" or buffer[line_end + 1:line_end + 3] == b"\r\n":
            head_end = line_end + 1  # no headers at all
        else:
            head_end = buffer.find(b"\n\r\n", line_end)
            # an earlier end in bare LFs wins; searched only up to the CRLF one
            bare = buffer.find(b"\n\n", line_end, head_end + 2 if head_end >= 0 else len(buffer))
            if bare >= 0 and (head_end < 0 or bare < head_end):
                head_end = bare
            if head_end >= 0:
                head_end += 1
        if head_end < 0:
            if len(buffer) - line_end > self.max_header_bytes + 3:
                raise ResponseError(f"response headers larger than {self.max_header_bytes} bytes")
            return None
        if head_end - line_end > self.max_header_bytes:
            raise ResponseError(f"response headers larger than {self.max_header_bytes} bytes")
        blank = 2 if buffer[head_end:head_end + 1] == b"\r" else 1
        raw_head, self.rest = _split_off(buffer, head_end, head_end + blank)
        return self._parse(raw_head)

    def _parse(self, raw_head: bytes) -> Response:
        if b"\0" in raw_head or b"\r" in raw_head.replace(b"\r\n", b""):
            raise ResponseError("bare CR or NUL in the response head")
        first_end = raw_head.find(b"\n")
        match = _STATUS_LINE.match(raw_head[:first_end].rstrip(b"\r"))
        if match is None:
            raise ResponseError("malformed status line (expected 'HTTP/1.1 101 ...')")
        major, minor = int(match.group(1)), int(match.group(2))
        if major != 1:
            raise ResponseError(f"HTTP version {major}.{minor} in the status line")
        headers = _fields_at_once(raw_head, first_end + 1, _WELL_FORMED_FIELDS, self.max_headers)
        try:
            if headers is None:
                headers = header_fields(raw_head.split(b"\n")[1:], self.max_headers)
        except FieldError as e:
            raise ResponseError({
                FieldProblem.FOLDING: "obsolete header line folding in the response",
                FieldProblem.MALFORMED: "malformed header line in the response",
                FieldProblem.TOO_MANY: f"more than {self.max_headers} response headers",
                FieldProblem.CONTROL: f"the {e.detail} response header contains a control character",
            }[e.problem]) from None
        return Response(int(match.group(3)), (match.group(4) or b"").decode("latin-1"), (major, minor), headers)
