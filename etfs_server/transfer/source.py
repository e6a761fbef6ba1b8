"""The source role: issue capabilities, answer block requests, and (push) connect out to the
destination's data port.

Before each block the file is checked against the capability: a file changed under a
transfer is answered with STATUS_STALE instead of a mix of versions.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import ssl
import stat as st
import time
import weakref
from typing import Any

import trio
import xxhash

from etfs import _sendfile_cffi as native
from etfs.common.ratelimit import MIN_RATE, Throttle, TokenBucket, throttle_of
from etfs.protocol import data as d
from etfs.protocol import messages as m

from ..acl import Right
from ..config import ServerConfig
from ..exports import ExportRoot
from ..handlers import Session
from ..identity import as_account
from .capabilities import CapabilityBody, CapabilityTable, Issued, Signer, file_identity
from .datapath import CHUNK, DataLinks, hash_range, receive_event, send
from .errors import TransferError

log = logging.getLogger(__name__)


def serve_blocks(
    sock: socket.socket,
    fd: int,
    size: int,
    sender: str,
    block_limit: int,
    identity: tuple[int, int, int, int, int] | None = None,
    throttle: Throttle | None = None,
) -> tuple[int, bool]:
    """Source side of one data connection: answer block requests until the peer is done.

    The file must keep ``identity`` (`file_identity`) before and after each block it sends:
    a changed file is answered with STATUS_STALE (in the header, or in the trailer when it
    changed while the block was on its way) instead of a mix of versions.  Returns the bytes
    sent and whether the destination said the transfer has every block (FLAG_END).

    With a ``throttle`` (a bandwidth limit) blocks go out in pieces, each paid for in its
    buckets first (`send_paced`); without one the path is exactly the unlimited one.
    """
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    hasher = xxhash.xxh3_64()
    sent = 0
    conn = d.BlockSource()

    def changed() -> bool:
        now = os.fstat(fd)
        return now.st_size != size or (identity is not None and file_identity(now) != identity)

    while True:
        try:
            event = receive_event(sock, conn)
        except ConnectionResetError:
            return sent, False  # the destination closed: it has what it wanted, or gave up
        if isinstance(event, d.Done):
            return sent, event.end
        assert isinstance(event, d.BlockRequest)
        offset, length, digest = event.offset, event.length, event.digest
        if changed():
            send(sock, conn.header(offset, 0, d.STATUS_STALE))
            continue
        if offset > size or length > block_limit or offset + length > size:
            send(sock, conn.header(offset, 0, d.STATUS_RANGE))
            continue
        send(sock, conn.header(offset, length))
        digest_value: int | None = 0
        if throttle is not None:
            n, digest_value = send_paced(sock, fd, offset, length, sender, digest, view, hasher, throttle)
        elif isinstance(sock, ssl.SSLSocket) or (sender != "sendfile" and digest):
            # Piece by piece, hashing each piece while it is in the buffer.  TLS: the bytes
            # must pass through user space to be encrypted anyway.
            hasher.reset()
            n = 0
            while n < length:
                want = min(CHUNK, length - n)
                if isinstance(sock, ssl.SSLSocket):
                    got = os.preadv(fd, [view[:want]], offset + n)
                    send(sock, view[:got])
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
                digest_value = hash_range(fd, offset, length, view, hasher)
        else:
            # No digest: the C loop walks the whole block through the CHUNK buffer.
            n = native.read_send(fd, sock.fileno(), offset, length, buf)
        if n != length or digest_value is None:
            raise TransferError(errno.EIO, f"source file shrank while sending (got {n} of {length} bytes)")
        # Checked again once the block is out: a write (even with its mtime put back) while
        # the block was read shows in ctime, and the destination must not keep the block.
        send(sock, conn.trailer(digest_value, d.STATUS_STALE if changed() else 0))
        sent += n


def send_paced(
    sock: socket.socket,
    fd: int,
    offset: int,
    length: int,
    sender: str,
    digest: bool,
    view: memoryview,
    hasher: Any,
    throttle: Throttle,
) -> tuple[int, int | None]:
    """Send one block under a bandwidth limit: bytes sent and its digest (0 without one).

    Pieces of `Throttle.piece` bytes (at most CHUNK), each taken from the buckets before
    it goes out, so a limit holds within ~0.1 s and a cancelled transfer notices soon.
    """
    tls = isinstance(sock, ssl.SSLSocket)
    through_buffer = tls or sender != "sendfile"  # the bytes pass through ``view``: hash them there
    hasher.reset()
    n = 0
    while n < length:
        want = min(throttle.piece, CHUNK, length - n)
        throttle.take(want)
        if tls:
            got = os.preadv(fd, [view[:want]], offset + n)
            send(sock, view[:got])
        elif sender == "sendfile":
            got = native.sendfile(sock.fileno(), fd, offset + n, want)
        else:
            got = native.read_send(fd, sock.fileno(), offset + n, want, view)
        if digest and through_buffer:
            hasher.update(view[:got])
        n += got
        if got < want:
            break
    if not digest:
        return n, 0
    if through_buffer:
        return n, hasher.intdigest()
    return n, hash_range(fd, offset, length, view, hasher) if n == length else 0


class SourceRole:
    """Everything this server does as a transfer's source."""

    def __init__(
        self,
        config: ServerConfig,
        roots: dict[str, ExportRoot],
        links: DataLinks,
        data_threads: trio.CapacityLimiter,
    ) -> None:
        self.config = config
        self.roots = roots
        self.links = links
        self.data_threads = data_threads
        self.caps = CapabilityTable(Signer.load(config.state_dir))
        self.data_port = 0
        self.nursery: trio.Nursery | None = None
        # server.yaml transfer.bwlimit_out: every byte this server sends as a source.
        self.out_bucket = TokenBucket(config.bwlimit_out) if config.bwlimit_out else None
        # Limits shared by the transfers of one (user, client's group): e.g. a server pair.
        self.groups: weakref.WeakValueDictionary[tuple[str, str], TokenBucket] = weakref.WeakValueDictionary()

    async def offer(self, session: Session, export: str, req: m.TransferOffer) -> m.Capability:
        def look() -> tuple[str, os.stat_result]:
            # transfer-out AND read: the capability lets the bearer read the file. Resolved once
            # and opened through the directory that was checked, as the user's account; the data
            # port later serves only a file with this very identity (open_file).
            with as_account(session.account), session.at(req.path, Right.TRANSFER_OUT, Right.READ) as loc:
                fd = session.root.open_at(loc, os.O_RDONLY)
                try:
                    return loc.path, os.fstat(fd)
                finally:
                    os.close(fd)

        path, s = await trio.to_thread.run_sync(look)
        if not st.S_ISREG(s.st_mode):
            raise TransferError(
                errno.EISDIR if st.S_ISDIR(s.st_mode) else errno.EINVAL, f"{path} is not a regular file"
            )
        ttl = max(1.0, min(req.ttl, self.config.capability_ttl))
        body = CapabilityBody(
            transfer_id=secrets.token_hex(8),
            export=export,
            path=path,
            size=s.st_size,
            mtime_ns=s.st_mtime_ns,
            ino=s.st_ino,
            expires=time.time() + ttl,
            user=session.user,
            dev=s.st_dev,
            ctime_ns=s.st_ctime_ns,
        )
        throttle = self._throttle(session.user, req)  # refuse bad limits before issuing anything
        issued = self.caps.issue(body)
        issued.throttle = throttle
        log.info(
            "capability %s issued to %s for %s (%d bytes)", body.transfer_id, session.user, path, s.st_size
        )
        return m.Capability(
            token=issued.token,
            transfer_id=body.transfer_id,
            path=path,
            size=s.st_size,
            mtime_ns=s.st_mtime_ns,
            data_host=self.config.advertise_host,
            data_port=self.data_port,
            expires=body.expires,
            data_tls=self.links.tls_server is not None,
            ino=s.st_ino,
            secret=issued.secret,
        )

    def _throttle(self, user: str, req: m.TransferOffer) -> Throttle | None:
        """The buckets a transfer's streams pay into: the client's limits, and this server's."""
        if len(req.limits) > m.MAX_RATE_LIMITS:
            raise TransferError(errno.EINVAL, f"at most {m.MAX_RATE_LIMITS} bandwidth limits per transfer")
        buckets: list[TokenBucket | None] = [self.out_bucket]
        for limit in req.limits:
            if limit.rate < MIN_RATE:
                raise TransferError(errno.EINVAL, f"bandwidth limit {limit.rate} B/s: at least {MIN_RATE}")
            if len(limit.group) > 256:
                raise TransferError(errno.EINVAL, "bandwidth limit group: at most 256 characters")
            if not limit.group:
                buckets.append(TokenBucket(limit.rate))
                continue
            # Shared by the user's transfers of that group while any of them is known.
            bucket = self.groups.get((user, limit.group))
            if bucket is None:
                bucket = self.groups[(user, limit.group)] = TokenBucket(limit.rate)
            elif bucket.rate != limit.rate:
                bucket.set_rate(limit.rate)  # the client's configuration changed
            buckets.append(bucket)
        return throttle_of(buckets)

    def open_file(self, issued: Issued) -> int:
        """The capability's file, if it is still the one it was issued for (blocking)."""
        body = issued.body
        root = self.roots.get(body.export)
        if root is None:
            raise TransferError(errno.ENOENT, f"capability names unknown export {body.export!r}")
        fd = root.open(body.path, os.O_RDONLY | os.O_NOFOLLOW)
        if file_identity(os.fstat(fd)) != body.identity():
            os.close(fd)
            raise TransferError(errno.ESTALE, f"source {body.path} changed since the capability was issued")
        return fd

    def serve(self, sock: socket.socket, issued: Issued, fd: int) -> None:
        """Answer one data connection's block requests; closes ``fd`` and releases the connection."""
        body = issued.body
        ended = False
        try:
            send(sock, d.encode(d.DataReady(size=body.size, mtime_ns=body.mtime_ns)))
            sent, ended = serve_blocks(
                sock, fd, body.size, self.config.sender, d.MAX_BLOCK, body.identity(), issued.throttle
            )
            log.debug("transfer %s: stream served %d bytes of %s", body.transfer_id, sent, body.path)
        finally:
            os.close(fd)
            self.caps.release(issued, ended)

    async def push(self, session: Session, req: m.TransferPush) -> None:
        body = self.caps.signer.check(req.capability.token)
        if body.user != session.user:
            raise TransferError(errno.EACCES, "push refused: the capability was issued to another user")
        self.links.check_peer(req.host)
        streams = max(0, min(req.streams, self.config.max_streams))
        issued = self.caps.claim_push(req.capability.token, f"{req.host}:{req.port}", streams)
        assert self.nursery is not None

        def connect_one(stream: int) -> None:
            fd, serving = -1, False
            try:
                fd = self.open_file(issued)
                hello = d.DataHello("push", req.ticket, body.transfer_id, stream)
                with self.links.open(req.host, req.port, req.tls, req.ticket, hello) as sock:
                    serving = True  # serve() closes fd and releases the connection
                    self.serve(sock, issued, fd)
            finally:
                if not serving:
                    if fd >= 0:
                        os.close(fd)
                    self.caps.release(issued, False)

        async def run_one(stream: int) -> None:
            try:
                await trio.to_thread.run_sync(connect_one, stream, limiter=self.data_threads)
            except OSError as exc:
                log.warning("push of %s, stream %d: %s", body.path, stream, exc)

        for i in range(streams):
            self.nursery.start_soon(run_one, i)
