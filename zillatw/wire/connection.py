"""One WebSocket connection after its opening handshake, sans-IO: bytes in with
receive_data(), events out with events_received(), bytes to write with data_to_send()
(RFC 6455 §5-§7, RFC 7692). Timers, sockets and flow control are the caller's: the core
holds no more than a frame head (14 bytes) or a control frame (131 bytes) of unread input,
plus what the chosen Delivery asks it to gather (bounded by the frame and message limits).
"""

from __future__ import annotations

import struct
from enum import Enum

from autobahn.websocket.utf8validator import Utf8Validator

from zillatw.wire.codes import CloseCode, LocalProtocolError, Opcode, clip_reason, is_wire_code
from zillatw.wire.deflate import DeflateParams, Deflater, Inflater, can_mirror
from zillatw.wire.events import CloseReceived, Event, Failed, Fragment, Ping, Pong
from zillatw.wire.frames import FIN, RSV1, FrameError, apply_mask, encode_frame, parse_head, rotate_mask
from zillatw.wire.state import MAY_SEND_DATA, State, Transition, next_state

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
_JOIN_BELOW = 1024  # head and payload go as one bytes below this size: a copy is cheaper than a write
_TEXT, _BINARY, _CONTINUATION = Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION
_OPCODES = {1: Opcode.TEXT, 2: Opcode.BINARY}
_HEAD = struct.Struct("!BB")


def _view(data: bytes, start: int, end: int) -> bytes | memoryview:
    """data[start:end] for the masker to read: big payloads are not copied first."""
    return memoryview(data)[start:end] if end - start > _JOIN_BELOW else data[start:end]


class Role(Enum):
    SERVER = "server"   # reads masked frames, writes unmasked ones (RFC 6455 §5.1)
    CLIENT = "client"


class Delivery(Enum):
    STREAM = "stream"     # each piece of a frame as it arrives: nothing gathered
    FRAME = "frame"       # each frame's payload whole (at most max_frame_size)
    MESSAGE = "message"   # each message whole (at most max_message_size)


class Connection:
    """The protocol state of one connection in `role`.

    `deflate`: the permessage-deflate parameters agreed in the handshake, or None.
    `max_frame_size` / `max_message_size` (None: no limit): a frame or message over them
    fails the connection with 1009 as soon as its length is known, or while inflating.
    `auto_pong`: answer pings (they are surfaced as Ping events either way).
    `answer_close`: echo the peer's close code at once; otherwise the state stays
    CLOSE_RECEIVED until the caller calls send_close().
    `inspect`: inflate compressed messages and check their text. Without, compressed
    payloads are delivered as they came (Fragment.compressed), for a relay that forwards
    them with send_fragment(..., compressed=True) to a peer whose parameters fit
    (deflate.can_relay); uncompressed text is still checked (it costs no inflating, and
    keeps failing fast at the first invalid byte).
    `defer_failure`: when the peer breaks the protocol, the Failed event comes as always,
    but the connection stays OPEN and our close frame is not queued until the caller calls
    complete_failure(): a relay handling the events in order can still send what answers
    the valid ones before it (an echo of a message read in the same batch as a bad frame).
    `gather` (Delivery.STREAM only): a frame of at most this many bytes is delivered
    whole, so relayed frames keep their boundaries; larger ones stream piece by piece.
    `min_compress_size`: messages whose first fragment is smaller go uncompressed.
    `mirror`: the caller sends back exactly the messages it reads, in order, and nothing
    else (an echo), and the parameters allow it (deflate.can_mirror). Compressed messages
    are then inflated and checked as with `inspect`, but delivered as they came
    (Fragment.compressed), to be sent back with send_fragment(..., compressed=True); we
    compress nothing of our own, so the peer's inflater window stays its compressor's.
    """

    # slots: a gateway holds one of these per connection, most of them idle
    __slots__ = ("role", "state", "deflate", "max_frame_size", "max_message_size", "delivery", "auto_pong",
                 "answer_close", "inspect", "min_compress_size", "close_received", "close_sent", "failure",
                 "_masked_in", "_masked_out", "_rsv1_allowed", "_mask_bit", "_small_limit", "_events", "_out",
                 "_reading", "_buf", "_remaining", "_frame_fin", "_mask", "_offset", "_msg_opcode",
                 "_msg_compressed", "_msg_size", "_next_opcode", "_parts", "_utf8", "_utf8_whole",
                 "_send_opcode", "_send_deflating", "_deflater", "_inflater", "gather", "_frame_whole",
                 "_msg_text", "defer_failure", "_failing", "mirror", "_utf8_fresh")

    def __init__(self, role: Role, *, deflate: DeflateParams | None = None,
                 max_frame_size: int | None = None, max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
                 delivery: Delivery = Delivery.STREAM, auto_pong: bool = True, answer_close: bool = True,
                 inspect: bool = True, min_compress_size: int = 0, gather: int = 0,
                 defer_failure: bool = False, mirror: bool = False):
        self.role = role
        self.state = State.OPEN
        self.deflate = deflate
        self.max_frame_size = max_frame_size or None
        self.max_message_size = max_message_size or None
        self.delivery = delivery
        self.auto_pong = auto_pong
        self.answer_close = answer_close
        self.inspect = inspect
        self.min_compress_size = min_compress_size
        self.gather = gather
        self.defer_failure = defer_failure
        if mirror and deflate is not None and not can_mirror(deflate, role is Role.SERVER):
            raise ValueError(f"the permessage-deflate parameters {deflate} do not allow a mirror")
        self.mirror = mirror
        self._failing = False         # a deferred failure's close frame is still to be queued
        self._frame_whole = False     # the frame being read is gathered (see `gather`)
        self._msg_text = False        # the message being read is text to check
        self.close_received: tuple[int, str] | None = None   # the peer's (code, reason)
        self.close_sent: tuple[int, str] | None = None       # ours
        self.failure: tuple[CloseCode, str] | None = None    # why we failed the connection
        self._masked_in = role is Role.SERVER
        self._masked_out = role is Role.CLIENT
        self._rsv1_allowed = deflate is not None
        self._mask_bit = 0x80 if self._masked_in else 0
        # the fast path's bound: frames over a limit take the long way, which refuses them
        self._small_limit = min(self.max_frame_size or 125, self.max_message_size or 125, 125)
        self._events: list[Event] = []
        self._out: list[bytes] = []
        self._reading = True
        self._buf = b""               # an incomplete frame head or control frame
        # the data frame being read
        self._remaining = 0
        self._frame_fin = False
        self._mask: bytes | None = None
        self._offset = 0
        # the message being read
        self._msg_opcode: int | None = None
        self._msg_compressed = False
        self._msg_size = 0
        self._next_opcode = _TEXT
        self._parts: list[bytes] = []
        self._utf8: Utf8Validator | None = None
        self._utf8_whole = True       # the text so far ends on a character boundary
        self._utf8_fresh = False      # the text message begun has had no byte checked yet
        # the message being sent
        self._send_opcode: int | None = None
        self._send_deflating = False   # our deflater compresses the message being sent
        self._deflater: Deflater | None = None
        self._inflater: Inflater | None = None
        if deflate is not None:
            server = role is Role.SERVER
            if not mirror:  # a mirror compresses nothing of its own
                self._deflater = Deflater(deflate.server_max_window_bits if server else deflate.client_max_window_bits,
                                          deflate.server_no_context_takeover if server
                                          else deflate.client_no_context_takeover)
            self._inflater = Inflater(deflate.client_no_context_takeover if server
                                      else deflate.server_no_context_takeover)

    # ---- reading

    @property
    def may_send(self) -> bool:
        """Data, pings and pongs may still be sent (OPEN or CLOSE_RECEIVED). A binding
        checks it before relaying: a Failed event may have closed the connection in the
        same batch as the fragments before it."""
        return self.state in MAY_SEND_DATA

    @property
    def message_in_progress(self) -> bool:
        """A message from the peer has begun and not ended."""
        return self._msg_opcode is not None

    # One function per frame on purpose (noqa): splitting it into steps adds calls to every frame,
    # which bench/wire_micro.py measures (parse 64 B is about one microsecond).
    def receive_data(self, data: bytes) -> None:  # noqa: C901
        """Bytes from the transport; what they mean is then in events_received()."""
        if not self._reading:
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        pos, end = 0, len(data)
        events = self._events
        try:
            while pos < end and self._reading:
                remaining = self._remaining
                if remaining:  # inside a data frame's payload
                    take = end - pos if end - pos < remaining else remaining
                    if self._mask is not None:
                        chunk = apply_mask(_view(data, pos, pos + take), rotate_mask(self._mask, self._offset))
                        self._offset += take
                    else:
                        chunk = data[pos:pos + take] if pos or take != end else data
                    pos += take
                    self._remaining = remaining - take
                    self._payload(chunk, remaining == take)
                    continue
                first = data[pos]
                if (first == 0x82 or first == 0x81) and end - pos > 1 and self._msg_opcode is None:
                    # the common case, without parse_head: a whole small message, FIN set,
                    # RSV clear, 7-bit length, masked as it must be, all here
                    second = data[pos + 1]
                    if second & 0x80 == self._mask_bit and second & 0x7F < 126:
                        start = pos + 6 if self._mask_bit else pos + 2
                        stop = start + (second & 0x7F)
                        if stop <= end and stop - start <= self._small_limit:
                            payload = (apply_mask(data[start:stop], data[start - 4:start]) if self._mask_bit
                                       else data[start:stop])
                            if first == 0x81:
                                try:
                                    payload.decode("utf-8")
                                except UnicodeDecodeError:
                                    raise FrameError(CloseCode.INVALID_DATA, "text message is not UTF-8") from None
                            events.append(Fragment(_TEXT if first == 0x81 else _BINARY, payload, True))
                            pos = stop
                            continue
                head = parse_head(data, pos, self._masked_in, self._rsv1_allowed)
                if head is None:
                    self._buf = data[pos:]
                    return
                first, length, start, mask = head
                opcode = first & 0x0F
                if opcode >= 0x8:
                    if end - start < length:
                        self._buf = data[pos:]  # a control frame is read whole: at most 131 bytes
                        return
                    payload = data[start:start + length]
                    pos = start + length
                    self._control(opcode, apply_mask(payload, mask) if mask is not None else payload)
                    continue
                if self.max_frame_size is not None and length > self.max_frame_size:
                    raise FrameError(CloseCode.MESSAGE_TOO_BIG,
                                     f"frame of {length} bytes over the limit of {self.max_frame_size}")
                fin = first & FIN
                if opcode:
                    if self._msg_opcode is not None:
                        raise FrameError(CloseCode.PROTOCOL_ERROR, "a new message began inside a fragmented one")
                    if first & RSV1 == 0 and fin and end - start >= length:
                        # the common case: a whole message in one frame, all here
                        if self.max_message_size is not None and length > self.max_message_size:
                            raise FrameError(CloseCode.MESSAGE_TOO_BIG, self._too_big(length))
                        pos = start + length
                        payload = data[start:pos] if mask is None else apply_mask(_view(data, start, pos), mask)
                        if opcode == 1:
                            try:
                                payload.decode("utf-8")
                            except UnicodeDecodeError:
                                raise FrameError(CloseCode.INVALID_DATA, "text message is not UTF-8") from None
                        events.append(Fragment(_OPCODES[opcode], payload, True))
                        continue
                    self._begin_message(opcode, bool(first & RSV1))
                else:
                    if self._msg_opcode is None:
                        raise FrameError(CloseCode.PROTOCOL_ERROR, "continuation frame with no message begun")
                    if first & RSV1:
                        raise FrameError(CloseCode.PROTOCOL_ERROR, "RSV1 set on a continuation frame")
                if not (self._msg_compressed and self.inspect):  # inflated sizes are counted while inflating
                    if self.max_message_size is not None and self._msg_size + length > self.max_message_size:
                        raise FrameError(CloseCode.MESSAGE_TOO_BIG, self._too_big(self._msg_size + length))
                    self._msg_size += length
                self._frame_fin = bool(fin)
                self._frame_whole = 0 < length <= self.gather
                self._mask = mask
                self._offset = 0
                self._remaining = length
                pos = start
                if length == 0:
                    self._payload(b"", True)
        except FrameError as e:
            self._fail(e.code, e.reason)

    def receive_eof(self) -> None:
        """The transport ended. Without a close frame before it, close_received stays
        None: the stream's other side is told CloseCode.ABNORMAL."""
        self.state = next_state(self.state, Transition.EOF)
        self._reading = False

    def events_received(self) -> list[Event]:
        """The events since the last call, in order."""
        events = self._events
        if events:
            self._events = []
        return events

    def _too_big(self, size: int) -> str:
        return f"message of {size} bytes or more over the limit of {self.max_message_size}"

    def _begin_message(self, opcode: int, compressed: bool) -> None:
        self._msg_opcode = self._next_opcode = _OPCODES[opcode]
        self._msg_compressed = compressed
        self._msg_size = 0
        self._msg_text = opcode == 1 and (self.inspect or not compressed)
        # the validator is set up on the first bytes that need it: a message inflated
        # whole in one piece is checked by bytes.decode, much faster
        self._utf8_fresh = self._msg_text

    def _payload(self, chunk: bytes, frame_done: bool) -> None:
        """Some of a data frame's payload, unmasked; `frame_done`: the frame's last piece."""
        last = frame_done and self._frame_fin
        if self._msg_compressed and self.inspect:
            assert self._inflater is not None  # RSV1 is only accepted with permessage-deflate
            limit = self.max_message_size
            pieces = self._inflater.inflate(chunk, last, None if limit is None else limit - self._msg_size)
            for piece in pieces:
                self._msg_size += len(piece)
        else:
            pieces = [chunk] if chunk else []
        if self._msg_text:
            if self._utf8_fresh and last and len(pieces) <= 1:
                # the whole message at once, the common case: bytes.decode, no state to keep
                try:
                    if pieces:
                        pieces[0].decode("utf-8")
                except UnicodeDecodeError:
                    raise FrameError(CloseCode.INVALID_DATA, "text message is not UTF-8") from None
            else:
                self._check_text(pieces, last)
        compressed = self._msg_compressed and (self.mirror or not self.inspect)
        if compressed and self.inspect:  # a mirror's: inflated and checked, it goes on as it came
            pieces = [chunk] if chunk else []
        if self.delivery is Delivery.STREAM and not self._frame_whole:
            events = self._events
            if pieces:
                for piece in pieces[:-1]:
                    events.append(Fragment(self._next_opcode, piece, False, compressed))
                    self._next_opcode = _CONTINUATION
                events.append(Fragment(self._next_opcode, pieces[-1], last, compressed))
                self._next_opcode = _CONTINUATION
            elif last or not chunk:  # an empty frame is a fragment too (not a piece of one)
                events.append(Fragment(self._next_opcode, b"", last, compressed))
                self._next_opcode = _CONTINUATION
        else:
            self._parts.extend(pieces)
            if last or (frame_done and self.delivery is not Delivery.MESSAGE):
                parts, self._parts = self._parts, []
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                self._events.append(Fragment(self._next_opcode, data, last, compressed))
                self._next_opcode = _CONTINUATION
        if last:
            self._msg_opcode = None

    def _check_text(self, pieces: list[bytes], last: bool) -> None:
        """Text that comes in pieces: Autobahn's validator, failing at the first bad byte."""
        utf8 = self._utf8
        if self._utf8_fresh:
            self._utf8_fresh = False
            if utf8 is None:
                utf8 = self._utf8 = Utf8Validator()  # type: ignore[no-untyped-call]  # (autobahn is untyped)
            else:
                utf8.reset()  # type: ignore[no-untyped-call]
            self._utf8_whole = True
        assert utf8 is not None  # made on the message's first bytes
        validate = utf8.validate
        for piece in pieces:
            valid, self._utf8_whole, _, _ = validate(piece)  # type: ignore[no-untyped-call]
            if not valid:
                raise FrameError(CloseCode.INVALID_DATA, "text message is not UTF-8")
        if last and not self._utf8_whole:
            raise FrameError(CloseCode.INVALID_DATA, "text message ends inside a UTF-8 character")

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == Opcode.PING:
            self._events.append(Ping(payload))
            if self.auto_pong and self.state in MAY_SEND_DATA:
                self._out.append(self._control_frame(Opcode.PONG, payload))
        elif opcode == Opcode.PONG:
            self._events.append(Pong(payload))
        else:
            self._receive_close(payload)

    def _receive_close(self, payload: bytes) -> None:
        code: int
        if not payload:
            code, reason = CloseCode.NO_STATUS, ""
        elif len(payload) == 1:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
        else:
            code = int.from_bytes(payload[:2], "big")
            if not is_wire_code(code):
                raise FrameError(CloseCode.PROTOCOL_ERROR, f"close code {code} is not allowed in a close frame")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise FrameError(CloseCode.INVALID_DATA, "close reason is not UTF-8") from None
        self.close_received = (code, reason)
        self.state = next_state(self.state, Transition.RECEIVE_CLOSE)
        self._reading = False  # nothing after a close frame is read (RFC 6455 §5.5.1)
        self._events.append(CloseReceived(code, reason))
        if self.state is State.CLOSE_RECEIVED and self.answer_close:
            self.send_close(code, reason)

    def _fail(self, code: CloseCode, reason: str) -> None:
        self.failure = (code, reason)
        self._reading = False
        self._buf = b""
        self._parts = []
        self._events.append(Failed(code, reason))
        self._failing = True
        if not self.defer_failure:
            self.complete_failure()

    def complete_failure(self) -> None:
        """After a Failed event with `defer_failure`: queue our close frame with its code
        and close. Does nothing when there is no failure still to complete."""
        if not self._failing:
            return
        self._failing = False
        assert self.failure is not None  # _fail set both
        code, reason = self.failure
        if self.state in MAY_SEND_DATA:
            self.close_sent = (code, reason)
            self._out.append(self._control_frame(Opcode.CLOSE, code.to_bytes(2, "big") + clip_reason(reason)))
        self.state = next_state(self.state, Transition.FAIL)

    # ---- writing

    def data_to_send(self) -> list[bytes]:
        """The bytes to write since the last call, as chunks for writeSequence."""
        out = self._out
        if out:
            self._out = []
        return out

    def send_fragment(self, opcode: Opcode | int, data: bytes, fin: bool = True, compressed: bool = False) -> None:
        """Queue a message fragment (see encode_fragment)."""
        self._out.extend(self.encode_fragment(opcode, data, fin, compressed))

    def encode_fragment(self, opcode: Opcode | int, data: bytes, fin: bool = True,
                        compressed: bool = False) -> list[bytes]:
        """A message fragment as chunks to write (not queued): TEXT or BINARY begins a
        message, CONTINUATION goes on with it, `fin` ends it. Each call is one frame, so
        a relay keeps the fragments it is given. `compressed`: `data` is already
        permessage-deflate, from a peer whose parameters fit (a relay's passthrough)."""
        if self.state not in MAY_SEND_DATA:
            raise LocalProtocolError(f"cannot send data in state {self.state.value}")
        rsv1 = False
        if opcode == _CONTINUATION:
            if self._send_opcode is None:
                raise LocalProtocolError("a continuation with no message begun")
            if self._send_deflating:  # (a message begun compressed by the caller goes on as it is)
                assert self._deflater is not None  # _send_deflating is only set with one
                data = self._deflater.compress(data, fin)
        elif opcode == _TEXT or opcode == _BINARY:
            if self._send_opcode is not None:
                raise LocalProtocolError("a new message begun before the last one ended")
            self._send_deflating = False
            if compressed:
                if self.deflate is None:
                    raise LocalProtocolError("compressed data on a connection without permessage-deflate")
                rsv1 = True
            elif self._deflater is not None and self._deflater.enabled and len(data) >= self.min_compress_size:
                rsv1 = self._send_deflating = True
                data = self._deflater.compress(data, fin)
        else:
            raise LocalProtocolError(f"opcode {opcode} is not a data opcode: use send_ping/send_pong/send_close")
        self._send_opcode = None if fin else opcode if opcode else self._send_opcode
        if not self._masked_out and len(data) < 126:  # the common case: no mask, one byte of length
            return [_HEAD.pack((opcode | FIN if fin else opcode) | (RSV1 if rsv1 else 0), len(data)) + data]
        head, payload = encode_frame(opcode, data, fin, self._masked_out, rsv1)
        if len(payload) < _JOIN_BELOW:
            return [head + payload]
        return [head, payload]

    def send_ping(self, data: bytes = b"") -> None:
        self._send_control(Opcode.PING, data)

    def send_pong(self, data: bytes = b"") -> None:
        self._send_control(Opcode.PONG, data)

    def send_close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Our close frame: CloseCode.NO_STATUS sends one without a code; other codes
        must be ones a close frame may carry (codes.is_wire_code); the reason is clipped
        to 123 bytes. After it the state is CLOSE_SENT (the caller's close timeout runs)
        or CLOSED (the peer's close came first)."""
        if code == CloseCode.NO_STATUS:
            payload = b""
        elif is_wire_code(code):
            payload = code.to_bytes(2, "big") + clip_reason(reason)
        else:
            raise LocalProtocolError(f"close code {code} may not be sent in a close frame")
        self.state = next_state(self.state, Transition.SEND_CLOSE)
        self.close_sent = (code, reason)
        self._out.append(self._control_frame(Opcode.CLOSE, payload))
        if self.state is State.CLOSED:
            self._reading = False

    def _send_control(self, opcode: Opcode, data: bytes) -> None:
        if self.state not in MAY_SEND_DATA:
            raise LocalProtocolError(f"cannot send a {opcode.name.lower()} in state {self.state.value}")
        if len(data) > 125:
            raise LocalProtocolError(f"a {opcode.name.lower()} payload is at most 125 bytes, got {len(data)}")
        self._out.append(self._control_frame(opcode, data))

    def _control_frame(self, opcode: Opcode, payload: bytes) -> bytes:
        head, payload = encode_frame(opcode, payload, True, self._masked_out)
        return head + payload

