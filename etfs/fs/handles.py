"""Open files of the mount: server handles, readahead and write-behind.

The kernel sends reads of at most 128 KiB (more with a larger bdi read_ahead_kb) and, without
writeback caching, writes of whatever size the application used.  Each such request as one
round trip would cap throughput at a fraction of the link, so an `OpenFile`:

* reads ahead: while access is sequential it keeps up to `READAHEAD_BLOCKS` blocks of
  `READ_BLOCK` bytes in flight or cached and serves kernel reads from them; a random read is
  passed through as is.  A block asked for before the file's last change by this client
  (through any handle: `Node.changed`) is fetched again.
* writes behind: contiguous writes are coalesced into `WRITE_BLOCK`-sized `Write` requests sent
  in background tasks, at most `WRITES_IN_FLIGHT` at a time (the handler waits while more are
  in flight: that is the back-pressure).  A write counts as in flight from the moment it
  leaves the buffer, so reads, stat and sync never miss it; overlapping writes reach the
  server in order.  The first error is kept and raised by the next write, `flush`, `fsync`
  or `release`, like a local filesystem's deferred write errors.

Server-side handles die with their connection; a handle whose connection generation changed
is reopened by path (without O_TRUNC/O_CREAT/O_EXCL) before use, and a request whose
connection broke while in flight is retried once on the new connection.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import trio

from etfs.client import ConnectionLost, ServerClient
from etfs.protocol import messages as m

from .inodes import Node, stamp
from .traffic import MOUNT_IO

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_BLOCK = 1024 * 1024
READAHEAD_BLOCKS = 8
WRITE_BLOCK = 1024 * 1024
WRITES_IN_FLIGHT = 8
# Flags the server keeps for a reopen: never truncate or create again.
_REOPEN_MASK = ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL)


@dataclass
class _Block:
    index: int
    # `stamp` when it was asked for: a block older than the node's last change is stale
    # (another handle wrote, a truncate, a copy).
    asked: int = field(default_factory=stamp)
    ready: trio.Event = field(default_factory=trio.Event)
    data: bytes = b""
    error: OSError | None = None


class OpenFile:
    """One open file handle of the mount (what ``fh`` numbers stand for).

    The copy hook (`etfs.fs.copy`) relies on: ``server``, ``path``, ``inode``, ``flags`` and
    ``await flush()``.
    """

    def __init__(
        self,
        fh: int,
        node: Node,
        flags: int,
        client: ServerClient,
        opened: m.Opened,
        generation: int,
        nursery: trio.Nursery,
    ) -> None:
        self.fh = fh
        self.node = node
        self.flags = flags
        self._client = client
        self._handle = opened.handle
        self._generation = generation
        self._nursery = nursery
        self._reopen_lock = trio.Lock()
        self._replaced = False  # a copy renamed a new file onto the path: reopen before use
        self._closed = False
        # write-behind
        self._buf = bytearray()
        self._buf_off = 0
        # id -> (offset, end, done) of writes that left the buffer and are not yet answered
        self._inflight: dict[int, tuple[int, int, trio.Event]] = {}
        self._inflight_ids = 0
        self._idle = trio.Event()
        self._idle.set()
        self._progress = trio.Event()  # set (and replaced) whenever a write finishes
        self._slots = trio.Semaphore(WRITES_IN_FLIGHT)
        self._error: OSError | None = None
        # readahead
        self._blocks: dict[int, _Block] = {}
        self._last_end = 0
        # The size at open bounds the first readahead (a 4 KiB file needs one read, not nine);
        # reads past it look again, in case the file grew.
        self._eof_block: int | None = opened.attr.size // READ_BLOCK

    # --- identity (read by the copy hook) -----------------------------------------------------
    @property
    def server(self) -> str:
        return self.node.server

    @property
    def path(self) -> str:
        return self.node.path

    @property
    def inode(self) -> int:
        return self.node.inode

    @property
    def client(self) -> ServerClient:
        """The client (so the etfs identity) this file was opened with; it keeps it."""
        return self._client

    @property
    def dirty(self) -> bool:
        return bool(self._buf) or bool(self._inflight)

    # --- server calls with reopen ---------------------------------------------------------------
    async def _current_handle(self) -> int:
        live = await self._client.connection()
        if live.generation == self._generation and not self._replaced:
            return self._handle
        async with self._reopen_lock:
            live = await self._client.connection()
            if self._replaced:
                await self._follow_replacement(live.generation)
            elif live.generation != self._generation:
                if not self.node.linked:
                    raise OSError(errno.ESTALE, f"{self.path} was deleted: no reopen after a reconnect")
                await self._open_again(live.generation)
                log.info("%s:%s: reopened after reconnect", self.server, self.path)
        return self._handle

    async def _open_again(self, generation: int) -> None:
        try:
            opened = await self._client.call(
                m.Open(path=self.path, flags=self.flags & _REOPEN_MASK & ~os.O_APPEND)
            )
        except OSError as exc:
            log.warning("%s:%s: reopen failed: %s", self.server, self.path, exc)
            raise OSError(errno.EIO, f"cannot reopen {self.path}: {exc}") from None
        self._handle = opened.handle
        self._generation = generation

    def replaced(self) -> None:
        """The server's file at this path was replaced by a new one (a copy renamed its part
        file onto it): the next request through this handle reopens it by path first, so it
        reads and writes the file its path names.  Lazily: ``cp`` closes the handle right after
        the copy, and a reopen it never uses would cost it two round trips per file."""
        self._replaced = True
        self.drop_readahead()

    async def settle(self) -> None:
        """Reopen now if a copy replaced the file: before its path stops naming it (unlink,
        rename over it), while the reopen can still find it."""
        if self._replaced:
            await self._current_handle()

    async def _follow_replacement(self, generation: int) -> None:
        old, old_generation = self._handle, self._generation
        if not self.node.linked:
            raise OSError(errno.ESTALE, f"{self.path} was replaced and then deleted")
        await self._open_again(generation)
        self._replaced = False
        if old_generation == generation:
            try:
                await self._client.call(m.Close(handle=old))
            except OSError as exc:
                log.debug("%s:%s: close of the replaced handle: %s", self.server, self.path, exc)

    async def call(self, request_on: Callable[[int], m.Request[T]]) -> T:
        """A request on this file's server handle (``request_on`` makes it for the current
        handle: ``f.call(lambda h: m.FStat(handle=h))``), retried once on reset."""
        for attempt in (1, 2):
            handle = await self._current_handle()
            req = request_on(handle)
            try:
                answer = await self._client.call(req)
            except ConnectionLost as exc:
                if exc.errno != errno.ECONNRESET or attempt == 2:
                    raise
                log.info(
                    "%s:%s: connection reset during %s; retrying", self.server, self.path, type(req).__name__
                )
                continue
            # Plain reads and writes through the mount pass through the client: count them.
            if isinstance(req, m.Read) and isinstance(answer, bytes):
                MOUNT_IO.add_read(self.server, len(answer))
            elif isinstance(req, m.Write):
                MOUNT_IO.add_written(self.server, len(req.data))
            return answer
        raise AssertionError("unreachable")

    # --- reading ----------------------------------------------------------------------------------
    def drop_readahead(self) -> None:
        self._blocks.clear()
        self._eof_block = None

    def _sequential(self, off: int) -> bool:
        if (off // READ_BLOCK) in self._blocks:
            return True
        return abs(off - self._last_end) <= READ_BLOCK

    def _fetch(self, index: int) -> _Block:
        blk = self._blocks.get(index)
        if blk is None or blk.asked < self.node.changed:
            blk = self._blocks[index] = _Block(index)
            self._nursery.start_soon(self._fetch_task, blk)
        return blk

    async def _fetch_task(self, blk: _Block) -> None:
        try:
            blk.data = await self.call(
                lambda h: m.Read(handle=h, offset=blk.index * READ_BLOCK, size=READ_BLOCK)
            )
        except OSError as exc:
            blk.error = exc
        finally:
            blk.ready.set()

    async def read(self, off: int, size: int) -> bytes | bytearray | memoryview:
        if self._buf or self._inflight:
            await self.sync()  # read what we wrote
        if not self._sequential(off):
            self.drop_readahead()
            self._last_end = off + size
            return await self.call(lambda h: m.Read(handle=h, offset=off, size=size))
        out = bytearray()
        pos, end = off, off + size
        while pos < end:
            index = pos // READ_BLOCK
            if self._eof_block is not None and index > self._eof_block:
                self._eof_block = None  # the file may have grown: look again
            last = index + READAHEAD_BLOCKS
            if self._eof_block is not None:
                last = min(last, self._eof_block)
            for i in range(index, last + 1):
                self._fetch(i)
            blk = self._blocks[index]
            await blk.ready.wait()
            if blk.error is not None:
                self.drop_readahead()
                raise blk.error
            start = pos - index * READ_BLOCK
            chunk = memoryview(blk.data)[start : end - index * READ_BLOCK]
            if pos == off and (len(chunk) == size or len(blk.data) < READ_BLOCK):
                # Within one block (the usual case): hand pyfuse3 a view, no copy.
                if len(blk.data) < READ_BLOCK:
                    self._eof_block = index
                    self._blocks.pop(index, None)
                self._forget_before((off + len(chunk)) // READ_BLOCK)
                self._last_end = off + len(chunk)
                return chunk
            out += chunk
            if len(blk.data) < READ_BLOCK:
                # End of file (for now): later reads refetch this block in case the file grows.
                self._eof_block = index
                self._blocks.pop(index, None)
                break
            pos += len(chunk)
        self._forget_before(pos // READ_BLOCK)
        self._last_end = off + len(out)
        return out

    def _forget_before(self, index: int) -> None:
        for i in [i for i in self._blocks if i < index]:
            del self._blocks[i]

    # --- writing ----------------------------------------------------------------------------------
    def _take_error(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    async def write(self, off: int, data: bytes) -> int:
        self._take_error()
        self.drop_readahead()
        self.node.touch()
        if not self._buf and len(data) >= WRITE_BLOCK:
            # A whole block at once (dd bs=1M, cp): send it as it came, without copying it.
            await self._send(off, data)
            return len(data)
        if self._buf and off == self._buf_off + len(self._buf) and len(self._buf) < WRITE_BLOCK:
            self._buf += data
        else:
            if self._buf:
                await self._send_buffer()
            self._buf = bytearray(data)
            self._buf_off = off
        if len(self._buf) >= WRITE_BLOCK:
            await self._send_buffer()
        return len(data)

    @property
    def dirty_end(self) -> int:
        """End of the furthest write not yet known to be on the server (0: none)."""
        end = self._buf_off + len(self._buf) if self._buf else 0
        return max([end, *(e for _, e, _ in self._inflight.values())])

    async def _send_buffer(self) -> None:
        # The bytearray itself goes out (msgpack encodes it as bin): no copy to bytes.
        data, off = self._buf, self._buf_off
        self._buf = bytearray()
        if not data:
            return
        await self._send(off, data)

    async def _send(self, off: int, data: bytes | bytearray) -> None:
        # The write is registered before the first checkpoint: from the moment it left the
        # buffer, readers, stat and sync must see it as in flight (a read that slipped
        # through here used to fetch the old file and shrink the kernel's size).
        end = off + len(data)
        earlier = [done for s, e, done in self._inflight.values() if s < end and off < e]
        self._inflight_ids += 1
        wid = self._inflight_ids
        done = trio.Event()
        self._inflight[wid] = (off, end, done)
        if self._idle.is_set():
            self._idle = trio.Event()
        self._nursery.start_soon(self._write_task, wid, off, data, earlier)
        # Back-pressure: the writer waits while too much is in flight.
        while len(self._inflight) > WRITES_IN_FLIGHT:
            await self._progress.wait()

    async def _write_task(
        self, wid: int, off: int, data: bytes | bytearray, earlier: list[trio.Event]
    ) -> None:
        try:
            # Overlapping writes must reach the server in order.
            for ev in earlier:
                await ev.wait()
            async with self._slots:
                # msgspec sends a bytearray as the same msgpack bin as bytes: no copy to make one.
                payload = cast(bytes, data)
                await self.call(lambda h: m.Write(handle=h, offset=off, data=payload))
        except OSError as exc:
            log.warning(
                "%s:%s: write of %d bytes at %d failed: %s", self.server, self.path, len(data), off, exc
            )
            if self._error is None:
                self._error = exc
        finally:
            _, _, done = self._inflight.pop(wid)
            done.set()
            # The server's file changed: attributes asked for before now are stale.
            self.node.touch()
            self._progress.set()
            self._progress = trio.Event()
            if not self._inflight:
                self._idle.set()

    async def _drain(self) -> None:
        while self._inflight:
            await self._idle.wait()

    async def sync(self) -> None:
        """Send buffered writes and wait for all in flight; a write error stays for this handle's
        own flush/fsync/close to report (a reader of the same file must not swallow it)."""
        if self._buf:
            await self._send_buffer()
        await self._drain()

    async def flush(self) -> None:
        """`sync`, then raise the first write error since the last flush."""
        await self.sync()
        self._take_error()

    async def fsync(self, datasync: bool) -> None:
        await self.flush()
        await self.call(lambda h: m.Fsync(handle=h, datasync=datasync))

    async def close(self) -> None:
        """Flush and close the server handle; the flush error (if any) is raised after closing."""
        if self._closed:
            return
        self._closed = True
        error: OSError | None = None
        try:
            await self.flush()
        except OSError as exc:
            error = exc
        self.drop_readahead()
        # Only close a handle of the live connection: an old generation's handle died with it.
        if self._client.is_live(self._generation):
            try:
                await self._client.call(m.Close(handle=self._handle))
            except OSError as exc:
                log.debug("%s:%s: close failed: %s", self.server, self.path, exc)
        if error is not None:
            raise error
