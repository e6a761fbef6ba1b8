"""Turn the kernel's copy_file_range requests into transfers of the engine.

`cp /mnt/jive/x /mnt/onsala/` reaches the daemon as one or a few copy requests
(`etfs.copyrange`), each naming the two open files by their handles.  A request at
offset 0 of both files that covers the whole source starts one transfer per
(source handle, destination handle); requests that continue it (the kernel caps
one call at just under 4 GiB) wait for the same transfer and are answered with the
bytes they cover, so verification finishes before the last answer.  Anything else
(a range in the middle of a file, an unknown handle) is answered EOPNOTSUPP and the
kernel copies through the daemon with ordinary reads and writes.
The transfer acts as the etfs identity both files were opened with (a local user's own
after `etfs login`, see `etfs.identities`), with that identity's engine; files opened with
different identities are left to the kernel's read/write path too.

A failed transfer answers the errno that says why (`etfs.transfer.errors.reply_errno`:
ENOSPC for a full destination, ESTALE for a changed source, ETIMEDOUT, EACCES..., EIO
for the rest), so `cp` prints the reason; the destination name holds at most the empty
file `cp` created, never a complete-looking partial one.  Ctrl-C on `cp`
arrives as an interrupt and cancels the transfer on both servers.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from etfs.common import excgroups
from etfs.copyrange import MAX_REPLY_COUNT, CopyRequest
from etfs.protocol import messages as m
from etfs.transfer.engine import TransferEngine, TransferFailed
from etfs.transfer.errors import reply_errno

if TYPE_CHECKING:
    from .handles import OpenFile

log = logging.getLogger(__name__)
T = TypeVar("T")
U = TypeVar("U")

# A request this long from offset 0 is the kernel handing over a whole file in pieces.
WHOLE_FILE_MIN = 1 << 30


@dataclass
class Job:
    """One whole-file transfer serving all copy requests of a (source, destination) handle pair."""

    size: int
    done: trio.Event = field(default_factory=trio.Event)
    error: OSError | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class CopyTarget(Protocol):
    """What the dispatcher needs of the filesystem (`EtfsOperations` is one)."""

    def file_handle(self, fh: int) -> OpenFile: ...

    async def sync_inode(self, inode: int) -> None: ...

    def replaced(self, inode: int) -> None: ...


class CopyDispatcher:
    def __init__(self, ops: CopyTarget, engine: TransferEngine, nursery: trio.Nursery) -> None:
        self.ops = ops
        self.engine = engine
        self.nursery = nursery
        self.jobs: dict[tuple[int, int], Job] = {}

    def on_request(self, req: CopyRequest) -> None:
        """Called synchronously in pyfuse3's loop: never block, answer from a task."""
        self.nursery.start_soon(self._serve, req)

    async def _serve(self, req: CopyRequest) -> None:
        try:
            await self._serve_inner(req)
        except Exception:
            log.exception("copy request %d failed unexpectedly", req.id)
            if not req.replied:
                req.reply_error(errno.EIO)

    async def _serve_inner(self, req: CopyRequest) -> None:
        try:
            src = self.ops.file_handle(req.fh_in)
            dst = self.ops.file_handle(req.fh_out)
        except (KeyError, OSError):
            req.reply_error(errno.EOPNOTSUPP)
            return
        key = (req.fh_in, req.fh_out)
        job = self.jobs.get(key)
        if job is None:
            if req.off_in != 0 or req.off_out != 0:
                req.reply_error(errno.EOPNOTSUPP)  # a range copy: the kernel's read/write fallback
                return
            # The transfer acts as the identity both files were opened with (`etfs login`);
            # files opened with different ones are copied by the kernel through the handles.
            engine = self._engine_of(src, dst)
            if engine is None:
                req.reply_error(errno.EOPNOTSUPP)
                return
            if (
                src.inode == dst.inode
                or (src.server, src.path) == (dst.server, dst.path)
                or not (src.node.linked and dst.node.linked)
            ):
                # Within one file, or a file only a handle still names: the kernel copies the
                # range (a transfer goes by path).
                req.reply_error(errno.EOPNOTSUPP)
                return
            try:
                # The transfer reads the server's files: this client's writes go first.
                await self.ops.sync_inode(src.inode)
                await self.ops.sync_inode(dst.inode)
                attr, dst_attr = await _both(
                    src.client.call(m.Stat(path=src.path)), dst.client.call(m.Stat(path=dst.path))
                )
            except OSError as exc:
                req.reply_error(reply_errno(exc))
                return
            if req.length < attr.size and req.length < WHOLE_FILE_MIN:
                req.reply_error(errno.EOPNOTSUPP)
                return
            if dst_attr.size > attr.size or dst_attr.nlink > 1:
                # A transfer replaces the destination file by a new one: copy_file_range
                # keeps a longer destination's tail and writes into every hard link of it.
                req.reply_error(errno.EOPNOTSUPP)
                return
            job = Job(size=attr.size)
            self.jobs[key] = job
            self.nursery.start_soon(self._run_job, job, engine, src, dst)
        elif req.off_in != req.off_out:
            req.reply_error(errno.EOPNOTSUPP)
            return
        with trio.CancelScope() as wait_scope:
            # Ctrl-C on cp: stop waiting and stop the transfer on both servers.
            def interrupted() -> None:
                job.scope.cancel()
                wait_scope.cancel()

            req.on_interrupt(interrupted)
            await job.done.wait()
        if wait_scope.cancelled_caught:
            log.info("copy %s -> %s interrupted", src.path, dst.path)
            self.jobs.pop(key, None)
            if not req.replied:
                req.reply_error(errno.EINTR)
            return
        if job.error is not None:
            self.jobs.pop(key, None)
            req.reply_error(reply_errno(job.error))
            return
        count = max(0, min(job.size - req.off_in, req.length, MAX_REPLY_COUNT))
        if req.off_in + count >= job.size:
            self.jobs.pop(key, None)
        req.reply_count(count)

    def _engine_of(self, src: Any, dst: Any) -> TransferEngine | None:
        identities = getattr(self.ops, "identities", None)
        if identities is None:
            return self.engine
        engine: TransferEngine | None = identities.engine_of(src.client, dst.client)
        return engine

    async def _run_job(self, job: Job, engine: TransferEngine, src: Any, dst: Any) -> None:
        try:
            with job.scope:
                await dst.flush()
                await engine.copy(src.server, src.path, dst.server, dst.path, mode="resume")
                # The destination's part file was renamed onto its path: its open handles
                # (cp's own) still name the old file until reopened.
                self.ops.replaced(dst.inode)
            if job.scope.cancelled_caught:
                job.error = OSError(errno.EINTR, "interrupted")
        except TransferFailed as exc:
            log.error(
                "copy %s:%s -> %s:%s failed: %s", src.server, src.path, dst.server, dst.path, exc.strerror
            )
            job.error = exc
        except OSError as exc:
            log.error("copy %s:%s -> %s:%s failed: %s", src.server, src.path, dst.server, dst.path, exc)
            job.error = exc
        except Exception as exc:
            # A bug must cost this copy (EIO), never the whole mount daemon.
            log.exception("copy %s:%s -> %s:%s crashed", src.server, src.path, dst.server, dst.path)
            job.error = OSError(errno.EIO, repr(exc))
        finally:
            job.done.set()


async def _both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """Two requests at once (usually to two servers): one round trip of waiting, not two.
    The first error is raised as itself (not in an exception group)."""
    results: list[Any] = [None, None]

    async def run(i: int, aw: Awaitable[Any]) -> None:
        results[i] = await aw

    with excgroups.single_errors():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, 0, first)
            nursery.start_soon(run, 1, second)
    return results[0], results[1]
