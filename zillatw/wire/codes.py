"""Opcodes, close codes and the rules on close frames (RFC 6455 §5.2, §5.5.1, §7.4)."""

from __future__ import annotations

from enum import IntEnum


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


DATA_OPCODES = frozenset((Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY))
CONTROL_OPCODES = frozenset((Opcode.CLOSE, Opcode.PING, Opcode.PONG))
# Indexed by the opcode nibble: None for the reserved ones (3-7, 11-15).
OPCODE_BY_NIBBLE: tuple[Opcode | None, ...] = tuple(
    Opcode(n) if n in Opcode._value2member_map_ else None for n in range(16))


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005           # the close frame had no code; never on the wire
    ABNORMAL = 1006            # no close frame at all; never on the wire
    INVALID_DATA = 1007        # e.g. a text message that is not UTF-8
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015       # never on the wire


MAX_REASON_BYTES = 123  # a control payload is at most 125 bytes, two of them the code

# Codes a close frame may carry, sent or received: the registered ones that have a wire
# form (1004 is reserved, 1005/1006/1015 stand for "no frame"), 3000-3999 (registered by
# libraries and frameworks) and 4000-4999 (private use). Everything else is a protocol error.
_ON_THE_WIRE = frozenset((1000, 1001, 1002, 1003, *range(1007, 1015)))


def is_wire_code(code: int) -> bool:
    """True when `code` may appear in a close frame, in either direction."""
    return code in _ON_THE_WIRE or 3000 <= code <= 4999


def clip_reason(reason: str | bytes, limit: int = MAX_REASON_BYTES) -> bytes:
    """The reason as UTF-8 of at most `limit` bytes, cut on a character boundary so the
    peer's UTF-8 check (a 1007 otherwise) passes."""
    raw = reason.encode("utf-8") if isinstance(reason, str) else reason
    if len(raw) <= limit:
        return raw
    end = limit
    # back off continuation bytes (10xxxxxx) to the start of the cut character
    while end > 0 and raw[end] & 0xC0 == 0x80:
        end -= 1
    return raw[:end]


class LocalProtocolError(Exception):
    """The caller asked for something the protocol forbids in this state (sending data
    after a close, a continuation with no message started, a control payload > 125 bytes)."""
