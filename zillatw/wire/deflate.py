"""permessage-deflate (RFC 7692): negotiating its parameters in the opening handshake
(our own parsing of Sec-WebSocket-Extensions: a few lines, and the core needs none of
Autobahn's offer classes), and compressing and inflating messages with a bound on what
inflating may allocate."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from zillatw.wire.codes import CloseCode
from zillatw.wire.frames import FrameError

NAME = "permessage-deflate"
_TAIL = b"\x00\x00\xff\xff"  # what a sync flush ends with; stripped on the wire (§7.2.1)
# zlib cannot compress with a 256-byte window (it asks for 9 at least); a peer that asks
# us for 8 gets uncompressed messages, which RFC 7692 §6 allows any message to be.
_MIN_COMPRESS_BITS = 9
INFLATE_CHUNK = 64 * 1024  # inflated bytes per zlib call: a bound on one call's allocation


class NegotiationError(ValueError):
    """A Sec-WebSocket-Extensions value we cannot accept (a client's view of a response)."""


@dataclass(frozen=True, slots=True)
class DeflateParams:
    """What was agreed, named as in RFC 7692 (server_* is the server's sending side)."""
    server_no_context_takeover: bool = False
    client_no_context_takeover: bool = False
    server_max_window_bits: int = 15
    client_max_window_bits: int = 15


def parse_extensions(header: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Sec-WebSocket-Extensions as [(name, [(param, value or None), ...]), ...] (RFC 6455
    §9.1), values unquoted. Raises NegotiationError on a malformed header."""
    extensions = []
    for item in header.split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            if len(parts) == 1:
                continue
            raise NegotiationError(f"extension without a name in {header!r}")
        params: list[tuple[str, str | None]] = []
        for part in parts[1:]:
            name, eq, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if eq and len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or (eq and not value):
                raise NegotiationError(f"malformed extension parameter {part!r}")
            params.append((name.lower(), value if eq else None))
        extensions.append((parts[0].lower(), params))
    return extensions


def _bits(value: str | None, name: str) -> int:
    if value is None or not re.fullmatch(r"[0-9]{1,2}", value) or not 8 <= int(value) <= 15:
        raise NegotiationError(f"{name} must be 8 to 15, got {value!r}")
    return int(value)


def _read(params: list[tuple[str, str | None]]) -> dict[str, str | None]:
    seen: dict[str, str | None] = {}
    for name, value in params:
        if name in seen:
            raise NegotiationError(f"{name} given twice")
        if name not in ("server_no_context_takeover", "client_no_context_takeover",
                        "server_max_window_bits", "client_max_window_bits"):
            raise NegotiationError(f"unknown {NAME} parameter {name}")
        if name.endswith("takeover") and value is not None:
            raise NegotiationError(f"{name} takes no value")
        seen[name] = value
    return seen


def server_accept(header: str | None, *, max_window_bits: int = 15, no_context_takeover: bool = False,
                  client_window_bits: int | None = None) -> tuple[DeflateParams, str] | None:
    """A server's answer to a client's offers: the first acceptable permessage-deflate
    offer as (params, Sec-WebSocket-Extensions response value), or None to decline.
    `max_window_bits` caps the client's window when the client allows it (the server's
    inflate memory) and ours always; `client_window_bits`, if lower, is the client's
    window asked for when the client allows it (RFC 7692 §7.1.2.2: its compressor's
    memory and time); `no_context_takeover` asks it of both sides."""
    if not header:
        return None
    client_cap = max_window_bits if client_window_bits is None else min(client_window_bits, max_window_bits)
    try:
        offers = parse_extensions(header)
    except NegotiationError:
        return None
    for name, params in offers:
        if name != NAME:
            continue
        try:
            offer = _read(params)
            server_bits = min(_bits(offer["server_max_window_bits"], "server_max_window_bits"), max_window_bits) \
                if "server_max_window_bits" in offer else max_window_bits
            client_bits = 15
            if "client_max_window_bits" in offer:
                value = offer["client_max_window_bits"]
                client_bits = min(15 if value is None else _bits(value, "client_max_window_bits"), client_cap)
        except NegotiationError:
            continue  # RFC 7692 §5: decline that offer, try the next
        agreed = DeflateParams(
            server_no_context_takeover=no_context_takeover or "server_no_context_takeover" in offer,
            client_no_context_takeover=no_context_takeover or "client_no_context_takeover" in offer,
            server_max_window_bits=server_bits, client_max_window_bits=client_bits)
        return agreed, response_header(agreed, server_bits_offered="server_max_window_bits" in offer,
                                       client_bits_offered="client_max_window_bits" in offer)
    return None


def response_header(params: DeflateParams, server_bits_offered: bool = False, client_bits_offered: bool = True) -> str:
    """The response value for agreed `params`: server_max_window_bits is there when it
    was asked for (accepting it, RFC 7692 §7.1.2.1) or is below 15; client_max_window_bits
    only when the client allowed it (§7.1.2.2)."""
    parts = [NAME]
    if params.server_no_context_takeover:
        parts.append("server_no_context_takeover")
    if params.client_no_context_takeover:
        parts.append("client_no_context_takeover")
    if server_bits_offered or params.server_max_window_bits < 15:
        parts.append(f"server_max_window_bits={params.server_max_window_bits}")
    if client_bits_offered and params.client_max_window_bits < 15:
        parts.append(f"client_max_window_bits={params.client_max_window_bits}")
    return "; ".join(parts)


def client_offer(*, no_context_takeover: bool = False, max_window_bits: int | None = None) -> str:
    """A client's offer; we always accept any client_max_window_bits the server picks."""
    parts = [NAME, "client_max_window_bits"]
    if no_context_takeover:
        parts += ["client_no_context_takeover", "server_no_context_takeover"]
    if max_window_bits is not None:
        parts.append(f"server_max_window_bits={max_window_bits}")
    return "; ".join(parts)


def client_accept(header: str | None, *, no_context_takeover: bool = False,
                  max_window_bits: int | None = None) -> DeflateParams | None:
    """The params a server's response agreed to (None: it declined the offer made with
    the same arguments). Raises NegotiationError when the response breaks RFC 7692 §7.1:
    the client then fails the handshake."""
    if not header:
        return None
    accepted = parse_extensions(header)
    if len(accepted) != 1 or accepted[0][0] != NAME:
        raise NegotiationError(f"the server accepted extensions we did not offer: {header}")
    response = _read(accepted[0][1])
    server_bits = _bits(response["server_max_window_bits"], "server_max_window_bits") \
        if "server_max_window_bits" in response else 15
    if max_window_bits is not None and server_bits > max_window_bits:
        raise NegotiationError(f"server_max_window_bits {server_bits} is above the {max_window_bits} offered")
    client_bits = _bits(response["client_max_window_bits"], "client_max_window_bits") \
        if "client_max_window_bits" in response else 15
    if no_context_takeover and "server_no_context_takeover" not in response:
        raise NegotiationError("the server did not accept server_no_context_takeover")
    return DeflateParams(
        server_no_context_takeover="server_no_context_takeover" in response,
        client_no_context_takeover="client_no_context_takeover" in response,
        server_max_window_bits=server_bits, client_max_window_bits=client_bits)


def can_relay(inbound: DeflateParams, inbound_is_server: bool, outbound: DeflateParams,
              outbound_is_server: bool) -> bool:
    """Whether compressed payloads read on one connection (where we are the server when
    `inbound_is_server`) may be written as they are on another: the peer's window must
    fit the next peer's, and a promise of no context takeover on the way out must be kept
    by the sender on the way in."""
    in_bits, in_reset = ((inbound.client_max_window_bits, inbound.client_no_context_takeover) if inbound_is_server
                         else (inbound.server_max_window_bits, inbound.server_no_context_takeover))
    out_bits, out_reset = ((outbound.server_max_window_bits, outbound.server_no_context_takeover)
                           if outbound_is_server
                           else (outbound.client_max_window_bits, outbound.client_no_context_takeover))
    return in_bits <= out_bits and (in_reset or not out_reset)


def can_mirror(params: DeflateParams, is_server: bool) -> bool:
    """Whether a connection that sends back exactly the messages it reads, in order, and
    nothing else (an echo) may send compressed messages back as they came, without
    inflating them into a compressor of its own.

    RFC 7692 §7.2.3 makes each direction's compression one LZ77 stream: a message may
    refer back to what the sender's earlier compressed messages held, and the receiver
    reads it with the window of what it inflated before. When only the peer's own
    messages come back, compressed as they went and in the same order, what the peer's
    inflater has seen is what its compressor has, byte for byte (uncompressed messages go
    through neither), so its back references find the same bytes. That holds as long as
    the peer's window fits the one it reads ours with, and, if we promised no context
    takeover, the peer reset its context too (`can_relay` from the connection to itself).
    The mirror then compresses nothing of its own: a message of ours in the stream would
    add to the peer's inflater window what its compressor never saw.

    Never with a 256-byte window for ours: zlib compresses with 512 bytes when asked for
    256, so a peer's own data could refer further back than its inflater reads (and we
    send such a peer nothing compressed anyway)."""
    ours = params.server_max_window_bits if is_server else params.client_max_window_bits
    return ours >= _MIN_COMPRESS_BITS and can_relay(params, is_server, params, is_server)


class Deflater:
    """Our sending side: one message at a time, each fragment flushed so a relayed
    fragment goes out as one frame (its trailing 00 00 ff ff stripped at message end)."""

    def __init__(self, window_bits: int, no_context_takeover: bool, level: int = 6):
        self.enabled = window_bits >= _MIN_COMPRESS_BITS
        self._bits = window_bits
        self._reset = no_context_takeover
        self._level = level
        # made on the first message: a compressor holds about 260 KiB (window and hash
        # chains), and most connections of a gateway are idle
        self._z: "zlib._Compress | None" = None

    def _new(self) -> "zlib._Compress":
        return zlib.compressobj(self._level, zlib.DEFLATED, -self._bits, 8)

    def compress(self, data: bytes, fin: bool) -> bytes:
        z = self._z
        if z is None:
            z = self._z = self._new()
        out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
        if fin:
            if out.endswith(_TAIL):
                out = out[:-4]
            if self._reset:
                self._z = None  # a fresh window per message; also frees it while idle
        return out


class Inflater:
    """The peer's messages inflated piece by piece; the caller says how much may come
    out, so a deflate bomb never allocates more than the message limit."""

    def __init__(self, no_context_takeover: bool):
        # Always the largest window: valid for any peer's (a smaller negotiated one only
        # bounds what the peer uses), and robust to old zlibs that compress with 9 bits
        # when asked for 8.
        self._reset = no_context_takeover
        self._z: "zlib._Decompress | None" = None

    def inflate(self, data: bytes, end_of_message: bool, allowance: int | None) -> list[bytes]:
        """The inflated pieces of `data` (each at most INFLATE_CHUNK bytes); FrameError
        1009 once more than `allowance` bytes (None: no limit) would come out, 1007 for
        data that is not deflate."""
        z = self._z
        if z is None:
            z = self._z = zlib.decompressobj(-15)
        if end_of_message:
            data += _TAIL
        pieces = []
        try:
            while True:
                step = INFLATE_CHUNK if allowance is None else min(INFLATE_CHUNK, allowance + 1)
                out = z.decompress(data, step)
                if allowance is not None:
                    allowance -= len(out)
                    if allowance < 0:
                        raise FrameError(CloseCode.MESSAGE_TOO_BIG, "inflated message over the size limit")
                if out:
                    pieces.append(out)
                data = z.unconsumed_tail
                # a full `step` may leave output inside zlib even when the input is all read
                if not data and len(out) < step:
                    break
        except zlib.error as e:
            raise FrameError(CloseCode.INVALID_DATA, f"invalid compressed data: {e}") from None
        if end_of_message and self._reset:
            self._z = None
        return pieces
