"""Data connections between servers: a greeting that proves the listener, a small framed hello,
then fixed binary block messages.

The connector may be pointed anywhere by a client, so it sends nothing a client chose
until the listener has proven it is an etfs data port that knows the transfer's secret
(the capability's secret on a pull, the destination's ticket on a push):

1. connector -> `OPEN`: magic, the key id (derived from the secret), a fresh nonce;
2. listener -> `GREETING`: magic, status, its nonce, HMAC(secret, listener, key id, both nonces)
   (status `GREET_UNKNOWN`: no such key here, and no MAC);
3. connector -> `DataHello`, carrying its own proof (HMAC with the roles swapped);
4. source -> `DataReady` or `DataError`; then the destination sends `REQUEST`s and the
   source answers each with a `BLOCK` header, ``length`` raw bytes (sendfile or read+send,
   received with recv+write or splice) and a `TRAILER`: xxh3-64 of the block (0 when not
   asked for) and a status (`STATUS_STALE` when the file changed while the block was sent).

Nothing here does I/O: `acceptor` is the listener's side as a generator its driver feeds.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Generator

import msgspec

from .connection import HEADER as LENGTH

__all__ = ["LENGTH"]

MAX_BLOCK = 16 * 1024 * 1024

REQUEST = struct.Struct(">QQI")  # offset, length, flags
BLOCK = struct.Struct(">QQI")  # offset, length, status (0 = ok; then length bytes follow)
TRAILER = struct.Struct(">QI")  # digest, status (0 = the file did not change while it was sent)
JOURNAL = struct.Struct(">IQ")  # block index, digest: one entry per finished block

FLAG_DIGEST = 1  # send the block's xxh3-64 in the trailer
FLAG_DONE = 2  # no more requests on this connection
FLAG_END = 4  # with FLAG_DONE: the transfer has every block (the capability is used up)
STATUS_RANGE = 1  # the requested range is outside the file
STATUS_STALE = 2  # the source file changed (dev, ino, size, mtime or ctime) since the capability was issued

MAGIC = b"ETFSDAT2"
OPEN = struct.Struct(">8s16s16s")  # magic, key id, connector nonce
GREETING = struct.Struct(">8sB16s32s")  # magic, status, listener nonce, listener MAC
GREET_OK = 0
GREET_UNKNOWN = 1  # this port has no such key (not issued here, or forgotten)
MAX_HELLO = 65536


class DataProtocolError(ValueError):
    """The peer does not speak the data protocol (or not with the right secret)."""


class DataHello(msgspec.Struct, frozen=True, tag_field="t", tag="hello"):
    kind: str  # "pull": token is a capability; "push": token is the destination's ticket
    token: bytes
    transfer_id: str
    stream: int
    proof: bytes = b""  # HMAC(secret, connector, key id, nonces): the connector knows the secret too
    destination: str = ""  # pull: where the destination writes (a capability is bound to one)
    streams: int = 0  # pull: how many data connections the transfer opens in all


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


def key_id(secret: bytes) -> bytes:
    """Names a secret on the wire without revealing it."""
    return hmac.new(secret, b"etfs-data-key-id", hashlib.sha256).digest()[:16]


def _mac(secret: bytes, role: bytes, kid: bytes, nc: bytes, nl: bytes) -> bytes:
    return hmac.new(secret, b"etfs-data\0" + role + kid + nc + nl, hashlib.sha256).digest()


def opener(secret: bytes) -> tuple[bytes, bytes]:
    """(the connector's first bytes, its nonce): nothing in them was chosen by a client."""
    nonce = secrets.token_bytes(16)
    return OPEN.pack(MAGIC, key_id(secret), nonce), nonce


def check_greeting(secret: bytes, nonce: bytes, raw: bytes) -> bytes:
    """The connector's check of the listener's greeting; returns the proof to put in the hello.

    Raises DataProtocolError unless the listener proved it knows ``secret``; LookupError
    when it is an etfs data port that does not know the key.
    """
    magic, status, nl, mac = GREETING.unpack(raw)
    if magic != MAGIC:
        raise DataProtocolError("not an etfs data port")
    kid = key_id(secret)
    if status == GREET_UNKNOWN:
        raise LookupError("the data port does not know this capability or ticket")
    if status != GREET_OK or not hmac.compare_digest(mac, _mac(secret, b"listener", kid, nonce, nl)):
        raise DataProtocolError("the data port did not prove it knows the secret")
    return _mac(secret, b"connector", kid, nonce, nl)


# What a listener's driver does next: read this many bytes (int) or send these (bytes).
Step = int | bytes


def acceptor(
    lookup: Callable[[bytes], bytes | None],
) -> Generator[Step, bytes, tuple[DataHello, bytes] | None]:
    """The listener's side of the opening, sans I/O: yields steps, ends with (hello, key id).

    Ends with None after refusing an unknown key; raises DataProtocolError on anything else
    that is not a proper etfs connector with the secret.
    """
    magic, kid, nc = OPEN.unpack((yield OPEN.size))
    if magic != MAGIC:
        raise DataProtocolError("not an etfs data connection")
    secret = lookup(kid)
    if secret is None:
        yield GREETING.pack(MAGIC, GREET_UNKNOWN, bytes(16), bytes(32))
        return None
    nl = secrets.token_bytes(16)
    yield GREETING.pack(MAGIC, GREET_OK, nl, _mac(secret, b"listener", kid, nc, nl))
    (length,) = LENGTH.unpack((yield LENGTH.size))
    if length > MAX_HELLO:
        raise DataProtocolError("oversized data-connection hello")
    hello = decode_hello((yield length))
    if not hmac.compare_digest(hello.proof, _mac(secret, b"connector", kid, nc, nl)):
        raise DataProtocolError("the connector did not prove it knows the secret")
    return hello, kid


def timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO."""
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))
