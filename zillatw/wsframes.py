"""WebSocket frames (RFC 6455 §5.2) for the relay's fast path: plain functions over bytes,
no I/O, in the sans-IO manner of wsproto. Autobahn does everything else (handshake,
control frames, fragmented and compressed messages, errors)."""

from __future__ import annotations

import random
import struct

from autobahn.websocket.xormasker import create_xor_masker

try:
    # websockets' C masker: ~0.1 µs for 64 B, against ~8 µs for a new Autobahn masker
    # (cffi allocation) per frame. Optional; the fallback below is correct, only slower.
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - depends on what is installed
    _c_apply_mask = None

_HEAD = struct.Struct("!BB")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR `data` with the 4-byte `mask` repeated (masking and unmasking are the same)."""
    if _c_apply_mask is not None:
        return _c_apply_mask(data, mask)
    return _py_apply_mask(data, mask)


def _py_apply_mask(data: bytes, mask: bytes) -> bytes:
    size = len(data)
    if size < 1024:  # one big-int XOR: no per-byte Python loop, no allocation in cffi
        key = int.from_bytes((mask * ((size + 3) >> 2))[:size], "little")
        return (int.from_bytes(data, "little") ^ key).to_bytes(size, "little")
    return create_xor_masker(mask, size).process(data)


def encode_frame(opcode: int, payload: bytes, fin: bool, masked: bool) -> bytes:
    """One frame, RSV bits clear; `masked` (a client's frames) with a fresh random mask, as
    Autobahn's sendFrame does."""
    first = opcode | 0x80 if fin else opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = _HEAD.pack(first, mask_bit | size)
    elif size < 0x10000:
        head = _HEAD16.pack(first, mask_bit | 126, size)
    else:
        head = _HEAD64.pack(first, mask_bit | 127, size)
    if masked:
        key = random.getrandbits(32).to_bytes(4, "big")
        return b"".join((head, key, apply_mask(payload, key)))
    return head + payload


def whole_message(data: bytes, masked: bool, limit: int) -> tuple[int, int, int] | int | None:
    """The data frame at the start of `data` if it is a whole message (FIN set, RSV clear,
    opcode TEXT or BINARY, masked as `masked` says, minimal length encoding, payload at most
    `limit` bytes and 65535): (opcode, payload start, payload end). When such a frame has
    not fully arrived, the number of bytes it needs. Anything else is None: not ours."""
    size = len(data)
    if size < 2:
        return None
    first, second = data[0], data[1]
    if (first != 0x82 and first != 0x81) or bool(second & 0x80) != masked:
        return None
    length = second & 0x7F
    start = 2
    if length == 126:
        if size < 4:
            return None
        length = (data[2] << 8) | data[3]
        if length < 126:
            return None  # not the minimal encoding: a protocol error, Autobahn's to report
        start = 4
    elif length == 127:
        return None
    if length > limit:
        return None
    if masked:
        start += 4
    end = start + length
    if size < end:
        return end
    return first & 0x0F, start, end
