"""File operations of one authenticated session: ACL check, confined path, syscall.

Each handler is a plain blocking function run in a worker thread by `server`.  They
raise `OSError` (including `AccessDenied` and `EscapeError`, both EACCES); the
connection turns that into an `Err` reply carrying the errno and a message.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat as st
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

from etfs import _sendfile_cffi as native
from etfs.protocol import messages as m

from .acl import ACL, Right
from .exports import ExportRoot, normalize

log = logging.getLogger(__name__)

MAX_IO = 16 * 1024 * 1024
LIST_MAX = 5000
XATTR_PREFIX = "user."


def to_attr(s: os.stat_result) -> m.Attr:
    return m.Attr(
        ino=s.st_ino,
        mode=s.st_mode,
        nlink=s.st_nlink,
        uid=s.st_uid,
        gid=s.st_gid,
        size=s.st_size,
        blocks=s.st_blocks,
        atime_ns=s.st_atime_ns,
        mtime_ns=s.st_mtime_ns,
        ctime_ns=s.st_ctime_ns,
    )


@dataclass
class Handle:
    fd: int
    path: str
    readable: bool
    writable: bool


@dataclass
class Session:
    """One client connection's identity, export and open files."""

    user: str
    groups: frozenset[str]
    root: ExportRoot
    acl: ACL
    handles: dict[int, Handle] = field(default_factory=dict)
    # Handlers run in several threads at once; next() on a count is atomic under the GIL.
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Called when the connection ends (transfers started by it are stopped).
    on_close: list[Callable[[], None]] = field(default_factory=list)

    # --- helpers ---------------------------------------------------------------------------------
    def check(self, path: str, right: Right) -> str:
        path = normalize(path)
        self.acl.check(self.user, self.groups, path, right)
        real = self.root.resolve_parent(path)
        if real != path:  # reached through a symlinked directory: the target needs the right too
            self.acl.check(self.user, self.groups, real, right)
        return path

    def _handle(self, hid: int) -> Handle:
        try:
            return self.handles[hid]
        except KeyError:
            raise OSError(errno.EBADF, f"no open file handle {hid}") from None

    def _new_handle(self, fd: int, path: str, flags: int) -> int:
        acc = flags & os.O_ACCMODE
        hid = next(self._ids)
        self.handles[hid] = Handle(fd, path, acc != os.O_WRONLY, acc != os.O_RDONLY)
        return hid

    def close_all(self) -> None:
        for h in self.handles.values():
            try:
                os.close(h.fd)
            except OSError:
                pass
        self.handles.clear()

    def dispatch(self, req: m.Request) -> Any:
        handler: Callable[[Any], Any] | None = getattr(self, "op_" + type(req).__name__.lower(), None)
        if handler is None:
            raise OSError(errno.EOPNOTSUPP, f"operation {type(req).__name__} is not supported here")
        return handler(req)

    # --- metadata ---------------------------------------------------------------------------------
    def op_ping(self, req: m.Ping) -> None:
        return None

    def op_stat(self, req: m.Stat) -> m.Attr:
        path = normalize(req.path)
        if path != "/" and not self.acl.visible(self.user, self.groups, path):
            self.acl.check(self.user, self.groups, path, Right.LIST)
        real = self.root.resolve_parent(path)
        if real != path and not self.acl.visible(self.user, self.groups, real):
            self.acl.check(self.user, self.groups, real, Right.LIST)
        return to_attr(self.root.lstat(path))

    def op_list(self, req: m.List) -> m.ListPage:
        path = self.check(req.path, Right.LIST)
        limit = max(1, min(req.limit, LIST_MAX))
        # O_NOFOLLOW: a symlink to a directory elsewhere is not listed through (see `check`).
        with self.root.opened(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW) as dfd:
            names = sorted(n for n in os.listdir(dfd) if n > req.after)
            entries = []
            for name in names[:limit]:
                try:
                    s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while listing
                entries.append(m.Entry(name, to_attr(s)))
        return m.ListPage(entries=entries, more=len(names) > limit)

    def op_readlink(self, req: m.Readlink) -> str:
        path = self.check(req.path, Right.READ)
        with self.root.parent(path) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def op_statfs(self, req: m.StatFs) -> m.FsStats:
        s = os.statvfs(self.root.path)
        return m.FsStats(
            bsize=s.f_bsize,
            frsize=s.f_frsize,
            blocks=s.f_blocks,
            bfree=s.f_bfree,
            bavail=s.f_bavail,
            files=s.f_files,
            ffree=s.f_ffree,
            namemax=s.f_namemax,
        )

    # --- files ------------------------------------------------------------------------------------
    def op_open(self, req: m.Open) -> m.Opened:
        acc = req.flags & os.O_ACCMODE
        path = normalize(req.path)
        if acc != os.O_WRONLY:
            self.check(path, Right.READ)
        if acc != os.O_RDONLY or req.flags & os.O_TRUNC:
            self.check(path, Right.WRITE)
        flags = req.flags & (os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_DIRECTORY)
        fd = self.root.open(path, flags | os.O_NOFOLLOW)
        try:
            s = os.fstat(fd)
            if st.S_ISDIR(s.st_mode) and acc != os.O_RDONLY:
                raise IsADirectoryError(errno.EISDIR, f"{path} is a directory")
        except BaseException:
            os.close(fd)
            raise
        return m.Opened(self._new_handle(fd, path, flags), to_attr(s))

    def op_create(self, req: m.Create) -> m.Opened:
        path = self.check(req.path, Right.WRITE)
        keep = os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_EXCL
        flags = (req.flags & keep) | os.O_CREAT | os.O_NOFOLLOW
        fd, created = self._open_create(path, flags, req.mode & 0o7777)
        try:
            if created:
                # The client's kernel applied the caller's umask already; the server's own
                # umask must not take more away (a 0620 create came out 0600).
                os.fchmod(fd, req.mode & 0o7777)
            attr = to_attr(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return m.Opened(self._new_handle(fd, path, flags), attr)

    def _open_create(self, path: str, flags: int, mode: int) -> tuple[int, bool]:
        """Open with O_CREAT, and say whether this call created the file."""
        if flags & os.O_EXCL:
            return self.root.open(path, flags, mode), True
        for _ in range(8):  # the name may come and go between the two opens
            try:
                return self.root.open(path, flags | os.O_EXCL, mode), True
            except FileExistsError:
                pass
            try:
                return self.root.open(path, flags & ~os.O_CREAT), False
            except FileNotFoundError:
                continue
        raise OSError(errno.EAGAIN, f"{path} keeps appearing and disappearing")

    def op_read(self, req: m.Read) -> bytes:
        h = self._handle(req.handle)
        if not h.readable:
            raise OSError(errno.EBADF, "file handle not open for reading")
        _check_range(req.offset, req.size)
        return os.pread(h.fd, min(req.size, MAX_IO), req.offset)

    def op_write(self, req: m.Write) -> int:
        h = self._handle(req.handle)
        if not h.writable:
            raise OSError(errno.EBADF, "file handle not open for writing")
        _check_range(req.offset, len(req.data))
        view = memoryview(req.data)
        done = 0
        while done < len(view):
            done += os.pwrite(h.fd, view[done:], req.offset + done)
        return done

    def op_close(self, req: m.Close) -> None:
        h = self.handles.pop(req.handle, None)
        if h is None:
            raise OSError(errno.EBADF, f"no open file handle {req.handle}")
        os.close(h.fd)

    def op_fstat(self, req: m.FStat) -> m.Attr:
        return to_attr(os.fstat(self._handle(req.handle).fd))

    def op_fsync(self, req: m.Fsync) -> None:
        h = self._handle(req.handle)
        (os.fdatasync if req.datasync else os.fsync)(h.fd)

    # --- namespace --------------------------------------------------------------------------------
    def op_mkdir(self, req: m.Mkdir) -> m.Attr:
        path = self.check(req.path, Right.WRITE)
        with self.root.parent(path) as (fd, name):
            os.mkdir(name, req.mode & 0o7777, dir_fd=fd)
            dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            try:
                # The caller's mode exactly (see op_create), keeping a setgid bit inherited
                # from the parent as mkdir(2) does.
                os.fchmod(dfd, (req.mode & 0o1777) | (os.fstat(dfd).st_mode & st.S_ISGID))
                return to_attr(os.fstat(dfd))
            finally:
                os.close(dfd)

    def op_mknod(self, req: m.Mknod) -> m.Attr:
        path = self.check(req.path, Right.WRITE)
        kind = st.S_IFMT(req.mode)
        if kind not in (st.S_IFIFO, st.S_IFSOCK, st.S_IFREG):
            raise PermissionError(errno.EPERM, "device files are not created on etfs servers")
        with self.root.parent(path) as (fd, name):
            os.mknod(name, kind | (req.mode & 0o7777), 0, dir_fd=fd)
        with self.root.opened(path) as pfd:  # O_PATH: a FIFO is never opened for I/O here
            os.chmod(f"/proc/self/fd/{pfd}", req.mode & 0o7777)
            return to_attr(os.fstat(pfd))

    def op_rmdir(self, req: m.Rmdir) -> None:
        path = self.check(req.path, Right.DELETE)
        with self.root.parent(path) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def op_unlink(self, req: m.Unlink) -> None:
        path = self.check(req.path, Right.DELETE)
        with self.root.parent(path) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def op_rename(self, req: m.Rename) -> None:
        old = self.check(req.old, Right.DELETE)
        new = self.check(req.new, Right.WRITE)
        with self.root.parent(old) as (ofd, oname), self.root.parent(new) as (nfd, nname):
            if req.noreplace or req.exchange:
                _renameat2(ofd, oname, nfd, nname, noreplace=req.noreplace, exchange=req.exchange)
            else:
                os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)

    def op_symlink(self, req: m.Symlink) -> m.Attr:
        path = self.check(req.path, Right.WRITE)
        with self.root.parent(path) as (fd, name):
            # The target is stored as data; following it later is confined by openat2.
            os.symlink(req.target, name, dir_fd=fd)
            return to_attr(os.stat(name, dir_fd=fd, follow_symlinks=False))

    def op_link(self, req: m.Link) -> m.Attr:
        old = self.check(req.old, Right.READ)
        new = self.check(req.new, Right.WRITE)
        with self.root.parent(old) as (ofd, oname), self.root.parent(new) as (nfd, nname):
            os.link(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd, follow_symlinks=False)
            return to_attr(os.stat(nname, dir_fd=nfd, follow_symlinks=False))

    def op_setattr(self, req: m.SetAttr) -> m.Attr:
        path = self.check(req.path, Right.WRITE)
        if req.size is not None:
            _check_range(0, req.size)
            with self.root.opened(path, os.O_WRONLY | os.O_NOFOLLOW) as fd:
                os.ftruncate(fd, req.size)
        with self.root.opened(path) as pfd:
            # An O_PATH fd cannot be fchmod'ed; its /proc magic link can (we opened it confined).
            proc = f"/proc/self/fd/{pfd}"
            s = os.fstat(pfd)
            is_link = st.S_ISLNK(s.st_mode)
            if req.mode is not None and not is_link:
                os.chmod(proc, req.mode & 0o7777)
            if req.uid is not None or req.gid is not None:
                uid = -1 if req.uid is None else req.uid
                gid = -1 if req.gid is None else req.gid
                if is_link:  # lchown of the /proc magic link would not reach the symlink
                    with self.root.parent(path) as (dfd, name):
                        os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
                else:
                    os.chown(proc, uid, gid)
            if req.atime_ns is not None or req.mtime_ns is not None or req.atime_now or req.mtime_now:
                now = time.time_ns()
                atime = now if req.atime_now else (s.st_atime_ns if req.atime_ns is None else req.atime_ns)
                mtime = now if req.mtime_now else (s.st_mtime_ns if req.mtime_ns is None else req.mtime_ns)
                if is_link:
                    with self.root.parent(path) as (dfd, name):
                        os.utime(name, ns=(atime, mtime), dir_fd=dfd, follow_symlinks=False)
                else:
                    os.utime(proc, ns=(atime, mtime))
            return to_attr(os.fstat(pfd))

    def op_ftruncate(self, req: m.FTruncate) -> m.Attr:
        h = self._handle(req.handle)
        if not h.writable:
            raise OSError(errno.EBADF, "file handle not open for writing")
        _check_range(0, req.size)
        os.ftruncate(h.fd, req.size)
        return to_attr(os.fstat(h.fd))

    # --- checksums and xattrs ---------------------------------------------------------------------
    def op_checksum(self, req: m.Checksum) -> str:
        path = self.check(req.path, Right.READ)
        _check_range(req.offset, max(req.length, 0))
        if req.length < -1:
            raise OSError(errno.EINVAL, f"length {req.length} out of range")
        with self.root.opened(path, os.O_RDONLY | os.O_NOFOLLOW) as fd:
            return file_digest(fd, req.offset, req.length)

    def op_getxattr(self, req: m.GetXattr) -> bytes:
        path = self.check(req.path, Right.READ)
        _check_xattr_name(req.name)
        with self.root.opened(path) as fd:
            return os.getxattr(f"/proc/self/fd/{fd}", req.name)

    def op_listxattr(self, req: m.ListXattr) -> list[str]:
        path = self.check(req.path, Right.READ)
        with self.root.opened(path) as fd:
            try:
                names = os.listxattr(f"/proc/self/fd/{fd}")
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EPERM):
                    return []
                raise
            return [n for n in names if n.startswith(XATTR_PREFIX)]

    def op_setxattr(self, req: m.SetXattr) -> None:
        path = self.check(req.path, Right.WRITE)
        _check_xattr_name(req.name)
        with self.root.opened(path) as fd:
            os.setxattr(f"/proc/self/fd/{fd}", req.name, req.value)

    def op_removexattr(self, req: m.RemoveXattr) -> None:
        path = self.check(req.path, Right.WRITE)
        _check_xattr_name(req.name)
        with self.root.opened(path) as fd:
            os.removexattr(f"/proc/self/fd/{fd}", req.name)


MAX_OFFSET = 2**63 - 1


def _check_range(offset: int, length: int) -> None:
    """Client-supplied offsets and sizes: EINVAL instead of a ValueError/OverflowError in the syscall."""
    if not (0 <= offset <= MAX_OFFSET and 0 <= length <= MAX_OFFSET and offset + length <= MAX_OFFSET):
        raise OSError(errno.EINVAL, f"offset {offset} / size {length} out of range")


def _check_xattr_name(name: str) -> None:
    if not name.startswith(XATTR_PREFIX):
        raise OSError(errno.EOPNOTSUPP, "only user.* extended attributes are supported")


def file_digest(fd: int, offset: int = 0, length: int = -1) -> str:
    """xxh3-128 hex digest of a range of an open file."""
    h = xxhash.xxh3_128()
    end = os.fstat(fd).st_size if length < 0 else offset + length
    pos = offset
    while pos < end:
        chunk = os.pread(fd, min(8 * 1024 * 1024, end - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def _renameat2(ofd: int, oname: str, nfd: int, nname: str, *, noreplace: bool, exchange: bool) -> None:
    native.renameat2(ofd, oname, nfd, nname, (1 if noreplace else 0) | (2 if exchange else 0))
