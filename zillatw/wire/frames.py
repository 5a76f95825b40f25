"""WebSocket frames (RFC 6455 §5.2): head parsing with every framing rule, head encoding,
masking. Plain functions over bytes; zillatw.wire.connection gives them meaning."""

from __future__ import annotations

import os
import struct

from zillatw.wire.codes import OPCODE_BY_NIBBLE, CloseCode, Opcode

FIN, RSV1, RSV2, RSV3 = 0x80, 0x40, 0x20, 0x10
MASKED = 0x80
MAX_CONTROL_PAYLOAD = 125
MAX_HEAD = 14  # 2 + 8 (64-bit length) + 4 (mask)

_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")
_HEAD = struct.Struct("!BB")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


class FrameError(Exception):
    """The peer broke a framing rule: fail the connection with `code`."""

    def __init__(self, code: CloseCode, reason: str):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def _py_apply_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
    size = len(data)
    if not size:
        return b""
    key = int.from_bytes((mask * ((size + 3) >> 2))[:size], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(size, "little")


try:
    # websockets' C masker (~0.1 µs for 64 B); the fallback above is correct, only slower.
    from websockets.speedups import apply_mask as apply_mask
except ImportError:  # pragma: no cover - depends on what is installed
    apply_mask = _py_apply_mask


def rotate_mask(mask: bytes, offset: int) -> bytes:
    """The mask as it applies to payload bytes from `offset` on (a frame read in pieces)."""
    shift = offset & 3
    return mask[shift:] + mask[:shift] if shift else mask


def parse_head(data: bytes, pos: int, expect_masked: bool, rsv1_allowed: bool
               ) -> tuple[int, int, int, bytes | None] | None:
    """The head of the frame at data[pos:]: (first byte, payload length, payload start,
    mask or None), or None when the head has not all arrived. Raises FrameError for
    what RFC 6455 §5.2 forbids: reserved bits (RSV1 only when `rsv1_allowed`, for
    permessage-deflate), reserved opcodes, a mask bit other than `expect_masked` (§5.1),
    a non-minimal or 63-bit-overflowing length, and control frames that are fragmented or
    longer than 125 bytes. Message-level rules (continuations) are the caller's."""
    available = len(data) - pos
    if available < 2:
        return None
    first = data[pos]
    second = data[pos + 1]
    if first & (RSV2 | RSV3) or (first & RSV1 and not rsv1_allowed):
        raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits set with no extension negotiated for them")
    opcode = OPCODE_BY_NIBBLE[first & 0x0F]
    if opcode is None:
        raise FrameError(CloseCode.PROTOCOL_ERROR, f"reserved opcode {first & 0x0F}")
    if bool(second & MASKED) != expect_masked:
        raise FrameError(CloseCode.PROTOCOL_ERROR,
                         "client frames must be masked" if expect_masked else "server frames must not be masked")
    length = second & 0x7F
    if opcode >= 0x8:
        _check_control(first, length)
    start = pos + 2
    if length == 126:
        if available < 4:
            return None
        length = _LEN16.unpack_from(data, start)[0]
        if length < 126:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "16-bit length used for a payload under 126 bytes")
        start += 2
    elif length == 127:
        if available < 10:
            return None
        length = _length64(data, start)
        start += 8
    if expect_masked:
        if len(data) < start + 4:
            return None
        return first, length, start + 4, data[start:start + 4]
    return first, length, start, None


# Out of parse_head, the rules for the heads that are rare next to data frames under 64 KiB: a
# control frame's, a 64-bit length's. The common head pays no call for them.

def _check_control(first: int, length: int) -> None:
    if not first & FIN:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
    if length > MAX_CONTROL_PAYLOAD:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "control frame longer than 125 bytes")
    if first & RSV1:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "compressed control frame")


def _length64(data: bytes, start: int) -> int:
    length: int = _LEN64.unpack_from(data, start)[0]
    if length >> 63:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "64-bit length with its most significant bit set")
    if length < 0x10000:
        raise FrameError(CloseCode.PROTOCOL_ERROR, "64-bit length used for a payload under 64 KiB")
    return length


def frame_head(first: int, length: int, mask: bytes | None = None) -> bytes:
    """The head bytes of a frame whose first byte (FIN, RSV, opcode) is `first`."""
    mask_bit = MASKED if mask is not None else 0
    if length < 126:
        head = _HEAD.pack(first, mask_bit | length)
    elif length < 0x10000:
        head = _HEAD16.pack(first, mask_bit | 126, length)
    else:
        head = _HEAD64.pack(first, mask_bit | 127, length)
    return head + mask if mask is not None else head


def encode_frame(opcode: Opcode | int, payload: bytes, fin: bool = True, masked: bool = False,
                 rsv1: bool = False) -> tuple[bytes, bytes]:
    """One frame as (head, payload), ready for writeSequence without a concatenation;
    `masked` (a client's frames, RFC 6455 §5.3) with a fresh random mask."""
    first = opcode | (FIN if fin else 0) | (RSV1 if rsv1 else 0)
    if masked:
        mask = os.urandom(4)
        return frame_head(first, len(payload), mask), apply_mask(payload, mask)
    return frame_head(first, len(payload)), payload
