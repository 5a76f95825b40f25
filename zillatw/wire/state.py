"""A connection's closing-handshake states and every transition between them, in one
table (RFC 6455 §5.5.1, §7): what the caller may send and what the core still reads
follow from the state alone."""

from __future__ import annotations

from enum import Enum

from zillatw.wire.codes import LocalProtocolError


class State(Enum):
    OPEN = "open"
    # We sent our close frame and wait for the peer's: the caller's close timeout runs
    # here; data frames from the peer are still delivered, nothing more may be sent.
    CLOSE_SENT = "close-sent"
    # The peer's close frame arrived and ours has not gone yet (only when the caller
    # answers closes itself): the caller may finish a message, then must send_close().
    CLOSE_RECEIVED = "close-received"
    # Both close frames exchanged, or the connection failed, or the transport ended:
    # nothing more is read or sent. A server closes the TCP connection now (RFC 6455 §7.1.1),
    # a client waits a little for the server to do so.
    CLOSED = "closed"


class Transition(Enum):
    SEND_CLOSE = "send-close"
    RECEIVE_CLOSE = "receive-close"
    FAIL = "fail"          # a protocol error: our close frame (if any) goes, then nothing
    EOF = "eof"            # the transport ended


TRANSITIONS: dict[tuple[State, Transition], State] = {
    (State.OPEN, Transition.SEND_CLOSE): State.CLOSE_SENT,
    (State.OPEN, Transition.RECEIVE_CLOSE): State.CLOSE_RECEIVED,
    (State.OPEN, Transition.FAIL): State.CLOSED,
    (State.OPEN, Transition.EOF): State.CLOSED,
    (State.CLOSE_SENT, Transition.RECEIVE_CLOSE): State.CLOSED,
    (State.CLOSE_SENT, Transition.FAIL): State.CLOSED,
    (State.CLOSE_SENT, Transition.EOF): State.CLOSED,
    (State.CLOSE_RECEIVED, Transition.SEND_CLOSE): State.CLOSED,
    (State.CLOSE_RECEIVED, Transition.FAIL): State.CLOSED,
    (State.CLOSE_RECEIVED, Transition.EOF): State.CLOSED,
    (State.CLOSED, Transition.EOF): State.CLOSED,
}

MAY_SEND_DATA = frozenset((State.OPEN, State.CLOSE_RECEIVED))
MAY_RECEIVE = frozenset((State.OPEN, State.CLOSE_SENT))


def next_state(state: State, transition: Transition) -> State:
    try:
        return TRANSITIONS[state, transition]
    except KeyError:
        raise LocalProtocolError(f"cannot {transition.value} in state {state.value}") from None
