"""The kernel's part of plain HTTP proxying: the rest of a long Content-Length body moved
socket to socket (zillatw.twistedcompat.Splice, splice(2)) when both ends allow it: the
reading end's connection is plain TCP with only pass-through wrappers before its protocol,
and the writing end provides ISpliceSink and has a socket to give (docs/http.md)."""

from __future__ import annotations

from typing import Any

from zillatw.stream import splice_sink_of
from zillatw.twistedcompat import CAN_SPLICE, SPLICE_MIN, Splice, SpliceOwner, plain_tcp, received_counts

__all__ = ["CAN_SPLICE", "SPLICE_MIN", "splice_rest"]


def splice_rest(transport: Any, protocol: Any, sink_end: Any, length: int, owner: SpliceOwner) -> Splice | None:
    """The next `length` bytes `transport` reads for `protocol`, spliced to the socket
    `sink_end` would write them to, `owner` told of it; None when either side cannot."""
    source = plain_tcp(transport)
    if source is None:
        return None
    reads = received_counts(source, protocol)
    if reads is None:
        return None
    sink = splice_sink_of(sink_end)  # last: an end that gives its socket writes no more itself
    if sink is None:
        return None
    return Splice(source, sink.transport, length, owner, reads, sink.counts)
