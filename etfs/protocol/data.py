"""Data connections between servers: a small framed hello, then fixed binary block messages.

After `DataHello` (connector -> acceptor) and `DataReady`/`DataError` (from the source),
the destination sends `REQUEST`s and the source answers each with a `BLOCK` header,
``length`` raw bytes (moved with sendfile or read+send, received with recv+write or
splice) and a `DIGEST` trailer: xxh3-64 of the block, or 0 when not asked for.
Nothing here does I/O.
"""

from __future__ import annotations

import struct

import msgspec

from .connection import HEADER as LENGTH

__all__ = ["LENGTH"]

MAX_BLOCK = 16 * 1024 * 1024

REQUEST = struct.Struct(">QQI")  # offset, length, flags
BLOCK = struct.Struct(">QQI")  # offset, length, status (0 = ok; then length bytes follow)
DIGEST = struct.Struct(">Q")
JOURNAL = struct.Struct(">IQ")  # block index, digest: one entry per finished block

FLAG_DIGEST = 1  # send the block's xxh3-64 in the trailer
FLAG_DONE = 2  # no more requests on this connection
STATUS_RANGE = 1  # the requested range is outside the file
STATUS_STALE = 2  # the source file changed (size or mtime) since the capability was issued


class DataHello(msgspec.Struct, frozen=True, tag_field="t", tag="hello"):
    kind: str  # "pull": token is a capability; "push": token is the destination's ticket
    token: bytes
    transfer_id: str
    stream: int


class DataReady(msgspec.Struct, frozen=True, tag_field="t", tag="ready"):
    size: int
    mtime_ns: int


class DataError(msgspec.Struct, frozen=True, tag_field="t", tag="error"):
    errno: int
    message: str
    code: str = ""  # an `etfs.protocol.transfer.FailureCode` value


_enc = msgspec.msgpack.Encoder()
_hello = msgspec.msgpack.Decoder(DataHello)
_reply = msgspec.msgpack.Decoder(DataReady | DataError)


def encode(msg: DataHello | DataReady | DataError) -> bytes:
    body = _enc.encode(msg)
    return LENGTH.pack(len(body)) + body


def decode_hello(body: bytes) -> DataHello:
    hello = _hello.decode(body)
    if hello.kind not in ("pull", "push"):
        raise msgspec.ValidationError(f"unknown data connection kind {hello.kind!r}")
    return hello


def decode_reply(body: bytes) -> DataReady | DataError:
    return _reply.decode(body)


def timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO."""
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))
