"""Test daemon: a minimal pyfuse3 passthrough FS plus etfs.copyrange, for tests/test_copyrange.py.

    python tests/copyrange_passthrough.py SOURCE_DIR MOUNTPOINT --log EVENTS.jsonl [--mode MODE]

Every copy_file_range request, interrupt and reply is appended to EVENTS.jsonl as one JSON object
per line (plus a "ready" line once mounted). --mode (default: $ETFS_CFR_TEST_MODE or "copy"):

  copy        copy on the underlying files with os.copy_file_range in a worker thread, reply count
  stall       never finish unless interrupted; then reply EINTR
  late        like stall, but register the interrupt callback only after 1.5 s (interrupt first)
  eio         reply EIO
  eopnotsupp  reply EOPNOTSUPP (the kernel falls back to read/write through this daemon)
  enosys      reply_error(ENOSYS): the module must send EOPNOTSUPP instead
  nohandler   no handler set: the module answers EOPNOTSUPP itself
  double      copy, reply, then try a second reply (must be refused)
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import stat
import sys
import time
from typing import Any

# Make `etfs` importable when run from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etfs import copyrange

copyrange.install()  # before pyfuse3: the interposer must be first in the symbol scope

import pyfuse3  # noqa: E402
import trio  # noqa: E402

log = logging.getLogger("copyrange_passthrough")

MODES = ("copy", "stall", "late", "eio", "eopnotsupp", "enosys", "nohandler", "double")


def _fuse_error(exc: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(exc.errno or errno.EIO)


class EventLog:
    def __init__(self, path: str) -> None:
        self._f = open(path, "a", buffering=1)

    def __call__(self, event: str, **fields: Any) -> None:
        fields.update(event=event, t=time.monotonic())
        self._f.write(json.dumps(fields) + "\n")
        self._f.flush()


class Passthrough(pyfuse3.Operations):
    """Just enough of a passthrough for cp: lookup/getattr/setattr/readdir/open/create/read/write."""

    def __init__(self, source: str, events: EventLog) -> None:
        super().__init__()
        self._events = events
        self._paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self._inodes: dict[str, int] = {source: pyfuse3.ROOT_INODE}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self.reads = 0
        self.writes = 0

    # -- helpers ----------------------------------------------------------------------------

    def _inode_for(self, path: str) -> int:
        ino = self._inodes.get(path)
        if ino is None:
            ino = self._next_inode
            self._next_inode += 1
            self._inodes[path] = ino
            self._paths[ino] = path
        return ino

    def _path(self, inode: int) -> str:
        try:
            return self._paths[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, path: str, inode: int) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_blksize = 4096
        # cp treats st_blocks*512 < st_size as sparse and then never uses copy_file_range.
        a.st_blocks = (
            max(st.st_blocks, (st.st_size + 511) // 512) if stat.S_ISREG(st.st_mode) else st.st_blocks
        )
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        return a

    # -- operations -------------------------------------------------------------------------

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        if not os.path.lexists(path):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(path, self._inode_for(path))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._path(inode), inode)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(
                    path,
                    attr.st_uid if fields.update_uid else -1,
                    attr.st_gid if fields.update_gid else -1,
                )
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(
                    path,
                    ns=(
                        attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                        attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
                    ),
                )
        except OSError as exc:
            raise _fuse_error(exc) from None
        return self._attrs(path, inode)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        base = self._path(fh)
        names = sorted(os.listdir(base))
        for i, name in enumerate(names[start_id:], start_id):
            path = os.path.join(base, name)
            if not pyfuse3.readdir_reply(
                token, os.fsencode(name), self._attrs(path, self._inode_for(path)), i + 1
            ):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            fd = os.open(self._path(inode), flags & ~os.O_CREAT)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return pyfuse3.FileInfo(fh=fd)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            fd = os.open(path, flags | os.O_CREAT, stat.S_IMODE(mode))
        except OSError as exc:
            raise _fuse_error(exc) from None
        return pyfuse3.FileInfo(fh=fd), self._attrs(path, self._inode_for(path))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.reads += 1
        return os.pread(fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.writes += 1
        return os.pwrite(fh, buf, off)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        os.fsync(fh)

    async def release(self, fh: int) -> None:
        self._events("release", fh=fh, reads=self.reads, writes=self.writes)
        os.close(fh)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            os.unlink(os.path.join(self._path(parent_inode), os.fsdecode(name)))
        except OSError as exc:
            raise _fuse_error(exc) from None

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self._paths[pyfuse3.ROOT_INODE])
        s = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
        ):
            setattr(s, name, getattr(st, name))
        s.f_namemax = st.f_namemax
        return s


def copy_fds(fd_in: int, off_in: int, fd_out: int, off_out: int, length: int) -> int:
    """Whole-range copy on the underlying files (stops early at EOF)."""
    done = 0
    while done < length:
        n = os.copy_file_range(fd_in, fd_out, length - done, off_in + done, off_out + done)
        if n == 0:
            break
        done += n
    return done


class CopyService:
    def __init__(self, mode: str, events: EventLog) -> None:
        self.mode = mode
        self.events = events
        self.nursery: trio.Nursery | None = None

    def handle(self, req: copyrange.CopyRequest) -> None:
        # Called synchronously inside pyfuse3's loop: only record and start a task.
        self.events(
            "request",
            id=req.id,
            ino_in=req.ino_in,
            fh_in=req.fh_in,
            off_in=req.off_in,
            ino_out=req.ino_out,
            fh_out=req.fh_out,
            off_out=req.off_out,
            length=req.length,
            flags=req.flags,
        )
        assert self.nursery is not None
        self.nursery.start_soon(self.serve, req)

    def _reply_error(self, req: copyrange.CopyRequest, err: int) -> None:
        self.events("reply", id=req.id, error=errno.errorcode.get(err, str(err)))
        req.reply_error(err)

    async def serve(self, req: copyrange.CopyRequest) -> None:
        mode = self.mode
        if mode in ("eio", "eopnotsupp", "enosys"):
            self._reply_error(
                req, {"eio": errno.EIO, "eopnotsupp": errno.EOPNOTSUPP, "enosys": errno.ENOSYS}[mode]
            )
            return

        def interrupted() -> None:
            self.events("interrupt", id=req.id, late=mode == "late")
            scope.cancel()

        with trio.CancelScope() as scope:
            if mode == "late":
                # Not cancellable yet: the interrupt must arrive before we register for it.
                with trio.CancelScope(shield=True):
                    await trio.sleep(1.5)
            req.on_interrupt(interrupted)
            if mode in ("stall", "late"):
                await trio.sleep_forever()
            t0 = time.monotonic()
            n = await trio.to_thread.run_sync(
                copy_fds, req.fh_in, req.off_in, req.fh_out, req.off_out, req.length
            )
            self.events("reply", id=req.id, count=n, seconds=time.monotonic() - t0)
            req.reply_count(n)
            if mode == "double":
                try:
                    req.reply_error(errno.EIO)
                except copyrange.CopyRangeError:
                    self.events("double_reply_refused", id=req.id)
                else:
                    self.events("double_reply_accepted", id=req.id)
        if scope.cancelled_caught:
            self._reply_error(req, errno.EINTR)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--log", required=True, help="JSON-lines event file")
    p.add_argument("--mode", choices=MODES, default=os.environ.get("ETFS_CFR_TEST_MODE", "copy"))
    p.add_argument("--debug", action="store_true")
    p.add_argument("--fuse-debug", action="store_true", help="libfuse request trace on stderr")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr)

    events = EventLog(args.log)
    ops = Passthrough(os.path.abspath(args.source), events)
    service = CopyService(args.mode, events)
    if args.mode != "nohandler":
        copyrange.set_handler(service.handle)

    options = set(pyfuse3.default_options)
    options.add("fsname=cfrtest")
    if args.fuse_debug:
        options.add("debug")
    pyfuse3.init(ops, args.mountpoint, options)
    events(
        "ready",
        installed=copyrange.installed(),
        status=copyrange.status().name,
        mode=args.mode,
        pid=os.getpid(),
    )
    if not copyrange.installed():
        log.error("copy_file_range op not installed: %s", copyrange.status().value)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            service.nursery = nursery
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=False)
        events("exit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
