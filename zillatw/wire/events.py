"""What the core reads from the peer, as events (drained with Connection.events_received)."""

from __future__ import annotations

from dataclasses import dataclass

from zillatw.wire.codes import CloseCode, Opcode


@dataclass(slots=True)
class Fragment:
    """A piece of a message: `opcode` is TEXT or BINARY on a message's first fragment and
    CONTINUATION after; `fin` ends the message. With Delivery.MESSAGE a fragment is the
    whole message, with Delivery.FRAME one frame's payload, with Delivery.STREAM whatever
    of a frame has arrived. `compressed` only when the connection does not inspect
    payloads: `data` is then the message's permessage-deflate bytes as they came."""
    opcode: Opcode
    data: bytes
    fin: bool
    compressed: bool = False


@dataclass(slots=True)
class Ping:
    data: bytes


@dataclass(slots=True)
class Pong:
    data: bytes


@dataclass(slots=True)
class CloseReceived:
    """The peer's close frame: `code` is CloseCode.NO_STATUS when it carried none."""
    code: int
    reason: str


@dataclass(slots=True)
class Failed:
    """The peer broke the protocol or a limit: our close frame with `code` is queued, the
    connection is CLOSED and nothing more is read (RFC 6455 §7.1.7)."""
    code: CloseCode
    reason: str


Event = Fragment | Ping | Pong | CloseReceived | Failed
