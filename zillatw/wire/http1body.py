"""Sans-IO HTTP/1.1 message bodies (RFC 9112 §6-7): which framing a head says its body has,
an incremental decoder (bytes in, body pieces out) and the encoder's pieces.

Bounded everywhere: a chunk-size line is at most MAX_CHUNK_LINE bytes (extensions
included), the trailer section at most MAX_TRAILER_BYTES (its fields are read and
dropped: nothing downstream asks for them), and a decoder may be given a body limit. The
decoder never holds body bytes: each `feed` returns the pieces of body in what it was
given (slices of it), so memory is one read's worth whatever the body's size.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping

MAX_CHUNK_LINE = 4096      # bytes of a chunk-size line with its extensions
MAX_TRAILER_BYTES = 8192   # bytes of the trailer section (read and dropped)
MAX_CHUNK_SIZE_DIGITS = 15  # hex digits of a chunk size (< 2**60: no overflow games)
_DIGITS = re.compile(r"^[0-9]+$")
_HEX = re.compile(rb"^[0-9A-Fa-f]+$")


class Framing(enum.Enum):
    NONE = "none"            # no body (length 0, HEAD, 1xx/204/304)
    LENGTH = "length"        # Content-Length
    CHUNKED = "chunked"      # Transfer-Encoding: chunked
    UNTIL_CLOSE = "close"    # a response read until the connection closes


class BodyError(ValueError):
    """The body (or the head's framing headers) breaks RFC 9112; the text says how, for the
    client's 400 or the event."""


def one_decimal_length(value: str) -> int | None:
    """A Content-Length that is one plain decimal number (the usual case), else None: what
    the http express lane takes as it is, and _content_length before its list rule."""
    return int(value) if value.isdigit() and len(value) <= 18 and value.isascii() else None


def _content_length(value: str) -> int:
    size = one_decimal_length(value)
    if size is not None:
        return size  # the usual case, checked as the slow path would
    # RFC 9110 §8.6: a list of identical values may be taken as one; anything else is refused.
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not _DIGITS.match(next(iter(values))) or len(next(iter(values))) > 18:
        raise BodyError("Content-Length must be one decimal number")
    return int(next(iter(values)))


def request_framing(headers: Mapping[str, str]) -> tuple[Framing, int]:
    """A request's body framing (RFC 9112 §6.3) and its length (0 unless LENGTH). Both
    Transfer-Encoding and Content-Length, or a coding other than chunked alone, is refused:
    the ambiguity request smuggling lives on."""
    coding = headers.get("transfer-encoding")
    length = headers.get("content-length")
    if coding is not None:
        if length is not None:
            raise BodyError("both Transfer-Encoding and Content-Length")
        if coding.strip().lower() != "chunked":
            raise BodyError(f"Transfer-Encoding {coding[:40]!r} is not supported (only chunked)")
        return Framing.CHUNKED, 0
    if length is None:
        return Framing.NONE, 0
    size = _content_length(length)
    return (Framing.LENGTH, size) if size else (Framing.NONE, 0)


def response_framing(headers: Mapping[str, str], status: int, request_method: str) -> tuple[Framing, int]:
    """A response's body framing (RFC 9112 §6.3): none after HEAD or for 1xx/204/304;
    chunked when the coding ends in chunked; Content-Length; else until close."""
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return Framing.NONE, 0
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.split(",")[-1].strip().lower() != "chunked":
            return Framing.UNTIL_CLOSE, 0
        return Framing.CHUNKED, 0
    length = headers.get("content-length")
    if length is None:
        return Framing.UNTIL_CLOSE, 0
    size = _content_length(length)
    return (Framing.LENGTH, size) if size else (Framing.NONE, 0)


class _State(enum.Enum):
    SIZE = 1       # reading a chunk-size line
    DATA = 2       # inside a chunk (or a Content-Length body)
    DATA_END = 3   # the CRLF after a chunk's data
    TRAILER = 4    # the trailer section
    DONE = 5


class BodyDecoder:
    """Feed bytes; get the body's pieces back. `done` once the body is complete; `rest`
    then holds what followed it (the next pipelined request). `received` counts body bytes;
    `max_body` (None: no limit) refuses a longer body with BodyError."""

    __slots__ = ("framing", "max_body", "received", "done", "rest", "_state", "_remaining", "_line", "_trailer")

    def __init__(self, framing: Framing, length: int = 0, max_body: int | None = None):
        self.framing = framing
        self.max_body = max_body
        self.received = 0
        self.rest = b""
        self._line = bytearray()   # a partial chunk-size line or trailer line (bounded)
        self._trailer = 0
        if framing is Framing.LENGTH:
            if max_body is not None and length > max_body:
                raise BodyError(f"body of {length} bytes is over the limit of {max_body}")
            self._state, self._remaining = _State.DATA, length
        elif framing is Framing.CHUNKED:
            self._state, self._remaining = _State.SIZE, 0
        elif framing is Framing.UNTIL_CLOSE:
            self._state, self._remaining = _State.DATA, -1
        else:
            self._state, self._remaining = _State.DONE, 0
        self.done = self._state is _State.DONE

    def feed(self, data: bytes) -> list[bytes]:
        """The body pieces in `data` (possibly none); raises BodyError on a framing error."""
        if self._state is _State.DATA and self._remaining < 0:  # until close: all of it
            self._count(len(data))
            return [data] if data else []
        pieces: list[bytes] = []
        view = memoryview(data)
        at, end = 0, len(data)
        while at < end:
            state = self._state
            if state is _State.DATA:
                take = min(self._remaining, end - at)
                pieces.append(data if take == end and at == 0 else bytes(view[at:at + take]))
                self._count(take)
                at += take
                self._remaining -= take
                if self._remaining == 0:
                    if self.framing is Framing.LENGTH:
                        self._finish(data, at)
                        break
                    self._state = _State.DATA_END
            elif state is _State.SIZE or state is _State.DATA_END or state is _State.TRAILER:
                newline = data.find(b"\n", at)
                stop = end if newline < 0 else newline + 1
                self._line += view[at:stop]
                at = stop
                if newline < 0:
                    self._check_line_bound()
                    break
                # CRLF or a bare LF ends a line (RFC 9112 §2.2), as the head parser takes it
                line = bytes(self._line[:-2] if self._line.endswith(b"\r\n") else self._line[:-1])
                self._line.clear()
                self._line_done(state, line)
                if self._state is _State.DONE:
                    self._finish(data, at)
                    break
            else:
                self._finish(data, at)
                break
        return pieces

    def length_left(self) -> int:
        """The bytes a Content-Length body still has to come (0 for any other framing, or
        once it is complete): what may pass by without being fed (`skip`)."""
        if self.framing is Framing.LENGTH and self._state is _State.DATA:
            return self._remaining
        return 0

    def skip(self, size: int) -> None:
        """`size` bytes of a Content-Length body went by without being fed (moved socket to
        socket by splice(2)): counted as received; complete when they were the last."""
        if size > self.length_left():
            raise ValueError(f"skip({size}) past the {self.length_left()} bytes left of the body")
        self._count(size)
        self._remaining -= size
        if self._remaining == 0:
            self._finish(b"", 0)

    def _check_line_bound(self) -> None:
        if self._state is _State.TRAILER:
            if self._trailer + len(self._line) > MAX_TRAILER_BYTES:
                raise BodyError(f"trailer section larger than {MAX_TRAILER_BYTES} bytes")
        elif len(self._line) > MAX_CHUNK_LINE:
            raise BodyError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")

    def _line_done(self, state: _State, line: bytes) -> None:
        if state is _State.DATA_END:
            if line:
                raise BodyError("chunk data longer than its size")
            self._state = _State.SIZE
        elif state is _State.SIZE:
            if len(line) > MAX_CHUNK_LINE:
                raise BodyError(f"chunk-size line longer than {MAX_CHUNK_LINE} bytes")
            size_text = line.split(b";", 1)[0].rstrip(b" \t")
            if not _HEX.match(size_text) or len(size_text) > MAX_CHUNK_SIZE_DIGITS:
                raise BodyError("malformed chunk size")
            size = int(size_text, 16)
            if size == 0:
                self._state = _State.TRAILER
            else:
                if self.max_body is not None and self.received + size > self.max_body:
                    raise BodyError(f"body over the limit of {self.max_body} bytes")
                self._state, self._remaining = _State.DATA, size
        else:  # a trailer line: the empty one ends the message
            if not line:
                self._state = _State.DONE
                return
            self._trailer += len(line) + 2
            if self._trailer > MAX_TRAILER_BYTES:
                raise BodyError(f"trailer section larger than {MAX_TRAILER_BYTES} bytes")
            if b":" not in line or line[:1] in b" \t" or b"\0" in line or b"\r" in line:
                raise BodyError("malformed trailer field")

    def _count(self, size: int) -> None:
        self.received += size
        if self.max_body is not None and self.received > self.max_body:
            raise BodyError(f"body over the limit of {self.max_body} bytes")

    def _finish(self, data: bytes, at: int) -> None:
        self._state = _State.DONE
        self.done = True
        self.rest = data[at:]

    def finish_at_close(self) -> None:
        """The connection closed: complete for a body read until close, else BodyError."""
        if self._state is _State.DATA and self._remaining < 0:
            self._state, self.done = _State.DONE, True
        elif not self.done:
            raise BodyError("the connection closed before the body was complete")


LAST_CHUNK = b"0\r\n\r\n"


def chunk(data: bytes) -> list[bytes]:
    """The pieces of one chunk (for writeSequence: the data itself is not copied)."""
    return [b"%x\r\n" % len(data), data, b"\r\n"]


# RFC 9110 §7.6.1: fields for one connection only, never forwarded. Content-Length and
# Transfer-Encoding go too: the body is re-framed by whoever writes it next; Host travels
# as :authority.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
                        "trailer", "proxy-authenticate", "proxy-authorization", "content-length", "host"})


def end_to_end_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers without the hop-by-hop ones, nor those the Connection header names."""
    named = headers.get("connection")
    dropped = HOP_BY_HOP if not named else HOP_BY_HOP | {t.strip().lower() for t in named.split(",")}
    return {name: value for name, value in headers.items() if name not in dropped}
