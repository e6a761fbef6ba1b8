"""Sans-IO state machine of one control connection: bytes in, typed messages out.

Frames are a 4-byte big-endian length followed by a msgpack body (one message).
`Connection` knows the framing, the message types each side may send, and the
handshake order; it never touches a socket (the trio adapter in `etfs.protocol.
trio_stream` does).  Errors are split the h11 way: `LocalProtocolError` when *we* try
to send something invalid, `RemoteProtocolError` when the peer did.  A remote error
with ``fatal=False`` spoiled one message only (framing is intact), so a server can
answer it and keep serving the connection.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgspec

from . import messages as m

HEADER = struct.Struct(">I")
MAX_FRAME = 24 * 1024 * 1024  # a Write of up to 16 MiB plus headroom
# Before login a peer may send only Hello/Prove (or Challenge/Welcome/Err): small messages.
# Anyone who can open a TCP connection reaches this limit, so it is kept tight.
PREAUTH_MAX_FRAME = 64 * 1024


class ProtocolError(Exception):
    pass


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid."""

    def __init__(self, message: str, *, fatal: bool = True, request_id: int = 0) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.request_id = request_id


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    HANDSHAKE = "handshake"  # before Hello/Challenge
    AUTH = "auth"  # Challenge seen/sent, waiting for Prove/Welcome
    READY = "ready"
    CLOSED = "closed"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

_encoder = msgspec.msgpack.Encoder()
_client_decoder = msgspec.msgpack.Decoder(m.ClientMessage)
_server_decoder = msgspec.msgpack.Decoder(m.ServerMessage)


def encode_frame(msg: Any) -> bytes | bytearray:
    """One length-prefixed msgpack frame (also used for data-connection headers).

    Encoded straight behind the header's room: a 1 MiB Read reply or Write request is not
    copied once more to prepend the length.
    """
    frame = bytearray(HEADER.size)
    _encoder.encode_into(msg, frame, HEADER.size)
    length = len(frame) - HEADER.size
    if length > MAX_FRAME:
        raise LocalProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    HEADER.pack_into(frame, 0, length)
    return frame


class FrameReader:
    """Cuts a byte stream into frame bodies."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame
        self.eof = False

    def feed(self, data: bytes | bytearray) -> None:
        if not data:
            self.eof = True
        self._buf += data

    def next_body(self) -> bytes | None:
        if len(self._buf) < HEADER.size:
            if self.eof and self._buf:
                raise RemoteProtocolError("connection closed inside a frame header")
            return None
        (length,) = HEADER.unpack_from(self._buf)
        if length > self.max_frame:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_frame}")
        end = HEADER.size + length
        if len(self._buf) < end:
            if self.eof:
                raise RemoteProtocolError("connection closed inside a frame")
            return None
        if end == len(self._buf):  # the usual case: nothing behind this frame yet
            body = bytes(memoryview(self._buf)[HEADER.size :])
            self._buf = bytearray()
        else:
            body = bytes(memoryview(self._buf)[HEADER.size : end])
            del self._buf[:end]
        return body

    @property
    def pending(self) -> int:
        return len(self._buf)


class _IdOnly(msgspec.Struct):
    """Just the request id of a message; msgspec skips every other field without building it."""

    id: int = 0


_id_decoder = msgspec.msgpack.Decoder(_IdOnly)


def _request_id_of(body: bytes) -> int:
    """Best effort: the id of an undecodable request, so its error can be matched.

    Never a second full decode: a frame of millions of nested empty arrays would become
    millions of Python objects (gigabytes) just to look for an id.
    """
    try:
        rid = _id_decoder.decode(body).id
    except (msgspec.MsgspecError, ValueError, RecursionError):
        # ValueError: msgspec raises UnicodeDecodeError for a str that is not UTF-8.
        return 0
    return rid if 0 < rid < 2**63 else 0


_SERVER_MAY_SEND_IN = {
    State.HANDSHAKE: (m.Challenge, m.Err),
    State.AUTH: (m.Welcome, m.Err),
    State.READY: (m.Ok, m.Err),
}
_CLIENT_MAY_SEND_IN = {
    State.HANDSHAKE: (m.Hello,),
    State.AUTH: (m.Prove,),
    State.READY: (m.Call,),
}


class Connection:
    """Framing and handshake order for one side of a control connection."""

    def __init__(self, role: Role, max_frame: int = MAX_FRAME) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        self._max_frame = max_frame
        self._reader = FrameReader(min(max_frame, PREAUTH_MAX_FRAME))
        self._decoder = _client_decoder if role is Role.SERVER else _server_decoder

    # --- incoming --------------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes read from the peer; ``b""`` means the peer closed."""
        if self.state is State.CLOSED and data:
            raise RemoteProtocolError("data after close")
        self._reader.feed(data)

    def next_event(self) -> m.Message | _NeedData | None:
        """The next complete message, `NEED_DATA`, or None once the peer has closed."""
        if self.state is State.CLOSED:
            return None
        try:
            body = self._reader.next_body()
        except RemoteProtocolError:
            self.state = State.CLOSED
            raise
        if body is None:
            if self._reader.eof:
                self.state = State.CLOSED
                return None
            return NEED_DATA
        try:
            msg = self._decoder.decode(body)
        except (msgspec.MsgspecError, ValueError, RecursionError) as exc:
            # ValueError: UnicodeDecodeError for non-UTF-8 text; RecursionError: absurd nesting.
            # The frame boundary is intact, only this message is bad.
            fatal = self.state is not State.READY
            raise RemoteProtocolError(
                f"malformed message: {exc}", fatal=fatal, request_id=_request_id_of(body)
            ) from None
        self._check_order(msg, incoming=True)
        return msg

    # --- outgoing --------------------------------------------------------------------------------
    def send(self, msg: m.Message) -> bytes | bytearray:
        """Bytes to write for ``msg``; advances the handshake state."""
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        self._check_order(msg, incoming=False)
        return encode_frame(msg)

    def _check_order(self, msg: m.Message, *, incoming: bool) -> None:
        from_server = (self.role is Role.CLIENT) == incoming
        allowed = (_SERVER_MAY_SEND_IN if from_server else _CLIENT_MAY_SEND_IN)[self.state]
        if not isinstance(msg, allowed):
            text = f"{type(msg).__name__} not allowed in state {self.state.value}"
            if incoming:
                fatal = self.state is not State.READY
                rid = msg.id if isinstance(msg, m.Call) and 0 < msg.id < 2**63 else 0
                raise RemoteProtocolError(text, fatal=fatal, request_id=rid)
            raise LocalProtocolError(text)
        # Handshake progress: Hello/Challenge -> AUTH, Welcome -> READY.
        if isinstance(msg, m.Challenge):
            self.state = State.AUTH
        elif isinstance(msg, m.Welcome):
            self.state = State.READY
            self._reader.max_frame = self._max_frame
        elif isinstance(msg, m.Err) and self.state is not State.READY:
            self.state = State.CLOSED

    def close(self) -> None:
        self.state = State.CLOSED
