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

import trio
import xxhash

from etfs import _sendfile_cffi as native
from etfs.protocol import data as d
from etfs.protocol import messages as m
from etfs.protocol.transfer import FailureCode

from ..acl import Right
from ..config import ServerConfig
from ..exports import ExportRoot
from ..handlers import Session
from .capabilities import CapabilityBody, Signer
from .datapath import CHUNK, DataLinks, hash_range, recv_exact, send
from .errors import TransferError

log = logging.getLogger(__name__)


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
            raw = recv_exact(sock, d.REQUEST.size)
        except ConnectionResetError:
            return sent  # the destination closed: it has what it wanted
        offset, length, flags = d.REQUEST.unpack(raw)
        if flags & d.FLAG_DONE:
            return sent
        now = os.fstat(fd)
        if now.st_size != size or (mtime_ns >= 0 and now.st_mtime_ns != mtime_ns):
            send(sock, d.BLOCK.pack(offset, 0, d.STATUS_STALE))
            continue
        if offset > size or length > block_limit or offset + length > size:
            send(sock, d.BLOCK.pack(offset, 0, d.STATUS_RANGE))
            continue
        send(sock, d.BLOCK.pack(offset, length, 0))
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
        send(sock, d.DIGEST.pack(digest_value))
        sent += n


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
        self.signer = Signer.load(config.state_dir)
        # Data connections opened per capability: one transfer's streams, not a free-for-all.
        self.cap_uses: dict[str, tuple[int, float]] = {}
        self.data_port = 0
        self.nursery: trio.Nursery | None = None

    async def offer(self, session: Session, export: str, req: m.TransferOffer) -> m.Capability:
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
            export=export,
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
            data_tls=self.links.tls_server is not None,
            ino=s.st_ino,
        )

    def open(self, token: bytes, count: bool = True) -> tuple[CapabilityBody, int]:
        """Check a capability and open its file (blocking); the caller closes the fd."""
        body = self.signer.check(token)
        if count:
            uses, expires = self.cap_uses.get(body.transfer_id, (0, body.expires))
            if uses >= 2 * self.config.max_streams:
                raise TransferError(
                    errno.EACCES,
                    "capability refused: already used by a full transfer",
                    FailureCode.CAPABILITY_REFUSED,
                )
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

    def serve(self, sock: socket.socket, body: CapabilityBody, fd: int) -> None:
        """Answer one data connection's block requests; closes ``fd``."""
        try:
            send(sock, d.encode(d.DataReady(size=body.size, mtime_ns=body.mtime_ns)))
            sent = serve_blocks(sock, fd, body.size, self.config.sender, d.MAX_BLOCK, body.mtime_ns)
            log.debug("transfer %s: stream served %d bytes of %s", body.transfer_id, sent, body.path)
        finally:
            os.close(fd)

    async def push(self, session: Session, req: m.TransferPush) -> None:
        body, fd = await trio.to_thread.run_sync(self.open, req.capability.token, False)
        os.close(fd)
        if body.user != session.user:
            raise TransferError(errno.EACCES, "push refused: the capability was issued to another user")
        self.links.check_peer(req.host)
        streams = max(0, min(req.streams, self.config.max_streams))
        assert self.nursery is not None

        def connect_one(stream: int) -> None:
            body, fd = self.open(req.capability.token)
            try:
                sock = self.links.connect(req.host, req.port, req.tls)
            except OSError:
                os.close(fd)
                raise
            with sock:
                send(
                    sock,
                    d.encode(
                        d.DataHello(
                            kind="push", token=req.ticket, transfer_id=body.transfer_id, stream=stream
                        )
                    ),
                )
                self.serve(sock, body, fd)

        async def run_one(stream: int) -> None:
            try:
                await trio.to_thread.run_sync(connect_one, stream, limiter=self.data_threads)
            except OSError as exc:
                log.warning("push of %s, stream %d: %s", body.path, stream, exc)

        for i in range(streams):
            self.nursery.start_soon(run_one, i)
