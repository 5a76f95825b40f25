"""Test support for zillatw.wire: frames built and read here, independently of the code
under test, so a test's bytes mean what RFC 6455 says and not what the core thinks."""

from __future__ import annotations

import struct
from typing import Any

from zillatw.wire import Connection, Failed, Fragment, Role

MASK = b"\x37\xfa\x21\x3d"


def xor(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def raw_frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0, mask: bytes | None = MASK,
              length_form: int | None = None) -> bytes:
    """One frame as bytes; `rsv` is the RSV bits (4 = RSV1); `length_form` 16 or 64
    forces that length encoding (minimal or not); a server's frames pass mask=None."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    size = len(payload)
    bit = 0x80 if mask is not None else 0
    if length_form == 64 or (length_form is None and size > 0xFFFF):
        head = struct.pack("!BBQ", first, bit | 127, size)
    elif length_form == 16 or (length_form is None and size > 125):
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BB", first, bit | size)
    if mask is None:
        return head + payload
    return head + mask + xor(payload, mask)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def read_frames(data: bytes) -> list[tuple[bool, int, int, bytes]]:
    """Whole frames in `data` as (fin, rsv bits, opcode, unmasked payload)."""
    frames = []
    pos = 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        size, pos = second & 0x7F, pos + 2
        if size == 126:
            size, pos = struct.unpack_from("!H", data, pos)[0], pos + 2
        elif size == 127:
            size, pos = struct.unpack_from("!Q", data, pos)[0], pos + 8
        mask = None
        if second & 0x80:
            mask, pos = data[pos:pos + 4], pos + 4
        payload = data[pos:pos + size]
        if len(payload) != size:
            raise AssertionError(f"truncated frame: {size} bytes announced, {len(payload)} there")
        pos += size
        frames.append((bool(first & 0x80), (first >> 4) & 7, first & 0x0F,
                       xor(payload, mask) if mask else payload))
    return frames


def sent(conn: Connection) -> list[tuple[bool, int, int, bytes]]:
    return read_frames(b"".join(conn.data_to_send()))


def server(**options: Any) -> Connection:
    return Connection(Role.SERVER, **options)


def feed(conn: Connection, *chunks: bytes) -> list[Any]:
    for chunk in chunks:
        conn.receive_data(chunk)
    return conn.events_received()


def messages(events: list[Any]) -> list[tuple[int, bytes]]:
    """Fragment events put back together into (opcode, payload) messages."""
    result: list[tuple[int, bytes]] = []
    opcode, parts = None, []
    for event in events:
        if isinstance(event, Fragment):
            if opcode is None:
                opcode = event.opcode
            parts.append(event.data)
            if event.fin:
                result.append((opcode, b"".join(parts)))
                opcode, parts = None, []
    return result


def failure_code(events: list[Any]) -> int | None:
    found = failure(events)
    return found[0] if found else None


def failure(events: list[Any]) -> tuple[int, str] | None:
    found = [e for e in events if isinstance(e, Failed)]
    return (found[0].code, found[0].reason) if found else None
