"""The destination role: one `DestinationTransfer` per incoming transfer.

It owns its settings, its part file and journal, its state changes and its streams: it
prepares the part file (fresh, or resumed from the journal), deals blocks to N streams,
receives each into the part file at its offset, checks its digest, journals it, and
commits (fsync, xattrs, rename) only when every block arrived and matched.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import secrets
import socket
import ssl
import stat as st
import threading
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import trio
import xxhash

from etfs import _sendfile_cffi as native
from etfs.common.ratelimit import Throttle
from etfs.protocol import data as d
from etfs.protocol import messages as m
from etfs.protocol.transfer import (
    TERMINAL,
    CopyMode,
    Direction,
    FailureCode,
    TransferState,
    noreplace,
    parse_code,
    part_paths,
    relay_id_name,
    relay_part_name,
    same_version,
)

from ..identity import Account, as_account
from .datapath import CHUNK, CONNECT_TIMEOUT, hash_range, pwrite_all, receive_event, recv_into, send
from .errors import TransferError, failure_code
from .records import Record, RestartRecord
from .workdir import WorkDir

log = logging.getLogger(__name__)

PIPELINE = 2  # block requests in flight per stream
MAX_BLOCK_RETRIES = 3
MAX_SIZE = 1 << 46  # 64 TiB: bounds the per-block bookkeeping a client can make us allocate
MAX_BLOCKS = 1 << 22  # larger files get larger blocks
MIN_BLOCK = 64 * 1024
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def block_size_for(size: int, asked: int) -> int:
    """The block size of a transfer of ``size`` bytes: as asked, within bounds."""
    block_size = max(MIN_BLOCK, min(asked, d.MAX_BLOCK))
    return max(block_size, -(-size // MAX_BLOCKS))


@dataclass(frozen=True)
class Settings:
    """What the client asked for, checked: fixed for the transfer's life."""

    mode: CopyMode
    direction: Direction
    verify: bool
    preserve_times: bool = False
    receiver: str = "splice"  # or "recv_write" (server.yaml transfer.receiver)
    forget_relay: bool = False  # remove a broken relay's part file after the commit


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


class DestinationTransfer:
    """One transfer into this server: its record, settings, part file, journal and streams."""

    def __init__(
        self,
        rec: Record,
        cap: m.Capability,
        workdir: WorkDir,
        block_size: int,
        settings: Settings,
        account: Account | None = None,
    ) -> None:
        self.rec = rec
        self.cap = cap
        # The destination's directory, resolved and checked once; every file of the transfer
        # is opened, renamed and removed through it, as the user's account (workdir.py).
        self.workdir = workdir
        self.account = account
        self.settings = settings
        self.ticket = secrets.token_bytes(24)
        self.name = posixpath.basename(rec.path)
        self.part, self.restart, self.journal = (posixpath.basename(p) for p in part_paths(rec.path))
        self.block_size = block_size
        self.nblocks = 0
        self.digests: list[int | None] = []
        self._layout(block_size)
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.cancelled = False
        self.stale = False  # a stream saw the source change: the transfer fails, whatever arrived
        self.changed = trio.Event()
        self.finished = trio.Event()
        self.push_sockets: trio.MemorySendChannel[socket.socket] | None = None
        self.push_receive: trio.MemoryReceiveChannel[socket.socket] | None = None
        self.part_fd = -1
        self.journal_fd = -1
        self.cancel_scope: trio.CancelScope | None = None
        self.queue: BlockQueue | None = None
        self.on_finish: Callable[[], None] | None = None  # the service forgets us
        # server.yaml transfer.bwlimit_in, shared by every transfer into this server (None: none).
        self.throttle: Throttle | None = None

    def _layout(self, block_size: int) -> None:
        self.block_size = block_size
        self.nblocks = (self.cap.size + block_size - 1) // block_size
        self.digests = [None] * self.nblocks

    @property
    def verify(self) -> bool:
        return self.settings.verify

    # --- state ------------------------------------------------------------------------------------
    def set_state(self, state: TransferState) -> None:
        self.rec.state = state
        self.notify()

    def notify(self) -> None:
        """Wake whoever waits for news of this transfer (TransferWait)."""
        self.changed.set()
        self.changed = trio.Event()

    def missing(self) -> list[int]:
        return [i for i in range(self.nblocks) if self.digests[i] is None]

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

    def source_changed(self) -> TransferError:
        """Any stale signal on any stream fails the whole transfer (no other stream fills in)."""
        self.stale = True
        if self.queue is not None:
            self.queue.close()
        return TransferError(errno.ESTALE, f"source {self.cap.path} changed during the transfer")

    def cancel(self, reason: str, code: int) -> None:
        if self.rec.state in TERMINAL or self.cancelled:
            return
        self.cancelled = True
        self.rec.reason, self.rec.errno = reason, code
        self.rec.code = failure_code(OSError(code, reason))
        if self.queue is not None:
            self.queue.close()
        for sock in list(self.sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # --- files (blocking) -------------------------------------------------------------------------
    def prepare(self) -> int:
        """Check the mode, set up part file and journal; returns bytes already present (resume).

        On an exception the caller closes what was opened and removes nothing it did not create.
        """
        with as_account(self.account):
            return self._prepare()

    def _prepare(self) -> int:
        wd, path, cap, rec, mode = self.workdir, self.rec.path, self.cap, self.rec, self.settings.mode
        existing = wd.lstat(self.name)
        if existing is not None:
            if st.S_ISDIR(existing.st_mode):
                raise TransferError(errno.EISDIR, f"destination {path} is a directory")
            if mode == CopyMode.NEW:
                raise TransferError(errno.EEXIST, f"destination {path} exists (mode new)")
            if mode == CopyMode.SKIP_EXISTING and same_version(
                existing.st_size, existing.st_mtime_ns, cap.size, cap.mtime_ns
            ):
                rec.state, rec.reason = (
                    TransferState.SKIPPED,
                    "destination has the same size and modification time",
                )
                rec.bytes_done = cap.size
                return cap.size
        identity = RestartRecord(
            rec.source.split(":", 1)[0], cap.path, cap.size, cap.mtime_ns, self.block_size, rec.id, cap.ino
        )
        present = self._try_resume(identity) if mode != CopyMode.NEW else 0
        if not present:
            self.close_files()
            wd.remove_quietly(self.journal)
            self.part_fd = wd.create(self.part, os.O_RDWR)
            vfs = os.fstatvfs(self.part_fd)
            if vfs.f_bavail * vfs.f_frsize < cap.size:
                self.close_files()
                wd.remove_quietly(self.part)
                raise TransferError(errno.ENOSPC, f"not enough space for {cap.size} bytes at {path}")
            self.journal_fd = wd.create(self.journal, os.O_WRONLY | os.O_APPEND)
            wd.write_file(self.restart, msgspec.json.encode(identity))
        rec.bytes_done = present
        return present

    def _try_resume(self, identity: RestartRecord) -> int:
        """Reuse a part file left by the same source file: bytes already present, or 0."""
        wd = self.workdir
        try:
            # Only files that are surely this server's own work files (WorkDir.reopen).
            fd = wd.reopen(self.restart, os.O_RDONLY)
            if fd is None:
                return 0
            try:
                old = msgspec.json.decode(os.read(fd, 65536), type=RestartRecord)
            finally:
                os.close(fd)
            # The record lives in the export: never trust its block size blindly.
            if not old.same_source(identity) or not MIN_BLOCK <= old.block_size <= d.MAX_BLOCK:
                return 0
            if -(-self.cap.size // old.block_size) > MAX_BLOCKS:
                return 0
            fd = wd.reopen(self.journal, os.O_RDONLY)
            if fd is None:
                return 0
            try:
                raw = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            finally:
                os.close(fd)
            part_fd = wd.reopen(self.part, os.O_RDWR)
            if part_fd is None:
                return 0
            self.part_fd = part_fd
        except (OSError, msgspec.MsgspecError):
            return 0
        self._layout(old.block_size)
        present = rehashed_bad = 0
        view = memoryview(bytearray(CHUNK))
        hasher = xxhash.xxh3_64()
        whole = len(raw) - len(raw) % d.JOURNAL.size  # a torn last entry is ignored
        for index, digest in d.JOURNAL.iter_unpack(raw[:whole]):
            if index >= self.nblocks or self.digests[index] is not None:
                continue
            if self.verify and not digest:
                continue  # journaled by an unverified run: fetch (and check) it again
            offset, length = self.block_range(index)
            # The journal is written before the data is surely on disk (a crash can lose the
            # data and keep the entry): a verified block is trusted only if it still hashes right.
            if digest and hash_range(self.part_fd, offset, length, view, hasher) != digest:
                rehashed_bad += 1
                continue
            self.digests[index] = digest
            present += length
        journal_fd = wd.reopen(self.journal, os.O_WRONLY | os.O_APPEND)
        if journal_fd is None:
            raise TransferError(errno.EAGAIN, f"the journal of {self.rec.path} vanished while resuming")
        self.journal_fd = journal_fd
        log.info(
            "transfer %s: resuming with %d of %d bytes already present%s",
            self.rec.id,
            present,
            self.cap.size,
            f" ({rehashed_bad} journaled blocks failed their re-check)" if rehashed_bad else "",
        )
        return present

    def close_files(self) -> None:
        for fd in (self.part_fd, self.journal_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.part_fd = self.journal_fd = -1

    def remove_part(self) -> None:
        with as_account(self.account):
            for name in (self.part, self.restart, self.journal):
                self.workdir.remove_quietly(name)

    def close_dir(self) -> None:
        """The transfer is over: let go of its destination directory."""
        self.workdir.close()

    def commit(self) -> None:
        """All blocks are in: make the part file durable, label it, and put it in place."""
        with as_account(self.account):
            self._commit()

    def _commit(self) -> None:
        rec, wd, cap = self.rec, self.workdir, self.cap
        os.ftruncate(self.part_fd, cap.size)
        os.fdatasync(self.part_fd)
        proc = f"/proc/self/fd/{self.part_fd}"
        try:
            # Without verification the blocks carry no digests: claim none rather than a fake one.
            if self.verify:
                rec.digest = self.tree_digest()
                os.setxattr(proc, "user.etfs.digest", rec.digest.encode())
            os.setxattr(proc, "user.etfs.transfer_id", rec.id.encode())
            os.setxattr(proc, "user.etfs.source", rec.source.encode())
        except OSError as exc:
            log.info("transfer %s: cannot set user.etfs.* xattrs: %s", rec.id, exc)
        os.fchmod(self.part_fd, 0o644)
        if self.settings.mode == CopyMode.SKIP_EXISTING or self.settings.preserve_times:
            os.utime(proc, ns=(cap.mtime_ns, cap.mtime_ns))
        wd.rename(self.part, self.name, noreplace=noreplace(self.settings.mode))
        leftovers = [self.restart, self.journal]
        if self.settings.forget_relay:
            leftovers += [relay_part_name(self.name), relay_id_name(self.name)]
        for name in leftovers:
            wd.remove_quietly(name)

    # --- one data connection (blocking, in a worker thread) ----------------------------------------
    def expect_ready(self, sock: socket.socket) -> None:
        """The source's answer to a data hello (it comes first in both directions)."""
        reply = receive_event(sock, d.ReplyReader())
        assert isinstance(reply, (d.DataReady, d.DataError))
        if isinstance(reply, d.DataError):
            raise TransferError(reply.errno, f"source refused: {reply.message}", parse_code(reply.code))
        if reply.size != self.cap.size:
            raise TransferError(errno.ESTALE, "source size changed")

    def fetch_stream(self, sock: socket.socket, queue: BlockQueue) -> None:
        """Destination side of one data connection: request blocks, receive, verify, journal.

        Receiver "splice" moves socket -> pipe -> file without a user-space copy and
        re-reads the block from the page cache to hash it; "recv_write" receives into a
        buffer, writes it and hashes the buffer.  Either way a block passes through one
        CHUNK-sized buffer per stream, piece by piece.
        """
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        hasher = xxhash.xxh3_64()
        pipe = native.Pipe() if self.settings.receiver == "splice" else None
        conn = d.BlockSink()
        inflight: list[int] = []
        try:
            while True:
                while len(inflight) < PIPELINE and not self.cancelled:
                    index = queue.take(wait=not inflight)
                    if index is None:
                        break
                    offset, length = self.block_range(index)
                    send(sock, conn.request(offset, length, digest=self.verify))
                    inflight.append(index)
                if not inflight:
                    break
                index = inflight[0]  # stays in flight (put back on error) until it is done
                offset, length = self.block_range(index)
                header = receive_event(sock, conn)
                assert isinstance(header, d.BlockHeader)
                got_off, got_len, status = header.offset, header.length, header.status
                if status == d.STATUS_STALE:
                    raise self.source_changed()
                if status or got_off != offset or got_len != length:
                    raise TransferError(errno.EIO, f"source refused block at {offset} (status {status})")
                ours: int | None = None
                if self.throttle is not None:
                    ours = self.receive_paced(sock, offset, length, pipe, view, hasher, self.throttle)
                elif isinstance(sock, ssl.SSLSocket) or (pipe is None and self.verify):
                    # Piece by piece through the buffer, hashing each piece while it is there.
                    hasher.reset()
                    for pos in range(0, length, CHUNK):
                        piece = view[: min(CHUNK, length - pos)]
                        if isinstance(sock, ssl.SSLSocket):
                            recv_into(sock, piece)
                            pwrite_all(self.part_fd, piece, offset + pos)
                        else:
                            native.recv_write(sock.fileno(), self.part_fd, offset + pos, len(piece), buf)
                        if self.verify:
                            hasher.update(piece)
                    ours = hasher.intdigest() if self.verify else None
                elif pipe is not None:
                    native.splice_recv(sock.fileno(), self.part_fd, offset, length, pipe)
                else:
                    native.recv_write(sock.fileno(), self.part_fd, offset, length, buf)
                conn.payload_received()
                trailer = receive_event(sock, conn)
                assert isinstance(trailer, d.Trailer)
                theirs, after = trailer.digest, trailer.status
                if after == d.STATUS_STALE:
                    raise self.source_changed()
                if self.verify:
                    if ours is None:
                        # Spliced: read the block back from the page cache to hash it.
                        ours = hash_range(self.part_fd, offset, length, view, hasher)
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
            # FLAG_END: every block is here, the source may forget the capability.
            send(sock, conn.finish(end=not self.stale and not self.missing()))
        finally:
            if pipe is not None:
                pipe.close()
            for index in inflight:
                queue.put_back(index)

    def receive_paced(
        self,
        sock: socket.socket,
        offset: int,
        length: int,
        pipe: native.Pipe | None,
        view: memoryview,
        hasher: xxhash.xxh3_64,
        throttle: Throttle,
    ) -> int | None:
        """Receive one block under this server's limit, piece by piece, each paid for first.

        Not reading makes TCP hold the sender back.  Returns the block's digest when it passed
        through ``view`` (None when spliced or unverified: the caller reads it back if needed).
        """
        through_buffer = isinstance(sock, ssl.SSLSocket) or pipe is None
        hasher.reset()
        for pos in range(0, length, throttle.piece):
            piece = view[: min(throttle.piece, CHUNK, length - pos)]
            throttle.take(len(piece))
            if isinstance(sock, ssl.SSLSocket):
                recv_into(sock, piece)
                pwrite_all(self.part_fd, piece, offset + pos)
            elif pipe is not None:
                native.splice_recv(sock.fileno(), self.part_fd, offset + pos, len(piece), pipe)
            else:
                native.recv_write(sock.fileno(), self.part_fd, offset + pos, len(piece), piece)
            if self.verify and through_buffer:
                hasher.update(piece)
        return hasher.intdigest() if self.verify and through_buffer else None

    # --- the life of the transfer (trio) -----------------------------------------------------------
    async def run(
        self,
        slots: trio.Semaphore,
        threads: trio.CapacityLimiter,
        connect_source: Callable[[int], socket.socket],
    ) -> None:
        """Receive every block and commit; on failure keep what a re-run can resume from."""
        rec = self.rec
        timing = [0.0, 0.0]  # seconds receiving, seconds committing (fsync, xattrs, rename)
        try:
            with trio.CancelScope() as scope:
                self.cancel_scope = scope
                async with slots:
                    self.set_state(TransferState.RUNNING)
                    t0 = trio.current_time()
                    await self._receive(threads, connect_source)
                    self.set_state(TransferState.VERIFYING)
                    t1 = trio.current_time()
                    await trio.to_thread.run_sync(self.commit)
                    timing = [t1 - t0, trio.current_time() - t1]
                    rec.state = TransferState.DONE
            if scope.cancelled_caught and rec.state != TransferState.DONE:
                rec.state = TransferState.FAILED
        except OSError as exc:
            rec.fail(exc.errno or errno.EIO, exc.strerror or str(exc), failure_code(exc))
        except Exception as exc:
            log.exception("transfer %s crashed", rec.id)
            rec.fail(errno.EIO, f"internal error: {exc!r}", FailureCode.IO)
        finally:
            if rec.state == TransferState.FAILED and (
                rec.errno == errno.ESTALE or all(dg is None for dg in self.digests)
            ):
                # Nothing worth resuming (no block arrived, or the source changed): leave no trace.
                # A full disk keeps part file and journal: the journal knows the good blocks,
                # and the same copy, once there is space, fetches only the others.
                self.close_files()
                self.remove_part()
            if rec.state == TransferState.FAILED:
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
            self.close_dir()
            if self.on_finish is not None:
                self.on_finish()

    async def _receive(
        self, threads: trio.CapacityLimiter, connect_source: Callable[[int], socket.socket]
    ) -> None:
        todo = self.missing()
        if not todo:
            return
        queue = self.queue = BlockQueue(todo)
        nstreams = min(self.rec.streams, len(todo))
        errors: list[OSError] = []

        async def one_stream(i: int) -> None:
            try:
                if self.settings.direction == Direction.PUSH:
                    assert self.push_receive is not None
                    with trio.fail_after(CONNECT_TIMEOUT * 2):
                        sock = await self.push_receive.receive()
                    try:
                        await trio.to_thread.run_sync(self.expect_ready, sock, limiter=threads)
                    except BaseException:
                        sock.close()
                        raise
                else:
                    sock = await trio.to_thread.run_sync(connect_source, i, limiter=threads)
                self.sockets.append(sock)
                try:
                    await trio.to_thread.run_sync(self.fetch_stream, sock, queue, limiter=threads)
                finally:
                    sock.close()
            except trio.TooSlowError:
                errors.append(TransferError(errno.ETIMEDOUT, "the source did not connect to push its data"))
            except OSError as exc:
                errors.append(exc)
                if exc.errno in NO_SPACE:
                    queue.close()  # no other stream will find room either
                if not self.cancelled and self.missing():
                    log.warning("transfer %s stream %d: %s", self.rec.id, i, exc)
                elif not self.cancelled:
                    # The other streams already fetched every block (the source then refuses
                    # the capability to late streams): nothing was lost.
                    log.info("transfer %s stream %d, after the last block: %s", self.rec.id, i, exc)

        progress_task_done = trio.Event()

        async def progress() -> None:
            while not progress_task_done.is_set():
                with trio.move_on_after(0.25):
                    await progress_task_done.wait()
                if not progress_task_done.is_set():
                    # A progress tick.  Not when the data is all in: the commit's state change
                    # follows at once, and a wake now would cost a small file's copy one more
                    # TransferWait round trip.
                    self.notify()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            async with trio.open_nursery() as streams:
                for i in range(nstreams):
                    streams.start_soon(one_stream, i)
            progress_task_done.set()
        missing = self.missing()
        if self.stale:
            raise TransferError(errno.ESTALE, f"source {self.cap.path} changed during the transfer")
        if missing:
            if self.cancelled:
                raise TransferError(self.rec.errno or errno.EINTR, self.rec.reason or "cancelled")
            # A full disk explains the other streams' failures (they were stopped).
            full = [e for e in errors if e.errno in NO_SPACE]
            first = (full or errors or [TransferError(errno.EIO, "streams ended early")])[0]
            raise TransferError(
                first.errno or errno.EIO,
                f"{len(missing)} blocks missing: {first.strerror or first}",
                failure_code(first),
            )
