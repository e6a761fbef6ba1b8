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

Nothing here does I/O: `Listener`, `Connector`, `ReplyReader`, `BlockSource` and `BlockSink`
are state machines (bytes in, events out, like `etfs.protocol.connection`) that read exactly
the bytes of each small message, so block payloads stay in the socket for sendfile/splice;
the blocking and trio drivers in ``etfs_server/transfer`` only move bytes.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import secrets
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

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


class DataLocalError(RuntimeError):
    """We were about to break the data protocol (a bug in the driver on our side)."""


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


# --- the sans-IO machines ---------------------------------------------------------------------------
class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True)
class Opened:
    """Listener: the connector proved it knows the secret and said hello."""

    hello: DataHello
    key_id: bytes


@dataclass(frozen=True)
class Refused:
    """Listener: the connector named a key this port does not know (told so; close now)."""


@dataclass(frozen=True)
class Greeted:
    """Connector: the listener proved it knows the secret; the hello is in `data_to_send`."""


@dataclass(frozen=True)
class BlockRequest:
    """Source: send ``length`` bytes at ``offset`` (and their digest if ``digest``)."""

    offset: int
    length: int
    digest: bool


@dataclass(frozen=True)
class Done:
    """Source: no more requests; ``end``: the destination has every block of the transfer."""

    end: bool


@dataclass(frozen=True)
class BlockHeader:
    """Destination: the source's answer to the oldest request.  With status 0 and a length,
    that many payload bytes follow, which the driver moves itself (splice, recv+write) and
    then reports with `BlockSink.payload_received`; a `Trailer` follows them."""

    offset: int
    length: int
    status: int


@dataclass(frozen=True)
class Trailer:
    digest: int
    status: int


DataEvent = Opened | Refused | Greeted | DataReady | DataError | BlockRequest | Done | BlockHeader | Trailer


class DataMachine:
    """Bytes in, events out, reading exactly the bytes of the item at hand and never more.

    A data connection carries raw block payloads between its small messages; they must stay
    in the socket for sendfile/splice, so the driver asks `wanted` and receives at most that
    many bytes (0: nothing to read now).  ``b""`` means the peer closed.  Responses the
    protocol makes to what came in wait in `data_to_send`.
    """

    def __init__(self) -> None:
        self._want = 0
        self._buf = bytearray()
        self._out = bytearray()
        self._events: deque[DataEvent] = deque()
        self._on_item: Callable[[bytes], None] | None = None

    def _expect(self, size: int, on_item: Callable[[bytes], None]) -> None:
        assert size > 0
        self._want, self._on_item = size, on_item

    @property
    def wanted(self) -> int:
        return self._want - len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "peer closed the data connection")
        if len(data) > self.wanted:
            raise DataLocalError(f"{len(data)} bytes fed where {self.wanted} were asked for")
        self._buf += data
        if len(self._buf) == self._want:
            item, on_item = bytes(self._buf), self._on_item
            self._buf.clear()
            self._want, self._on_item = 0, None
            assert on_item is not None
            on_item(item)

    def next_event(self) -> DataEvent | NeedData:
        return self._events.popleft() if self._events else NEED_DATA

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out


class Listener(DataMachine):
    """The listener's side of the opening: `Opened` (or `Refused`); DataProtocolError for
    anything that is not an etfs connector knowing the secret ``lookup`` finds by key id."""

    def __init__(self, lookup: Callable[[bytes], bytes | None]) -> None:
        super().__init__()
        self._lookup = lookup
        self._expect(OPEN.size, self._on_open)

    def _on_open(self, raw: bytes) -> None:
        magic, self._kid, self._nc = OPEN.unpack(raw)
        if magic != MAGIC:
            raise DataProtocolError("not an etfs data connection")
        secret = self._lookup(self._kid)
        if secret is None:
            self._out += GREETING.pack(MAGIC, GREET_UNKNOWN, bytes(16), bytes(32))
            self._events.append(Refused())
            return
        self._secret = secret
        self._nl = secrets.token_bytes(16)
        self._out += GREETING.pack(
            MAGIC, GREET_OK, self._nl, _mac(secret, b"listener", self._kid, self._nc, self._nl)
        )
        self._expect(LENGTH.size, self._on_length)

    def _on_length(self, raw: bytes) -> None:
        (length,) = LENGTH.unpack(raw)
        if not 0 < length <= MAX_HELLO:
            raise DataProtocolError(f"data-connection hello of {length} bytes")
        self._expect(length, self._on_hello)

    def _on_hello(self, body: bytes) -> None:
        try:
            hello = decode_hello(body)
        except (msgspec.MsgspecError, ValueError) as exc:
            raise DataProtocolError(f"malformed data-connection hello: {exc}") from None
        if not hmac.compare_digest(
            hello.proof, _mac(self._secret, b"connector", self._kid, self._nc, self._nl)
        ):
            raise DataProtocolError("the connector did not prove it knows the secret")
        self._events.append(Opened(hello, self._kid))


class Connector(DataMachine):
    """The connector's side of the opening.  `data_to_send` starts with the opener (magic, key
    id, nonce: nothing a client chose); the hello, with our proof, follows only once the
    listener proved it knows ``secret`` (`Greeted`).  LookupError: an etfs data port that does
    not know the key; DataProtocolError: anything else."""

    def __init__(self, secret: bytes, hello: DataHello) -> None:
        super().__init__()
        self._secret, self._hello = secret, hello
        self._nonce = secrets.token_bytes(16)
        self._out += OPEN.pack(MAGIC, key_id(secret), self._nonce)
        self._expect(GREETING.size, self._on_greeting)

    def _on_greeting(self, raw: bytes) -> None:
        magic, status, nl, mac = GREETING.unpack(raw)
        if magic != MAGIC:
            raise DataProtocolError("not an etfs data port")
        kid = key_id(self._secret)
        if status == GREET_UNKNOWN:
            raise LookupError("the data port does not know this capability or ticket")
        if status != GREET_OK or not hmac.compare_digest(
            mac, _mac(self._secret, b"listener", kid, self._nonce, nl)
        ):
            raise DataProtocolError("the data port did not prove it knows the secret")
        proof = _mac(self._secret, b"connector", kid, self._nonce, nl)
        self._out += encode(msgspec.structs.replace(self._hello, proof=proof))
        self._events.append(Greeted())


class ReplyReader(DataMachine):
    """The destination's read of the source's answer to a hello: `DataReady` or `DataError`."""

    def __init__(self, limit: int = MAX_HELLO) -> None:
        super().__init__()
        self._limit = limit
        self._expect(LENGTH.size, self._on_length)

    def _on_length(self, raw: bytes) -> None:
        (length,) = LENGTH.unpack(raw)
        if not 0 < length <= self._limit:
            raise DataProtocolError(f"data-connection reply of {length} bytes")
        self._expect(length, self._on_reply)

    def _on_reply(self, body: bytes) -> None:
        try:
            self._events.append(decode_reply(body))
        except (msgspec.MsgspecError, ValueError) as exc:
            raise DataProtocolError(f"malformed data-connection reply: {exc}") from None


class BlockSource(DataMachine):
    """The source's side of the block exchange: `BlockRequest`s in until `Done`; `header`, the
    payload (the driver's, by sendfile or read+send) and `trailer` out for each."""

    def __init__(self) -> None:
        super().__init__()
        self._trailer_due = False
        self._expect(REQUEST.size, self._on_request)

    def _on_request(self, raw: bytes) -> None:
        offset, length, flags = REQUEST.unpack(raw)
        if flags & FLAG_DONE:
            self._events.append(Done(bool(flags & FLAG_END)))
            return
        self._events.append(BlockRequest(offset, length, bool(flags & FLAG_DIGEST)))

    def header(self, offset: int, length: int, status: int = 0) -> bytes:
        """The block header to send; with status 0 the payload and a `trailer` follow."""
        if self._trailer_due:
            raise DataLocalError("a block header before the previous block's trailer")
        self._trailer_due = status == 0
        if not self._trailer_due:
            self._next_request()
        return BLOCK.pack(offset, length if status == 0 else 0, status)

    def trailer(self, digest: int, status: int = 0) -> bytes:
        if not self._trailer_due:
            raise DataLocalError("a block trailer without a block")
        self._trailer_due = False
        self._next_request()
        return TRAILER.pack(digest, status)

    def _next_request(self) -> None:
        self._expect(REQUEST.size, self._on_request)


class BlockSink(DataMachine):
    """The destination's side of the block exchange: `request`s out (pipelined), a
    `BlockHeader` in for the oldest, its payload (moved by the driver, then
    `payload_received`), a `Trailer`; `finish` ends the connection."""

    def __init__(self) -> None:
        super().__init__()
        self._inflight: deque[tuple[int, int]] = deque()
        self._in_payload = False

    def request(self, offset: int, length: int, digest: bool) -> bytes:
        self._inflight.append((offset, length))
        self._maybe_expect_header()
        return REQUEST.pack(offset, length, FLAG_DIGEST if digest else 0)

    def finish(self, end: bool) -> bytes:
        """No more requests; ``end``: this transfer has every block (the source may forget it)."""
        return REQUEST.pack(0, 0, FLAG_DONE | (FLAG_END if end else 0))

    def _maybe_expect_header(self) -> None:
        if self._inflight and not self._in_payload and not self.wanted:
            self._expect(BLOCK.size, self._on_header)

    def _on_header(self, raw: bytes) -> None:
        offset, length, status = BLOCK.unpack(raw)
        self._events.append(BlockHeader(offset, length, status))
        if status == 0 and (offset, length) == self._inflight[0]:
            self._in_payload = True  # the driver moves the payload, then payload_received()
        else:
            self._inflight.popleft()  # refused (or not what was asked): no payload, no trailer
            self._maybe_expect_header()

    def payload_received(self) -> None:
        if not self._in_payload:
            raise DataLocalError("no block payload was expected")
        self._in_payload = False
        self._expect(TRAILER.size, self._on_trailer)

    def _on_trailer(self, raw: bytes) -> None:
        self._inflight.popleft()
        self._events.append(Trailer(*TRAILER.unpack(raw)))
        self._maybe_expect_header()


def timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO / SO_SNDTIMEO."""
    sec = int(seconds)
    return struct.pack("ll", sec, int((seconds - sec) * 1e6))
