"""The messages of the etfs control protocol, as frozen, tagged msgspec Structs.

Every message on a control connection is one of the types below, encoded as a
msgpack map with a ``t`` tag naming its type.  A request travels in a `Call` envelope
with an ``id`` chosen by the client; the server answers each with exactly one `Ok` or
`Err` carrying the same id, in any order, so requests pipeline.  Each request type
names the type of its reply's value (``class Stat(Request[Attr])``).  Nothing here
does I/O.
"""

from __future__ import annotations

import functools
import typing
from typing import Any, Generic, TypeVar

import msgspec

from .transfer import CAPABILITY_TTL, STREAMS

# 2: requests travel in a `Call` envelope that carries the id (1: an ``id`` field in each request).
PROTOCOL_VERSION = 2
R = TypeVar("R")
# Covariant: a `Stat` (a Request[Attr]) may go where a Request[object] is asked for.
R_co = TypeVar("R_co", covariant=True)


class Message(msgspec.Struct, frozen=True, tag_field="t", tag=str.lower):
    """Base of all control messages."""


# --- handshake -------------------------------------------------------------------------------------
class Hello(Message, frozen=True):
    """Client -> server: first message.  Names the protocol version, user and export."""

    version: int
    user: str
    export: str
    nonce: bytes


class Challenge(Message, frozen=True):
    """Server -> client: the server's nonce for the HMAC challenge-response."""

    version: int
    nonce: bytes
    server: str


class Prove(Message, frozen=True):
    """Client -> server: HMAC(key, client proof input); see `etfs.protocol.auth`."""

    mac: bytes


class Welcome(Message, frozen=True):
    """Server -> client: authentication succeeded; the server proves it knows the key too."""

    mac: bytes
    data_port: int
    peer_host: str


# --- replies ---------------------------------------------------------------------------------------
class Ok(Message, frozen=True):
    id: int
    value: Any = None


class Err(Message, frozen=True):
    """A failed request (or, with id 0, a fatal connection error).  ``errno`` is a Linux errno."""

    id: int
    errno: int
    message: str


# --- value types carried in replies ----------------------------------------------------------------
class Attr(msgspec.Struct, frozen=True, array_like=True):
    """File attributes as the server sees them (nanosecond times)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Entry(msgspec.Struct, frozen=True, array_like=True):
    name: str
    attr: Attr


class ListPage(msgspec.Struct, frozen=True):
    entries: list[Entry]
    more: bool


class Opened(msgspec.Struct, frozen=True):
    handle: int
    attr: Attr
    # Create only: the parent directory's attributes right after the create (as NFS's wcc data),
    # so the client need not ask for them again (the kernel does, before the next create in it).
    parent: Attr | None = None


class FsStats(msgspec.Struct, frozen=True):
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


class RateLimit(msgspec.Struct, frozen=True, array_like=True):
    """A bandwidth limit: ``rate`` bytes/s for all of the user's transfers naming ``group``.

    The client chooses groups: one ``etfs cp`` command, one server pair of one mount; ""
    means this transfer alone.
    """

    rate: int
    group: str = ""


MAX_RATE_LIMITS = 4


class Capability(msgspec.Struct, frozen=True):
    """A source server's signed permission to read one file for one transfer.

    ``token`` is opaque to everyone but the issuing server (an HMAC-signed blob).
    """

    token: bytes
    transfer_id: str
    path: str
    size: int
    mtime_ns: int
    data_host: str
    data_port: int
    expires: float
    data_tls: bool = False  # the source's data port speaks TLS
    ino: int = 0  # the source file's inode: part of the identity a resume must match
    # Keys the data-port greeting (both ends prove they know it before anything a client
    # chose is sent); only the client that asked and the destination it names get it.
    secret: bytes = b""


class TransferInfo(msgspec.Struct, frozen=True):
    """A transfer record, as kept by the destination server."""

    id: str
    source: str
    destination: str
    state: str
    bytes_total: int
    bytes_done: int
    bytes_resent: int
    streams: int
    direction: str
    mode: str
    digest: str
    reason: str
    errno: int
    started: float
    finished: float
    # Why it failed, for programs: a `etfs.protocol.transfer.FailureCode` value ("" unless failed).
    code: str = ""


# --- requests --------------------------------------------------------------------------------------
class Request(Message, Generic[R_co], frozen=True):
    """A request whose reply value is an ``R_co``: ``class Stat(Request[Attr])`` declares that the
    server answers a `Stat` with an `Attr`, so ``await client.call(Stat(path))`` is an `Attr`
    for mypy and is checked to be one at run time (`reply_type`, `check_reply`).  A request has
    no id of its own: it travels in a `Call` envelope that carries it."""


class Ping(Request[None], frozen=True):
    pass


class Stat(Request[Attr], frozen=True):
    path: str


class List(Request[ListPage], frozen=True):
    """One page of a directory listing with attributes: entries after ``after`` (by name order)."""

    path: str
    after: str = ""
    limit: int = 1000


class Open(Request[Opened], frozen=True):
    path: str
    flags: int


class Create(Request[Opened], frozen=True):
    path: str
    mode: int
    flags: int


class Read(Request[bytes], frozen=True):
    handle: int
    offset: int
    size: int


class Write(Request[int], frozen=True):
    handle: int
    offset: int
    data: bytes


class Close(Request[None], frozen=True):
    handle: int


class FStat(Request[Attr], frozen=True):
    """Attributes of an open file by handle (an unlinked file has no path to stat)."""

    handle: int


class Fsync(Request[None], frozen=True):
    handle: int
    datasync: bool = False


class Mkdir(Request[Attr], frozen=True):
    path: str
    mode: int


class Rmdir(Request[None], frozen=True):
    path: str


class Unlink(Request[None], frozen=True):
    path: str


class Rename(Request[None], frozen=True):
    old: str
    new: str
    noreplace: bool = False
    exchange: bool = False


class SetAttr(Request[Attr], frozen=True):
    path: str
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    atime_now: bool = False
    mtime_now: bool = False


class FTruncate(Request[Attr], frozen=True):
    """ftruncate of an open file by handle (an unlinked file has no path); the handle must be
    open for writing."""

    handle: int
    size: int


class Mknod(Request[Attr], frozen=True):
    """Create a FIFO or a socket (``mode`` has the file type); the server never opens it (the
    client's kernel handles them locally)."""

    path: str
    mode: int
    rdev: int = 0


class Symlink(Request[Attr], frozen=True):
    path: str
    target: str


class Readlink(Request[str], frozen=True):
    path: str


class Link(Request[Attr], frozen=True):
    old: str
    new: str


class StatFs(Request[FsStats], frozen=True):
    pass


class Checksum(Request[str], frozen=True):
    """xxh3-128 of ``length`` bytes at ``offset`` (-1: to the end)."""

    path: str
    offset: int = 0
    length: int = -1


class GetXattr(Request[bytes], frozen=True):
    path: str
    name: str


class ListXattr(Request[list[str]], frozen=True):
    path: str


class SetXattr(Request[None], frozen=True):
    path: str
    name: str
    value: bytes


class RemoveXattr(Request[None], frozen=True):
    path: str
    name: str


# --- transfer control (see etfs_server/transfer) ---------------------------------------------------
class TransferOffer(Request[Capability], frozen=True):
    """To the source: issue a capability for reading ``path`` in one transfer.

    The source sends the bytes in either direction, so it enforces ``limits`` (at most
    `MAX_RATE_LIMITS`), besides its own server.yaml cap.
    """

    path: str
    ttl: float = CAPABILITY_TTL
    limits: tuple[RateLimit, ...] = ()


class TransferStarted(msgspec.Struct, frozen=True):
    transfer_id: str
    ticket: bytes
    data_host: str
    data_port: int
    skipped: bool
    resumed_bytes: int
    data_tls: bool = False  # the destination's data port speaks TLS (push)
    streams: int = -1  # data connections the destination will use (-1: not said, older server)


class TransferStart(Request[TransferStarted], frozen=True):
    """To the destination: receive the capability's file into ``path``.

    ``direction`` is ``pull`` (the destination connects to the source's data port)
    or ``push`` (the reply carries a ticket; the client then sends `TransferPush`
    to the source, which connects to the destination's data port).
    """

    capability: Capability
    source_name: str
    path: str
    mode: str = "new"
    streams: int = STREAMS
    direction: str = "pull"
    verify: bool = True
    block_size: int = 0
    transfer_id: str = ""
    preserve_times: bool = False
    # After the commit, remove what a broken relay copy left beside ``path`` (`relay_part_name`):
    # on the server, instead of two Unlink round trips per copied file from the client.
    forget_relay: bool = False


class TransferPush(Request[None], frozen=True):
    """To the source: connect ``streams`` data connections to the destination and serve blocks."""

    capability: Capability
    ticket: bytes
    host: str
    port: int
    streams: int
    tls: bool = False


class TransferWait(Request[TransferInfo], frozen=True):
    """To the destination: answer when the transfer changed (state, progress) or ended, or
    after ``timeout`` seconds.  After a change that is not the end, wait up to ``patience``
    seconds more for the end: a short transfer then costs one round trip, not one per state
    change, and progress still arrives that often."""

    transfer_id: str
    timeout: float = 1.0
    patience: float = 0.0


class TransferCancel(Request[TransferInfo], frozen=True):
    transfer_id: str
    reason: str = "cancelled"


class TransferList(Request[list[TransferInfo]], frozen=True):
    pass


class LocalCopy(Request[TransferInfo], frozen=True):
    """Copy a file within this export on the server (same-server `cp`)."""

    src: str
    dst: str
    mode: str = "overwrite"
    preserve_times: bool = False  # stamp the source's mtime (always for skip-existing)


# What a `Call` may carry: msgspec decodes by this union's tags; to mypy it is any request (a
# function taking a `Request[R]` may wrap it without losing R).
if typing.TYPE_CHECKING:
    AnyRequest: typing.TypeAlias = Request[Any]
else:
    AnyRequest = (
        Ping
        | Stat
        | List
        | Open
        | Create
        | Read
        | Write
        | Close
        | FStat
        | Fsync
        | Mkdir
        | Rmdir
        | Unlink
        | Rename
        | SetAttr
        | FTruncate
        | Mknod
        | Symlink
        | Readlink
        | Link
        | StatFs
        | Checksum
        | GetXattr
        | ListXattr
        | SetXattr
        | RemoveXattr
        | TransferOffer
        | TransferStart
        | TransferPush
        | TransferWait
        | TransferCancel
        | TransferList
        | LocalCopy
    )


class Call(Message, frozen=True):
    """Client -> server: the envelope of one request; the reply carries the same ``id``."""

    id: int
    req: AnyRequest


ClientMessage = Hello | Prove | Call
ServerMessage = Challenge | Welcome | Ok | Err


@functools.cache
def reply_type(req_type: type[Request[Any]]) -> Any:
    """The type of the reply value a request type declares (``Stat`` -> ``Attr``)."""
    for klass in req_type.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if typing.get_origin(base) is Request:
                (arg,) = typing.get_args(base)
                return type(None) if arg is None else arg
    raise TypeError(f"{req_type.__name__} declares no reply type")


def decode_reply(req: Request[R], value: Any) -> R:
    """A reply's value as the type ``req`` declares; `msgspec.ValidationError` if it is not one."""
    result: R = msgspec.convert(value, reply_type(type(req)))
    return result


def check_reply(req: Request[R], value: Any) -> R:
    """``value`` itself if it is what ``req`` declares as its reply, else TypeError.

    Cheap (isinstance, no copy): the server runs it on every reply it sends."""
    if not _conforms(value, reply_type(type(req))):
        raise TypeError(
            f"reply to {type(req).__name__} is a {type(value).__name__}, "
            f"not the declared {reply_type(type(req))}"
        )
    result: R = value
    return result


def _conforms(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if tp is int:  # bool is an int to Python, not on the wire
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)
