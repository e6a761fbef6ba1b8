"""Server-to-server transfers: capabilities, the data path, transfer records, resume.

Roles.  The *source* server only answers block requests for a capability it signed
itself (one file, one transfer, a few minutes' life).  The *destination* owns the
transfer: it keeps the persisted record, decides which blocks to fetch, receives into
a hidden part file, verifies each block's digest, and renames the part file onto the
final name only when every block arrived and matched.

Direction only decides who connects.  Pull: the destination opens N data
connections to the source's data port and presents the capability.  Push: the
destination hands out a ticket, the client gives it to the source, and the source
connects to the destination's data port.  After the hello, the protocol on a data
connection is the same either way (see `etfs.protocol.data`): the destination sends
block requests, the source answers each with a header, the raw bytes (sendfile or
read+send) and an xxh3-64 digest of the block.

Resume.  Next to the part file the destination keeps a restart record (source
identity, block size) and an append-only journal of finished blocks, so a transfer
broken by a killed server, a cut link or a vanished client re-fetches only the blocks
that were in flight.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
import ssl
import stat as st
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio
import xxhash

from etfs import _sendfile_cffi as native
from etfs.protocol import data as d
from etfs.protocol import messages as m

from .acl import Right
from .config import ServerConfig
from .exports import ExportRoot, split
from .handlers import Session
from .peers import PeerRefused, connect

log = logging.getLogger(__name__)

PART_SUFFIX = ".etfs-part"
CONNECT_TIMEOUT = 5.0
PIPELINE = 2  # block requests in flight per stream
MAX_BLOCK_RETRIES = 3
TERMINAL = ("done", "failed", "skipped")
MAX_SIZE = 1 << 46  # 64 TiB: bounds the per-block bookkeeping a client can make us allocate
MAX_BLOCKS = 1 << 22  # larger files get larger blocks
MIN_BLOCK = 64 * 1024
HELLO_TIMEOUT = 10.0  # a data connection must present its hello this fast, in total
KEEP_RECORDS = 2000  # finished transfer records kept (in memory and in state_dir)
# Blocks pass through user space (read+send, recv+write, TLS, hashing for verification) in
# pieces of this size, through one buffer per stream that is reused for every block: no
# buffer or bytes object sized to a block (4-16 MiB, times the streams) is ever made.
CHUNK = 1 << 20
TRANSFER_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


class TransferError(OSError):
    pass


# --- capabilities ----------------------------------------------------------------------------------
class CapabilityBody(msgspec.Struct, frozen=True, array_like=True):
    transfer_id: str
    export: str
    path: str
    size: int
    mtime_ns: int
    ino: int
    expires: float
    user: str


class Signer:
    """Signs and checks capabilities with a per-server secret kept in the state directory."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    @classmethod
    def load(cls, state_dir: Path) -> Signer:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "capability.key"
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            secret = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            return cls(secret)

    def sign(self, body: CapabilityBody) -> bytes:
        raw = msgspec.msgpack.encode(body)
        return raw + hmac.new(self.secret, raw, hashlib.sha256).digest()

    def check(self, token: bytes) -> CapabilityBody:
        raw, mac = token[:-32], token[-32:]
        if len(token) < 33 or not hmac.compare_digest(
            mac, hmac.new(self.secret, raw, hashlib.sha256).digest()
        ):
            raise TransferError(errno.EACCES, "capability refused: not signed by this server")
        body = msgspec.msgpack.decode(raw, type=CapabilityBody)
        if body.expires < time.time():
            raise TransferError(errno.EACCES, "capability refused: expired")
        return body


# --- records ---------------------------------------------------------------------------------------
@dataclass
class Record:
    """The persisted state of one transfer on the destination."""

    id: str
    source: str
    destination: str
    export: str
    path: str
    user: str = ""  # who ordered it: only they may watch, cancel or list it
    state: str = "queued"
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_resent: int = 0
    streams: int = 1
    direction: str = "pull"
    mode: str = "new"
    digest: str = ""
    reason: str = ""
    errno: int = 0
    started: float = field(default_factory=time.time)
    finished: float = 0.0

    def info(self) -> m.TransferInfo:
        return m.TransferInfo(
            id=self.id,
            source=self.source,
            destination=self.destination,
            state=self.state,
            bytes_total=self.bytes_total,
            bytes_done=self.bytes_done,
            bytes_resent=self.bytes_resent,
            streams=self.streams,
            direction=self.direction,
            mode=self.mode,
            digest=self.digest,
            reason=self.reason,
            errno=self.errno,
            started=self.started,
            finished=self.finished,
        )


class RecordStore:
    """Transfer records as JSON files under ``state_dir/transfers`` (written atomically)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "transfers"
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, rec: Record) -> None:
        path = self.dir / f"{rec.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(rec))
        os.replace(tmp, path)

    def remove(self, transfer_id: str) -> None:
        (self.dir / f"{transfer_id}.json").unlink(missing_ok=True)

    def load_all(self) -> list[Record]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(msgspec.json.decode(p.read_bytes(), type=Record))
            except (OSError, msgspec.MsgspecError) as exc:
                log.warning("ignoring unreadable transfer record %s: %s", p, exc)
        return out


class RestartRecord(msgspec.Struct, frozen=True):
    """What a part file is part of: resume only when all of this still matches."""

    source: str
    source_path: str
    size: int
    mtime_ns: int
    block_size: int
    transfer_id: str
    source_ino: int = 0  # same size and mtime is not enough: rsync -t can replace a file


def part_paths(path: str) -> tuple[str, str, str]:
    """(part file, restart record, journal) beside the final name, all hidden."""
    parent, name = split(path)
    base = f"{parent.rstrip('/')}/.{name}{PART_SUFFIX}"
    return base, base + ".restart", base + ".journal"


# --- the data path (blocking code, run in worker threads) ------------------------------------------
def _silent_peer() -> TimeoutError:
    # A blocking socket whose SO_RCVTIMEO/SO_SNDTIMEO expired raises EAGAIN: say what it means.
    return TimeoutError(errno.ETIMEDOUT, "the peer went silent (transfer.data_timeout expired)")


def _send(sock: socket.socket, data: bytes | memoryview) -> None:
    try:
        sock.sendall(data)
    except BlockingIOError:
        raise _silent_peer() from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except BlockingIOError:
            raise _silent_peer() from None
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "peer closed the data connection")
        buf += chunk
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket (the TLS path, where splice and recv+write cannot be used)."""
    got = 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:])
        except BlockingIOError:
            raise _silent_peer() from None
        if not n:
            raise ConnectionResetError(errno.ECONNRESET, "peer closed the data connection")
        got += n


def _recv_frame(sock: socket.socket, limit: int = 65536) -> bytes:
    (length,) = d.LENGTH.unpack(_recv_exact(sock, d.LENGTH.size))
    if length > limit:
        raise TransferError(errno.EPROTO, "oversized data-connection frame")
    return _recv_exact(sock, length)


def _hash_range(fd: int, offset: int, length: int, view: memoryview, hasher: Any) -> int | None:
    """xxh3-64 of ``length`` bytes of ``fd`` at ``offset``, read in pieces into ``view``.

    ``hasher`` is an ``xxhash.xxh3_64`` object, reset here and reused.  None if the file ends first.
    """
    hasher.reset()
    step = len(view)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[: min(step, length - done)]], offset + done)
        if n <= 0:
            return None
        hasher.update(view[:n])
        done += n
    return int(hasher.intdigest())


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _set_timeouts(sock: socket.socket, seconds: float) -> None:
    # SO_RCVTIMEO/SNDTIMEO keep the fd blocking for the C loops yet bound every wait.
    tv = d.timeval(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve_blocks(
    sock: socket.socket, fd: int, size: int, sender: str, block_limit: int, mtime_ns: int = -1
) -> int:
    """Source side of one data connection: answer block requests until the peer is done.

    Before each block the file is checked against the capability's size and mtime: a file
    changed under a transfer is answered with STATUS_STALE instead of a mix of versions.
    """
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    hasher = xxhash.xxh3_64()
    sent = 0
    while True:
        try:
            raw = _recv_exact(sock, d.REQUEST.size)
        except ConnectionResetError:
            return sent  # the destination closed: it has what it wanted
        offset, length, flags = d.REQUEST.unpack(raw)
        if flags & d.FLAG_DONE:
            return sent
        now = os.fstat(fd)
        if now.st_size != size or (mtime_ns >= 0 and now.st_mtime_ns != mtime_ns):
            _send(sock, d.BLOCK.pack(offset, 0, d.STATUS_STALE))
            continue
        if offset > size or length > block_limit or offset + length > size:
            _send(sock, d.BLOCK.pack(offset, 0, d.STATUS_RANGE))
            continue
        _send(sock, d.BLOCK.pack(offset, length, 0))
        digest = bool(flags & d.FLAG_DIGEST)
        digest_value: int | None = 0
        if isinstance(sock, ssl.SSLSocket) or (sender != "sendfile" and digest):
            # Piece by piece, hashing each piece while it is in the buffer.  TLS: the bytes
            # must pass through user space to be encrypted anyway.
            hasher.reset()
            n = 0
            while n < length:
                want = min(CHUNK, length - n)
                if isinstance(sock, ssl.SSLSocket):
                    got = os.preadv(fd, [view[:want]], offset + n)
                    _send(sock, view[:got])
                else:
                    got = native.read_send(fd, sock.fileno(), offset + n, want, buf)
                if digest:
                    hasher.update(view[:got])
                n += got
                if got < want:
                    break
            digest_value = hasher.intdigest() if digest else 0
        elif sender == "sendfile":
            n = native.sendfile(sock.fileno(), fd, offset, length)
            if digest and n == length:
                digest_value = _hash_range(fd, offset, length, view, hasher)
        else:
            # No digest: the C loop walks the whole block through the CHUNK buffer.
            n = native.read_send(fd, sock.fileno(), offset, length, buf)
        if n != length or digest_value is None:
            raise TransferError(errno.EIO, f"source file shrank while sending (got {n} of {length} bytes)")
        _send(sock, d.DIGEST.pack(digest_value))
        sent += n


class BlockQueue:
    """Blocks still to fetch, shared by the stream threads of one transfer.

    A stream that finds the queue empty while other streams still have blocks in flight
    waits: if one of them fails, its blocks come back here for the survivors.
    """

    def __init__(self, todo: list[int]) -> None:
        self._todo = list(reversed(todo))
        self._cond = threading.Condition()
        self._inflight = 0
        self.closed = False
        self.retries: dict[int, int] = {}

    def take(self, wait: bool) -> int | None:
        with self._cond:
            while not self._todo and wait and self._inflight and not self.closed:
                self._cond.wait(0.5)
            if not self._todo or self.closed:
                return None
            self._inflight += 1
            return self._todo.pop()

    def done(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def put_back(self, index: int) -> int:
        with self._cond:
            self._inflight -= 1
            self._todo.append(index)
            self.retries[index] = self.retries.get(index, 0) + 1
            self._cond.notify_all()
            return self.retries[index]

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


# --- one transfer on the destination ---------------------------------------------------------------
class Transfer:
    def __init__(
        self, rec: Record, cap: m.Capability, root: ExportRoot, block_size: int, verify: bool
    ) -> None:
        self.rec = rec
        self.cap = cap
        self.root = root
        self.block_size = block_size
        self.verify = verify
        self.ticket = secrets.token_bytes(24)
        self.part, self.restart, self.journal = part_paths(rec.path)
        self.nblocks = (cap.size + block_size - 1) // block_size
        self.digests: list[int | None] = [None] * self.nblocks
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.cancelled = False
        self.changed = trio.Event()
        self.finished = trio.Event()
        self.push_sockets: trio.MemorySendChannel[socket.socket] | None = None
        self.push_receive: trio.MemoryReceiveChannel[socket.socket] | None = None
        self.part_fd = -1
        self.journal_fd = -1
        self.cancel_scope: trio.CancelScope | None = None
        self.queue: BlockQueue | None = None
        self.session: Session | None = None
        self.on_close: Callable[[], None] | None = None

    def block_range(self, index: int) -> tuple[int, int]:
        offset = index * self.block_size
        return offset, min(self.block_size, self.cap.size - offset)

    def block_done(self, index: int, digest: int) -> None:
        with self.lock:
            if self.digests[index] is not None:
                return
            self.digests[index] = digest
            self.rec.bytes_done += self.block_range(index)[1]
            os.write(self.journal_fd, d.JOURNAL.pack(index, digest))

    def tree_digest(self) -> str:
        h = xxhash.xxh3_128()
        h.update(f"etfs-blocks:{self.block_size}:{self.cap.size}:".encode())
        for dig in self.digests:
            h.update((dig or 0).to_bytes(8, "big"))
        return "xxh3-64-tree:" + h.hexdigest()

    def fetch_stream(self, sock: socket.socket, queue: BlockQueue, receiver: str) -> None:
        """Destination side of one data connection: request blocks, receive, verify, journal.

        ``receiver`` "splice" moves socket -> pipe -> file without a user-space copy and
        re-reads the block from the page cache to hash it; "recv_write" receives into a
        buffer, writes it and hashes the buffer.  Either way a block passes through one
        CHUNK-sized buffer per stream, piece by piece.
        """
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        hasher = xxhash.xxh3_64()
        pipe = native.Pipe() if receiver == "splice" else None
        flags = d.FLAG_DIGEST if self.verify else 0
        inflight: list[int] = []
        try:
            while True:
                while len(inflight) < PIPELINE and not self.cancelled:
                    index = queue.take(wait=not inflight)
                    if index is None:
                        break
                    offset, length = self.block_range(index)
                    _send(sock, d.REQUEST.pack(offset, length, flags))
                    inflight.append(index)
                if not inflight:
                    break
                index = inflight[0]  # stays in flight (put back on error) until it is done
                offset, length = self.block_range(index)
                got_off, got_len, status = d.BLOCK.unpack(_recv_exact(sock, d.BLOCK.size))
                if status == d.STATUS_STALE:
                    raise TransferError(errno.ESTALE, f"source {self.cap.path} changed during the transfer")
                if status or got_off != offset or got_len != length:
                    raise TransferError(errno.EIO, f"source refused block at {offset} (status {status})")
                ours: int | None = None
                if isinstance(sock, ssl.SSLSocket) or (pipe is None and self.verify):
                    # Piece by piece through the buffer, hashing each piece while it is there.
                    hasher.reset()
                    for pos in range(0, length, CHUNK):
                        piece = view[: min(CHUNK, length - pos)]
                        if isinstance(sock, ssl.SSLSocket):
                            _recv_into(sock, piece)
                            _pwrite_all(self.part_fd, piece, offset + pos)
                        else:
                            native.recv_write(sock.fileno(), self.part_fd, offset + pos, len(piece), buf)
                        if self.verify:
                            hasher.update(piece)
                    ours = hasher.intdigest() if self.verify else None
                elif pipe is not None:
                    native.splice_recv(sock.fileno(), self.part_fd, offset, length, pipe)
                else:
                    native.recv_write(sock.fileno(), self.part_fd, offset, length, buf)
                (theirs,) = d.DIGEST.unpack(_recv_exact(sock, d.DIGEST.size))
                if self.verify:
                    if ours is None:
                        # Spliced: read the block back from the page cache to hash it.
                        ours = _hash_range(self.part_fd, offset, length, view, hasher)
                        if ours is None:
                            raise TransferError(errno.EIO, f"short read-back of block at {offset}")
                    if ours != theirs:
                        inflight.pop(0)
                        tries = queue.put_back(index)
                        with self.lock:
                            self.rec.bytes_resent += length
                        log.warning(
                            "transfer %s: digest mismatch in block %d (offset %d), re-fetching (try %d)",
                            self.rec.id,
                            index,
                            offset,
                            tries,
                        )
                        if tries > MAX_BLOCK_RETRIES:
                            raise TransferError(
                                errno.EIO, f"block at offset {offset} failed verification {tries} times"
                            )
                        continue
                else:
                    ours = theirs
                inflight.pop(0)
                # Start writing this block to disk now: the fdatasync before the rename then
                # waits for the last blocks only (it took 0.3 s of 0.9 s for 512 MiB otherwise).
                try:
                    native.sync_file_range(self.part_fd, offset, length)
                except OSError:
                    pass  # only a hint (some filesystems refuse it)
                self.block_done(index, ours)
                queue.done()
            _send(sock, d.REQUEST.pack(0, 0, d.FLAG_DONE))
        finally:
            if pipe is not None:
                pipe.close()
            for index in inflight:
                queue.put_back(index)


class TransferService:
    """All transfer state of one server: offers (source role) and transfers (destination role)."""

    def __init__(self, config: ServerConfig, roots: dict[str, ExportRoot]) -> None:
        self.config = config
        self.roots = roots
        self.signer = Signer.load(config.state_dir)
        # Data connections use TLS when this server has a certificate; sendfile and splice
        # then give way to read+send / recv+write through the TLS layer.
        self.tls_server: ssl.SSLContext | None = None
        self.tls_client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.tls_client.check_hostname = False  # peers are named by address; the CA vouches
        if config.tls is not None:
            self.tls_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_server.load_cert_chain(str(config.tls.cert_file), str(config.tls.key_file))
        if config.tls is not None and config.tls.ca_file is not None:
            self.tls_client.load_verify_locations(str(config.tls.ca_file))
        elif config.tls is not None:
            log.warning(
                "tls.ca_file not set: data connections to other servers are encrypted but not verified"
            )
            self.tls_client.verify_mode = ssl.CERT_NONE
        self.store = RecordStore(config.state_dir)
        self.records: dict[str, Record] = {r.id: r for r in self.store.load_all()}
        self.active: dict[str, Transfer] = {}
        # One transfer per destination file at a time: they would share the part file.
        self.by_path: dict[tuple[str, str], str] = {}
        # Data connections opened per capability: one transfer's streams, not a free-for-all.
        self.cap_uses: dict[str, tuple[int, float]] = {}
        self.slots = trio.Semaphore(config.max_transfers)
        self.data_threads = trio.CapacityLimiter(config.max_transfers * config.max_streams * 2 + 8)
        # Connections that have not said hello yet get their own, small pool of threads, so
        # idle or slow peers cannot starve the transfers.
        self.hello_threads = trio.CapacityLimiter(32)
        self.data_port = 0
        self._nursery: trio.Nursery | None = None
        # Records left "running" by a crash are failed, resumable ones keep their part files.
        for rec in self.records.values():
            if rec.state not in TERMINAL:
                rec.state, rec.reason, rec.errno = (
                    "failed",
                    "server restarted during the transfer",
                    errno.EINTR,
                )
                rec.finished = time.time()
                self.store.save(rec)

    async def start(self, nursery: trio.Nursery, data_port: int) -> None:
        self._nursery = nursery
        self.data_port = data_port

    async def shutdown(self) -> None:
        for t in list(self.active.values()):
            self._cancel(t, "server shutting down", errno.EINTR)

    _OPS: tuple[type[m.Request], ...] = (
        m.TransferOffer,
        m.TransferStart,
        m.TransferPush,
        m.TransferWait,
        m.TransferCancel,
        m.TransferList,
        m.LocalCopy,
    )

    def handles(self, req: m.Request) -> bool:
        return isinstance(req, self._OPS)

    async def dispatch(self, session: Session, req: m.Request) -> Any:
        handler: Callable[[Session, Any], Any] = getattr(self, "op_" + type(req).__name__.lower())
        return await handler(session, req)

    def _export_name(self, session: Session) -> str:
        return next(n for n, r in self.roots.items() if r is session.root)

    # --- source role ------------------------------------------------------------------------------
    async def op_transferoffer(self, session: Session, req: m.TransferOffer) -> m.Capability:

        def look() -> tuple[str, os.stat_result]:
            # transfer-out AND read: the capability lets the bearer read the file.
            path = session.check(req.path, Right.TRANSFER_OUT)
            session.check(path, Right.READ)
            with session.root.opened(path, os.O_RDONLY | os.O_NOFOLLOW) as fd:
                # The file we actually opened (a parent may have been swapped for a symlink
                # since the check): the ACL must allow it, and the capability names it.
                real = session.root.real_path(fd)
                if real != path:
                    session.acl.check(session.user, session.groups, real, Right.TRANSFER_OUT)
                    session.acl.check(session.user, session.groups, real, Right.READ)
                return real, os.fstat(fd)

        path, s = await trio.to_thread.run_sync(look)
        if not st.S_ISREG(s.st_mode):
            raise TransferError(
                errno.EISDIR if st.S_ISDIR(s.st_mode) else errno.EINVAL, f"{path} is not a regular file"
            )
        ttl = max(1.0, min(req.ttl, self.config.capability_ttl))
        body = CapabilityBody(
            transfer_id=secrets.token_hex(8),
            export=self._export_name(session),
            path=path,
            size=s.st_size,
            mtime_ns=s.st_mtime_ns,
            ino=s.st_ino,
            expires=time.time() + ttl,
            user=session.user,
        )
        log.info(
            "capability %s issued to %s for %s (%d bytes)", body.transfer_id, session.user, path, s.st_size
        )
        return m.Capability(
            token=self.signer.sign(body),
            transfer_id=body.transfer_id,
            path=path,
            size=s.st_size,
            mtime_ns=s.st_mtime_ns,
            data_host=self.config.advertise_host,
            data_port=self.data_port,
            expires=body.expires,
            data_tls=self.tls_server is not None,
            ino=s.st_ino,
        )

    def _open_source(self, token: bytes, count: bool = True) -> tuple[CapabilityBody, int]:
        body = self.signer.check(token)
        if count:
            uses, expires = self.cap_uses.get(body.transfer_id, (0, body.expires))
            if uses >= 2 * self.config.max_streams:
                raise TransferError(errno.EACCES, "capability refused: already used by a full transfer")
            self.cap_uses[body.transfer_id] = (uses + 1, expires)
            now = time.time()
            for tid in [k for k, (_, exp) in self.cap_uses.items() if exp < now]:
                del self.cap_uses[tid]
        root = self.roots.get(body.export)
        if root is None:
            raise TransferError(errno.ENOENT, f"capability names unknown export {body.export!r}")
        fd = root.open(body.path, os.O_RDONLY | os.O_NOFOLLOW)
        s = os.fstat(fd)
        if (s.st_ino, s.st_size, s.st_mtime_ns) != (body.ino, body.size, body.mtime_ns):
            os.close(fd)
            raise TransferError(errno.ESTALE, f"source {body.path} changed since the capability was issued")
        return body, fd

    def _serve_source(self, sock: socket.socket, body: CapabilityBody, fd: int) -> None:
        try:
            _send(sock, d.encode(d.DataReady(size=body.size, mtime_ns=body.mtime_ns)))
            sent = serve_blocks(sock, fd, body.size, self.config.sender, d.MAX_BLOCK, body.mtime_ns)
            log.debug("transfer %s: stream served %d bytes of %s", body.transfer_id, sent, body.path)
        finally:
            os.close(fd)

    async def op_transferpush(self, session: Session, req: m.TransferPush) -> None:
        body, fd = await trio.to_thread.run_sync(self._open_source, req.capability.token, False)
        os.close(fd)
        if body.user != session.user:
            raise TransferError(errno.EACCES, "push refused: the capability was issued to another user")
        self._check_peer(req.host)
        streams = max(0, min(req.streams, self.config.max_streams))
        assert self._nursery is not None

        def connect_one(stream: int) -> None:
            body, fd = self._open_source(req.capability.token)
            try:
                sock = self._connect_data(req.host, req.port, req.tls)
            except OSError:
                os.close(fd)
                raise
            with sock:
                _send(
                    sock,
                    d.encode(
                        d.DataHello(
                            kind="push", token=req.ticket, transfer_id=body.transfer_id, stream=stream
                        )
                    ),
                )
                self._serve_source(sock, body, fd)

        async def run_one(stream: int) -> None:
            try:
                await trio.to_thread.run_sync(connect_one, stream, limiter=self.data_threads)
            except OSError as exc:
                log.warning("push of %s, stream %d: %s", body.path, stream, exc)

        for i in range(streams):
            self._nursery.start_soon(run_one, i)

    def _check_peer(self, host: str) -> None:
        try:
            self.config.peers.check_host(host)
        except PeerRefused as exc:
            log.warning("data connection to %s refused: not in transfer.peers", host)
            raise TransferError(errno.EACCES, exc.strerror or str(exc)) from None

    def _connect_data(self, host: str, port: int, tls: bool) -> socket.socket:
        """A data connection to another server's data port (blocking, bounded by timeouts).

        Only to addresses `transfer.peers` allows (PeerRefused otherwise).
        """
        sock = connect(self.config.peers, host, port, CONNECT_TIMEOUT)
        try:
            sock.settimeout(None)
            _set_timeouts(sock, self.config.data_timeout)
            if tls:
                sock = self.tls_client.wrap_socket(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    async def handle_data_connection(self, stream: trio.SocketStream) -> None:
        """A data connection arrived: a pull (we are the source) or a push (we are the destination)."""
        tsock = stream.socket
        sock = socket.socket(fileno=tsock.detach())
        sock.setblocking(True)
        peer = "?"
        handed_over = False
        try:
            host, port = sock.getpeername()[:2]
            peer = f"{host}:{port}"
            sock, hello = await trio.to_thread.run_sync(self._read_hello, sock, limiter=self.hello_threads)
            handed_over = await trio.to_thread.run_sync(
                self._data_connection, sock, hello, limiter=self.data_threads
            )
        except (OSError, msgspec.MsgspecError) as exc:
            log.warning("data connection from %s: %s", peer, exc)
        except Exception:
            log.exception("data connection from %s: internal error", peer)
        finally:
            if not handed_over:
                sock.close()

    def _read_hello(self, plain: socket.socket) -> tuple[socket.socket, d.DataHello]:
        """TLS handshake (if any) and the hello, within HELLO_TIMEOUT in total."""
        deadline = time.monotonic() + HELLO_TIMEOUT
        _set_timeouts(plain, HELLO_TIMEOUT / 4)
        sock = self.tls_server.wrap_socket(plain, server_side=True) if self.tls_server else plain
        try:
            return sock, self._hello_frame(sock, deadline)
        except BaseException:
            if sock is not plain:
                sock.close()  # wrapping detached `plain`: the caller's close would miss this one
            raise

    def _hello_frame(self, sock: socket.socket, deadline: float) -> d.DataHello:
        head = bytearray()
        while len(head) < d.LENGTH.size or len(head) < d.LENGTH.size + d.LENGTH.unpack_from(head)[0]:
            if time.monotonic() > deadline:
                raise TransferError(errno.ETIMEDOUT, "no data-connection hello in time")
            if len(head) >= d.LENGTH.size and d.LENGTH.unpack_from(head)[0] > 65536:
                raise TransferError(errno.EPROTO, "oversized data-connection hello")
            want = (
                d.LENGTH.size if len(head) < d.LENGTH.size else d.LENGTH.size + d.LENGTH.unpack_from(head)[0]
            )
            chunk = sock.recv(want - len(head))
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "peer closed before its hello")
            head += chunk
        _set_timeouts(sock, self.config.data_timeout)
        return d.decode_hello(bytes(head[d.LENGTH.size :]))

    def _data_connection(self, sock: socket.socket, hello: d.DataHello) -> bool:
        """Serve a pull, or hand a push connection to its transfer (then True: do not close it)."""
        if hello.kind == "pull":
            try:
                body, fd = self._open_source(hello.token)
            except OSError as exc:
                _send(
                    sock,
                    d.encode(d.DataError(errno=exc.errno or errno.EIO, message=exc.strerror or str(exc))),
                )
                raise
            self._serve_source(sock, body, fd)
            return False
        transfer = self.active.get(hello.transfer_id)
        if (
            transfer is None
            or not hmac.compare_digest(transfer.ticket, hello.token)
            or transfer.push_sockets is None
        ):
            raise TransferError(errno.EACCES, "push refused: unknown transfer or wrong ticket")
        try:
            trio.from_thread.run_sync(transfer.push_sockets.send_nowait, sock)
        except (trio.WouldBlock, trio.ClosedResourceError):
            raise TransferError(errno.EACCES, "push refused: the transfer has all its streams") from None
        return True

    # --- destination role -------------------------------------------------------------------------
    async def op_transferstart(self, session: Session, req: m.TransferStart) -> m.TransferStarted:
        cap = req.capability
        if req.mode not in ("new", "overwrite", "resume", "skip-existing"):
            raise TransferError(errno.EINVAL, f"unknown mode {req.mode!r}")
        if req.direction not in ("pull", "push"):
            raise TransferError(errno.EINVAL, f"unknown direction {req.direction!r}")
        if not 0 <= cap.size <= MAX_SIZE:
            raise TransferError(errno.EFBIG, f"file size {cap.size} out of range")
        tid = req.transfer_id or cap.transfer_id
        if not TRANSFER_ID.fullmatch(tid):
            raise TransferError(errno.EINVAL, "a transfer id is 1-64 letters, digits, '-' or '_'")
        if tid in self.active or tid in self.records:
            raise TransferError(errno.EEXIST, f"transfer {tid} exists already")
        if req.direction == "pull":
            self._check_peer(cap.data_host)

        def check() -> str:
            path = session.check(req.path, Right.TRANSFER_IN)
            session.check(path, Right.WRITE)
            return path

        path = await trio.to_thread.run_sync(check)
        export = self._export_name(session)
        if (export, path) in self.by_path:
            raise TransferError(errno.EBUSY, f"another transfer into {path} is running")
        block_size = max(MIN_BLOCK, min(req.block_size or self.config.block_size, d.MAX_BLOCK))
        block_size = max(block_size, -(-cap.size // MAX_BLOCKS))
        rec = Record(
            id=tid,
            source=f"{req.source_name}:{cap.path}",
            destination=f"{self.config.name}:{path}",
            export=export,
            path=path,
            user=session.user,
            bytes_total=cap.size,
            streams=max(1, min(req.streams, self.config.max_streams)),
            direction=req.direction,
            mode=req.mode,
        )
        t = Transfer(rec, cap, session.root, block_size, req.verify)
        # Claim the id and the destination before the first await: a TransferCancel or the
        # client's disconnect from now on reaches this transfer.
        self.active[tid] = t
        self.by_path[(export, path)] = tid

        def on_close() -> None:
            self._cancel(t, "the client that started it disconnected", errno.ECONNABORTED)

        t.on_close = on_close
        t.session = session
        session.on_close.append(on_close)
        try:
            resumed = await trio.to_thread.run_sync(self._prepare, t, req)
            if t.cancelled:
                raise TransferError(t.rec.errno or errno.EINTR, t.rec.reason or "cancelled")
        except BaseException:
            self._close_files(t)
            self._release(t)
            raise
        self.records[tid] = rec
        if rec.state == "skipped":
            self._finish(t)
            return m.TransferStarted(tid, b"", "", 0, True, 0)
        # No more streams than blocks still to fetch (the source opens exactly this many on push).
        todo = sum(1 for dig in t.digests if dig is None)
        rec.streams = min(rec.streams, todo) if todo else 0
        if req.direction == "push":
            t.push_sockets, t.push_receive = trio.open_memory_channel[socket.socket](max(1, rec.streams))
        self.store.save(rec)
        assert self._nursery is not None
        self._nursery.start_soon(self._run, t, req)
        return m.TransferStarted(
            tid,
            t.ticket if req.direction == "push" else b"",
            self.config.advertise_host,
            self.data_port,
            False,
            resumed,
            data_tls=self.tls_server is not None,
            streams=rec.streams,
        )

    def _prepare(self, t: Transfer, req: m.TransferStart) -> int:
        """Check the mode, set up part file and journal; returns bytes already present (resume).

        On an exception the caller closes what was opened and removes nothing it did not create.
        """
        root, path, cap, rec = t.root, t.rec.path, t.cap, t.rec
        try:
            existing: os.stat_result | None = root.lstat(path)
        except FileNotFoundError:
            existing = None
        if existing is not None:
            if st.S_ISDIR(existing.st_mode):
                raise TransferError(errno.EISDIR, f"destination {path} is a directory")
            if req.mode == "new":
                raise TransferError(errno.EEXIST, f"destination {path} exists (mode new)")
            if (
                req.mode == "skip-existing"
                and existing.st_size == cap.size
                and existing.st_mtime_ns == cap.mtime_ns
            ):
                rec.state, rec.reason = "skipped", "destination has the same size and modification time"
                rec.bytes_done = cap.size
                return cap.size
        identity = RestartRecord(
            rec.source.split(":", 1)[0], cap.path, cap.size, cap.mtime_ns, t.block_size, rec.id, cap.ino
        )
        present = self._try_resume(t, identity) if req.mode != "new" else 0
        if not present:
            self._close_files(t)
            self._remove_quietly(t.journal, root)
            t.part_fd = root.open(t.part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            vfs = os.fstatvfs(t.part_fd)
            if vfs.f_bavail * vfs.f_frsize < cap.size:
                self._close_files(t)
                self._remove_quietly(t.part, root)
                raise TransferError(errno.ENOSPC, f"not enough space for {cap.size} bytes at {path}")
            t.journal_fd = root.open(
                t.journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW, 0o600
            )
            self._write_file(root, t.restart, msgspec.json.encode(identity))
        rec.bytes_done = present
        return present

    def _try_resume(self, t: Transfer, identity: RestartRecord) -> int:
        """Reuse a part file left by the same source file: bytes already present, or 0."""
        root = t.root
        try:
            with root.opened(t.restart, os.O_RDONLY | os.O_NOFOLLOW) as fd:
                old = msgspec.json.decode(os.read(fd, 65536), type=RestartRecord)
            same = (old.source, old.source_path, old.size, old.mtime_ns, old.source_ino) == (
                identity.source,
                identity.source_path,
                identity.size,
                identity.mtime_ns,
                identity.source_ino,
            )
            # The record lives in the export: never trust its block size blindly.
            if not same or not MIN_BLOCK <= old.block_size <= d.MAX_BLOCK:
                return 0
            if -(-t.cap.size // old.block_size) > MAX_BLOCKS:
                return 0
            with root.opened(t.journal, os.O_RDONLY | os.O_NOFOLLOW) as fd:
                raw = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            t.part_fd = root.open(t.part, os.O_RDWR | os.O_NOFOLLOW)
        except (OSError, msgspec.MsgspecError):
            return 0
        t.block_size = old.block_size
        t.nblocks = (t.cap.size + t.block_size - 1) // t.block_size
        t.digests = [None] * t.nblocks
        present = rehashed_bad = 0
        view = memoryview(bytearray(CHUNK))
        hasher = xxhash.xxh3_64()
        whole = len(raw) - len(raw) % d.JOURNAL.size  # a torn last entry is ignored
        for index, digest in d.JOURNAL.iter_unpack(raw[:whole]):
            if index >= t.nblocks or t.digests[index] is not None:
                continue
            if t.verify and not digest:
                continue  # journaled by an unverified run: fetch (and check) it again
            offset, length = t.block_range(index)
            # The journal is written before the data is surely on disk (a crash can lose the
            # data and keep the entry): a verified block is trusted only if it still hashes right.
            if digest and _hash_range(t.part_fd, offset, length, view, hasher) != digest:
                rehashed_bad += 1
                continue
            t.digests[index] = digest
            present += length
        t.journal_fd = root.open(t.journal, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        log.info(
            "transfer %s: resuming with %d of %d bytes already present%s",
            t.rec.id,
            present,
            t.cap.size,
            f" ({rehashed_bad} journaled blocks failed their re-check)" if rehashed_bad else "",
        )
        return present

    def _close_files(self, t: Transfer) -> None:
        for fd in (t.part_fd, t.journal_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        t.part_fd = t.journal_fd = -1

    @staticmethod
    def _write_file(root: ExportRoot, path: str, data: bytes) -> None:
        fd = root.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    @staticmethod
    def _remove_quietly(path: str, root: ExportRoot) -> None:
        try:
            with root.parent(path) as (fd, name):
                os.unlink(name, dir_fd=fd)
        except OSError:
            pass

    async def _run(self, t: Transfer, req: m.TransferStart) -> None:
        rec = t.rec
        timing = [0.0, 0.0]  # seconds receiving, seconds committing (fsync, xattrs, rename)
        try:
            with trio.CancelScope() as scope:
                t.cancel_scope = scope
                async with self.slots:
                    rec.state = "running"
                    self._changed(t)
                    t0 = trio.current_time()
                    await self._receive(t, req)
                    rec.state = "verifying"
                    self._changed(t)
                    t1 = trio.current_time()
                    await trio.to_thread.run_sync(self._commit, t, req)
                    timing = [t1 - t0, trio.current_time() - t1]
                    rec.state = "done"
            if scope.cancelled_caught and rec.state != "done":
                rec.state = "failed"
        except OSError as exc:
            rec.state, rec.errno = "failed", exc.errno or errno.EIO
            rec.reason = rec.reason or exc.strerror or str(exc)
        except Exception as exc:
            log.exception("transfer %s crashed", rec.id)
            rec.state, rec.errno, rec.reason = "failed", errno.EIO, f"internal error: {exc!r}"
        finally:
            if rec.state == "failed" and (
                rec.errno in (errno.ENOSPC, errno.ESTALE) or all(dg is None for dg in t.digests)
            ):
                # Nothing worth resuming (no block arrived, or the source changed): leave no trace.
                self._cleanup_part(t)
            if rec.state == "failed":
                log.warning(
                    "transfer %s %s -> %s failed: %s", rec.id, rec.source, rec.destination, rec.reason
                )
            else:
                log.info(
                    "transfer %s %s -> %s %s (%d bytes; receive %.3f s, commit %.3f s)",
                    rec.id,
                    rec.source,
                    rec.destination,
                    rec.state,
                    rec.bytes_done,
                    *timing,
                )
            self._finish(t)

    def _finish(self, t: Transfer) -> None:
        t.rec.finished = time.time()
        self._close_files(t)
        self._release(t)
        self.records[t.rec.id] = t.rec
        self.store.save(t.rec)
        self._prune_records()
        t.finished.set()
        self._changed(t)

    def _release(self, t: Transfer) -> None:
        """Forget a transfer that is over: its id, its destination claim, its hooks and sockets."""
        self.active.pop(t.rec.id, None)
        if self.by_path.get((t.rec.export, t.rec.path)) == t.rec.id:
            del self.by_path[(t.rec.export, t.rec.path)]
        if t.session is not None and t.on_close in t.session.on_close:
            t.session.on_close.remove(t.on_close)
        if t.push_sockets is not None:
            t.push_sockets.close()
        if t.push_receive is not None:
            # Push connections that arrived but were never used.
            while True:
                try:
                    t.push_receive.receive_nowait().close()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break

    def _prune_records(self) -> None:
        finished = [r for r in self.records.values() if r.state in TERMINAL and r.id not in self.active]
        if len(finished) <= KEEP_RECORDS:
            return
        for rec in sorted(finished, key=lambda r: r.finished)[: len(finished) - KEEP_RECORDS]:
            del self.records[rec.id]
            self.store.remove(rec.id)

    def _cleanup_part(self, t: Transfer) -> None:
        for p in (t.part, t.restart, t.journal):
            self._remove_quietly(p, t.root)

    def _changed(self, t: Transfer) -> None:
        t.changed.set()
        t.changed = trio.Event()

    async def _receive(self, t: Transfer, req: m.TransferStart) -> None:
        todo = [i for i in range(t.nblocks) if t.digests[i] is None]
        if not todo:
            return
        queue = t.queue = BlockQueue(todo)
        nstreams = min(t.rec.streams, len(todo))
        errors: list[OSError] = []

        async def one_stream(i: int) -> None:
            try:
                if req.direction == "push":
                    assert t.push_receive is not None
                    with trio.fail_after(CONNECT_TIMEOUT * 2):
                        sock = await t.push_receive.receive()
                    try:
                        await trio.to_thread.run_sync(self._expect_ready, t, sock, limiter=self.data_threads)
                    except BaseException:
                        sock.close()
                        raise
                else:
                    sock = await trio.to_thread.run_sync(
                        self._connect_source, t, req, i, limiter=self.data_threads
                    )
                t.sockets.append(sock)
                try:
                    await trio.to_thread.run_sync(
                        t.fetch_stream, sock, queue, self.config.receiver, limiter=self.data_threads
                    )
                finally:
                    sock.close()
            except trio.TooSlowError:
                errors.append(TransferError(errno.ETIMEDOUT, "the source did not connect to push its data"))
            except OSError as exc:
                errors.append(exc)
                if not t.cancelled:
                    log.warning("transfer %s stream %d: %s", t.rec.id, i, exc)

        progress_task_done = trio.Event()

        async def progress() -> None:
            while not progress_task_done.is_set():
                with trio.move_on_after(0.25):
                    await progress_task_done.wait()
                self._changed(t)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            async with trio.open_nursery() as streams:
                for i in range(nstreams):
                    streams.start_soon(one_stream, i)
            progress_task_done.set()
        missing = [i for i in range(t.nblocks) if t.digests[i] is None]
        if missing:
            if t.cancelled:
                raise TransferError(t.rec.errno or errno.EINTR, t.rec.reason or "cancelled")
            # A changed source explains every other stream's failure (the source may just drop those).
            stale = [e for e in errors if e.errno == errno.ESTALE]
            first = (stale or errors or [TransferError(errno.EIO, "streams ended early")])[0]
            raise TransferError(
                first.errno or errno.EIO, f"{len(missing)} blocks missing: {first.strerror or first}"
            )

    def _connect_source(self, t: Transfer, req: m.TransferStart, stream: int) -> socket.socket:
        cap = t.cap
        try:
            sock = self._connect_data(cap.data_host, cap.data_port, cap.data_tls)
        except ssl.SSLError as exc:
            raise TransferError(errno.EACCES, f"TLS with the source's data port failed: {exc}") from None
        except OSError as exc:
            raise TransferError(
                exc.errno or errno.EHOSTUNREACH,
                f"cannot connect to the source's data port {cap.data_host}:{cap.data_port}: "
                f"{exc.strerror or exc}",
            ) from None
        try:
            _send(
                sock,
                d.encode(
                    d.DataHello(kind="pull", token=cap.token, transfer_id=cap.transfer_id, stream=stream)
                ),
            )
            self._expect_ready(t, sock)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _expect_ready(t: Transfer, sock: socket.socket) -> None:
        """The source's answer to a data hello (it comes first in both directions)."""
        reply = d.decode_reply(_recv_frame(sock))
        if isinstance(reply, d.DataError):
            raise TransferError(reply.errno, f"source refused: {reply.message}")
        if reply.size != t.cap.size:
            raise TransferError(errno.ESTALE, "source size changed")

    def _commit(self, t: Transfer, req: m.TransferStart) -> None:
        """All blocks are in: make the part file durable, label it, and put it in place."""
        rec, root = t.rec, t.root
        os.ftruncate(t.part_fd, t.cap.size)
        os.fdatasync(t.part_fd)
        proc = f"/proc/self/fd/{t.part_fd}"
        try:
            # Without verification the blocks carry no digests: claim none rather than a fake one.
            if t.verify:
                rec.digest = t.tree_digest()
                os.setxattr(proc, "user.etfs.digest", rec.digest.encode())
            os.setxattr(proc, "user.etfs.transfer_id", rec.id.encode())
            os.setxattr(proc, "user.etfs.source", rec.source.encode())
        except OSError as exc:
            log.info("transfer %s: cannot set user.etfs.* xattrs: %s", rec.id, exc)
        os.fchmod(t.part_fd, 0o644)
        if req.mode == "skip-existing" or req.preserve_times:
            os.utime(proc, ns=(t.cap.mtime_ns, t.cap.mtime_ns))
        with root.parent(t.part) as (pfd, pname), root.parent(rec.path) as (dfd, dname):
            if req.mode == "new":
                native.renameat2(pfd, pname, dfd, dname, native.RENAME_NOREPLACE)
            else:
                os.rename(pname, dname, src_dir_fd=pfd, dst_dir_fd=dfd)
        for p in (t.restart, t.journal):
            self._remove_quietly(p, root)

    def _cancel(self, t: Transfer, reason: str, code: int) -> None:
        if t.rec.state in TERMINAL or t.cancelled:
            return
        t.cancelled = True
        t.rec.reason, t.rec.errno = reason, code
        if t.queue is not None:
            t.queue.close()
        for sock in list(t.sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if t.cancel_scope is not None:
            t.cancel_scope.cancel()

    def _own(self, session: Session, transfer_id: str) -> tuple[Transfer | None, Record]:
        """A transfer of this user (others' transfers are not even said to exist)."""
        t = self.active.get(transfer_id)
        rec = t.rec if t is not None else self.records.get(transfer_id)
        if rec is None or rec.user != session.user:
            raise TransferError(errno.ENOENT, f"no transfer {transfer_id}")
        return t, rec

    async def op_transferwait(self, session: Session, req: m.TransferWait) -> m.TransferInfo:
        t, rec = self._own(session, req.transfer_id)
        if t is not None:
            with trio.move_on_after(max(0.0, min(req.timeout, 30.0))):
                await t.changed.wait()
        return rec.info()

    async def op_transfercancel(self, session: Session, req: m.TransferCancel) -> m.TransferInfo:
        t, rec = self._own(session, req.transfer_id)
        if t is not None:
            self._cancel(t, req.reason, errno.EINTR)
            with trio.move_on_after(5):
                await t.finished.wait()
        return rec.info()

    async def op_transferlist(self, session: Session, req: m.TransferList) -> list[m.TransferInfo]:
        return [r.info() for r in self.records.values() if r.user == session.user]

    async def op_localcopy(self, session: Session, req: m.LocalCopy) -> m.TransferInfo:
        """Same-server copy: the server's own copy_file_range into a part file, then rename."""
        if req.mode not in ("new", "overwrite", "resume", "skip-existing"):
            raise TransferError(errno.EINVAL, f"unknown mode {req.mode!r}")

        def check() -> tuple[str, str]:
            return session.check(req.src, Right.READ), session.check(req.dst, Right.WRITE)

        src, dst = await trio.to_thread.run_sync(check)
        export = self._export_name(session)
        if (export, dst) in self.by_path:
            raise TransferError(errno.EBUSY, f"another transfer into {dst} is running")
        tid = secrets.token_hex(8)
        rec = Record(tid, f"{self.config.name}:{src}", f"{self.config.name}:{dst}", export, dst, session.user)
        rec.mode, rec.direction, rec.state = req.mode, "local", "running"
        self.by_path[(export, dst)] = tid

        def copy() -> None:
            root = session.root
            part, _, _ = part_paths(dst)
            with root.opened(src, os.O_RDONLY | os.O_NOFOLLOW) as sfd:
                s = os.fstat(sfd)
                rec.bytes_total = s.st_size
                try:
                    old: os.stat_result | None = root.lstat(dst)
                except FileNotFoundError:
                    old = None
                if old is not None and req.mode == "new":
                    raise TransferError(errno.EEXIST, f"destination {dst} exists (mode new)")
                if (
                    old is not None
                    and req.mode == "skip-existing"
                    and (old.st_size, old.st_mtime_ns)
                    == (
                        s.st_size,
                        s.st_mtime_ns,
                    )
                ):
                    rec.state, rec.bytes_done = "skipped", s.st_size
                    return
                dfd = root.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
                try:
                    pos = 0
                    while pos < s.st_size:
                        n = os.copy_file_range(sfd, dfd, s.st_size - pos, pos, pos)
                        if n == 0:
                            break
                        pos += n
                    now = os.fstat(sfd)
                    if pos != s.st_size or (now.st_size, now.st_mtime_ns) != (s.st_size, s.st_mtime_ns):
                        raise TransferError(errno.ESTALE, f"source {src} changed during the copy")
                    if req.preserve_times or req.mode == "skip-existing":
                        # so that the next skip-existing run recognises the copy
                        os.utime(dfd, ns=(s.st_mtime_ns, s.st_mtime_ns))
                    os.fdatasync(dfd)
                    rec.bytes_done = pos
                    with root.parent(part) as (pfd, pname), root.parent(dst) as (dfd2, dname):
                        flags = native.RENAME_NOREPLACE if req.mode == "new" else 0
                        native.renameat2(pfd, pname, dfd2, dname, flags)
                except BaseException:
                    self._remove_quietly(part, root)
                    raise
                finally:
                    os.close(dfd)
            rec.state = "done"

        try:
            await trio.to_thread.run_sync(copy, limiter=self.data_threads)
        except OSError as exc:
            rec.state, rec.errno, rec.reason = "failed", exc.errno or errno.EIO, exc.strerror or str(exc)
            raise
        finally:
            if self.by_path.get((export, dst)) == tid:
                del self.by_path[(export, dst)]
            rec.finished = time.time()
            self.records[tid] = rec
            self.store.save(rec)
        return rec.info()
