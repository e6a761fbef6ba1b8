"""File operations of one authenticated session: ACL check, confined path, syscall.

Each handler is a plain blocking function, run in a worker thread or inline by `server`.
They raise `OSError` (including `AccessDenied` and `EscapeError`, both EACCES); the
connection turns that into an `Err` reply carrying the errno and a message.

Every path is resolved **once** (`ExportRoot.locate`): the parent directory is held open,
the ACL is checked on where that directory really is, and the syscall then works on
that fd plus one name, so a directory swapped for a symlink between the check and the
operation cannot redirect it.  Every handler runs with the user's local account as its
filesystem identity (`identity.as_account`), so the kernel's permissions apply too.

The rule per operation (README, Security, says the same):

* read, readlink, checksum, get/list xattrs: ``read``; stat: the object is visible; list: ``list``.
* open for writing, truncate, setattr (mode, times), set/remove xattrs: ``write``.
* create: ``write``; opening an existing file read-write through create also needs ``read``.
* mkdir, symlink: ``write``.  unlink, rmdir: ``delete``.
* rename: ``delete`` on the old name, ``write`` on the new one, and ``delete`` on the new one
  when it replaces something.  exchange: all four on both.  link: ``read`` on the old name,
  ``write`` on the new one.  A rename or link that would give the object rights it did
  not have where it was (a different rule set applies, or rules start inside a moved
  directory) is refused with EXDEV, so `mv` falls back to copy + delete, each checked.
* chown/chgrp: only users with ``may_chown`` (a group the account belongs to is fine);
  setuid/setgid bits are dropped unless the user has ``may_setid``; the export's umask
  is removed from every mode a file or directory is created with.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat as st
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import xxhash

from etfs import _sendfile_cffi as native
from etfs.protocol import messages as m

from .acl import ACL, Right
from .exports import ExportRoot, Located, normalize
from .identity import Account, as_account
from .limits import UserLoad

log = logging.getLogger(__name__)

MAX_IO = 16 * 1024 * 1024
LIST_MAX = 5000
XATTR_PREFIX = "user."
SETID = st.S_ISUID | st.S_ISGID


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
    """One client connection's identity, export, privileges and open files."""

    user: str
    groups: frozenset[str]
    root: ExportRoot
    acl: ACL
    account: Account | None = None  # None: the server's own
    may_chown: bool = False
    may_setid: bool = False
    umask: int = 0
    load: UserLoad = field(default_factory=UserLoad)
    handles: dict[int, Handle] = field(default_factory=dict)
    # Handlers run in several threads at once; next() on a count is atomic under the GIL.
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # Called when the connection ends (transfers started by it are stopped).
    on_close: list[Callable[[], None]] = field(default_factory=list)
    # Set when the connection ends: long handlers (checksums) stop early.
    closed: threading.Event = field(default_factory=threading.Event)

    # --- helpers ---------------------------------------------------------------------------------
    def require(self, loc: Located, *rights: Right) -> None:
        """The ACL decision, on the path the client named and on where the object really is."""
        for right in rights:
            self.acl.check(self.user, self.groups, loc.asked, right)
            if loc.path != loc.asked:  # reached through a symlinked directory: the target too
                self.acl.check(self.user, self.groups, loc.path, right)

    def precheck(self, path: str, *rights: Right) -> str:
        """The ACL on the path as asked, before anything is resolved: a user without rights
        learns nothing about what exists there (EACCES, never ENOENT).  Returns it normalised."""
        asked = normalize(path)
        for right in rights:
            self.acl.check(self.user, self.groups, asked, right)
        return asked

    @contextmanager
    def at(self, path: str, *rights: Right) -> Iterator[Located]:
        """``path`` resolved once and checked for ``rights`` (see the module docstring)."""
        with self.root.locate(self.precheck(path, *rights)) as loc:
            self.require(loc, *rights)
            yield loc

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

    def _creation_mode(self, mode: int) -> int:
        """The mode a new file or directory gets: without the export's umask and, unless the
        user may set them, without setuid/setgid."""
        mode &= 0o7777 & ~self.umask
        return mode if self.may_setid else mode & ~SETID

    def close_all(self) -> None:
        self.closed.set()
        for h in self.handles.values():
            try:
                os.close(h.fd)
            except OSError:
                pass
            self.load.drop_handle()
        self.handles.clear()

    def dispatch(self, req: m.Request[Any]) -> Any:
        handler = OPERATIONS.get(type(req))
        if handler is None:
            raise OSError(errno.EOPNOTSUPP, f"operation {type(req).__name__} is not supported here")
        with as_account(self.account):
            return handler(self, req)

    # --- metadata ---------------------------------------------------------------------------------
    def op_ping(self, req: m.Ping) -> None:
        return None

    def _visible(self, path: str) -> None:
        if path != "/" and not self.acl.visible(self.user, self.groups, path):
            self.acl.check(self.user, self.groups, path, Right.LIST)

    def op_stat(self, req: m.Stat) -> m.Attr:
        asked = normalize(req.path)
        self._visible(asked)  # before resolving: nothing to learn about what exists there
        with self.root.locate(asked) as loc:
            if loc.path != asked:  # reached through a symlinked directory: the target too
                self._visible(loc.path)
            dfd, name = loc.at
            return to_attr(os.stat(name, dir_fd=dfd, follow_symlinks=False))

    def op_list(self, req: m.List) -> m.ListPage:
        limit = max(1, min(req.limit, LIST_MAX))
        with self.at(req.path, Right.LIST) as loc:
            # O_NOFOLLOW: a symlink to a directory elsewhere is not listed through.
            dfd = self.root.open_at(loc, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = sorted(n for n in os.listdir(dfd) if n > req.after)
            entries = []
            for name in names[:limit]:
                try:
                    s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while listing
                entries.append(m.Entry(name, to_attr(s)))
        finally:
            os.close(dfd)
        return m.ListPage(entries=entries, more=len(names) > limit)

    def op_readlink(self, req: m.Readlink) -> str:
        with self.at(req.path, Right.READ) as loc:
            dfd, name = loc.at
            return os.readlink(name, dir_fd=dfd)

    def op_statfs(self, req: m.StatFs) -> m.FsStats:
        s = os.statvfs(self.root.fd)
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
        rights = []
        if acc != os.O_WRONLY:
            rights.append(Right.READ)
        if acc != os.O_RDONLY or req.flags & os.O_TRUNC:
            rights.append(Right.WRITE)
        flags = req.flags & (os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_DIRECTORY)
        with self.at(req.path, *rights) as loc:
            return self._opened(self.root.open_at(loc, flags), loc.path, flags, refuse_dir=acc != os.O_RDONLY)

    def op_create(self, req: m.Create) -> m.Opened:
        keep = os.O_ACCMODE | os.O_TRUNC | os.O_APPEND
        flags = req.flags & keep
        mode = self._creation_mode(req.mode)
        with self.at(req.path, Right.WRITE) as loc:
            while True:
                try:
                    fd = self.root.open_at(loc, flags | os.O_CREAT | os.O_EXCL, mode)
                except FileExistsError:
                    if req.flags & os.O_EXCL:
                        raise
                else:
                    # The kernel applied the server's process umask; the export's is the one.
                    if os.fstat(fd).st_mode & 0o7777 != mode:
                        os.fchmod(fd, mode)
                    parent = to_attr(os.fstat(loc.dir_fd))
                    return self._opened(fd, loc.path, flags, refuse_dir=True, parent=parent)
                # It exists: this is an open of an existing file, checked as one.
                if flags & os.O_ACCMODE != os.O_WRONLY:
                    self.require(loc, Right.READ)
                try:
                    fd = self.root.open_at(loc, flags)
                except FileNotFoundError:
                    continue  # removed in between: create it after all
                return self._opened(fd, loc.path, flags, refuse_dir=True)

    def _opened(
        self, fd: int, path: str, flags: int, *, refuse_dir: bool, parent: m.Attr | None = None
    ) -> m.Opened:
        try:
            s = os.fstat(fd)
            if st.S_ISDIR(s.st_mode) and refuse_dir:
                raise IsADirectoryError(errno.EISDIR, f"{path} is a directory")
            self.load.take_handle(self.user)
        except BaseException:
            os.close(fd)
            raise
        return m.Opened(self._new_handle(fd, path, flags), to_attr(s), parent)

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
        self.load.drop_handle()
        os.close(h.fd)

    def op_fstat(self, req: m.FStat) -> m.Attr:
        return to_attr(os.fstat(self._handle(req.handle).fd))

    def op_fsync(self, req: m.Fsync) -> None:
        h = self._handle(req.handle)
        (os.fdatasync if req.datasync else os.fsync)(h.fd)

    # --- namespace --------------------------------------------------------------------------------
    def op_mkdir(self, req: m.Mkdir) -> m.Attr:
        mode = self._creation_mode(req.mode) & ~st.S_ISUID
        with self.at(req.path, Right.WRITE) as loc:
            dfd, name = loc.at
            os.mkdir(name, mode, dir_fd=dfd)
            fd = self.root.open_at(loc, os.O_PATH | os.O_DIRECTORY)
            try:
                s = os.fstat(fd)
                if s.st_mode & 0o7777 != mode:  # the process umask, and setgid inherited
                    os.chmod(f"/proc/self/fd/{fd}", mode | (s.st_mode & st.S_ISGID))
                    s = os.fstat(fd)
                return to_attr(s)
            finally:
                os.close(fd)

    def op_mknod(self, req: m.Mknod) -> m.Attr:
        kind = st.S_IFMT(req.mode)
        if kind not in (st.S_IFIFO, st.S_IFSOCK, st.S_IFREG):
            raise PermissionError(errno.EPERM, "device files are not created on etfs servers")
        mode = self._creation_mode(req.mode)
        with self.at(req.path, Right.WRITE) as loc:
            dfd, name = loc.at
            os.mknod(name, kind | mode, 0, dir_fd=dfd)
            pfd = self.root.open_at(loc, os.O_PATH)  # O_PATH: a FIFO is never opened for I/O here
            try:
                if os.fstat(pfd).st_mode & 0o7777 != mode:  # the server's process umask
                    os.chmod(f"/proc/self/fd/{pfd}", mode)
                return to_attr(os.fstat(pfd))
            finally:
                os.close(pfd)

    def op_rmdir(self, req: m.Rmdir) -> None:
        with self.at(req.path, Right.DELETE) as loc:
            dfd, name = loc.at
            os.rmdir(name, dir_fd=dfd)

    def op_unlink(self, req: m.Unlink) -> None:
        with self.at(req.path, Right.DELETE) as loc:
            dfd, name = loc.at
            os.unlink(name, dir_fd=dfd)

    def _same_rights(self, old: Located, new: Located, *, both_ways: bool) -> None:
        """EXDEV unless moving (or linking) the object from ``old`` to ``new`` grants it nothing
        new (and, for ``both_ways``, the other object nothing new either)."""
        r_old = self.acl.rights(self.user, self.groups, old.path)
        r_new = self.acl.rights(self.user, self.groups, new.path)
        widened = not r_new <= r_old or (both_ways and not r_old <= r_new)
        beneath = any(self.acl.rules_beneath(self.user, self.groups, p) for p in (old.path, new.path))
        if widened or beneath:
            log.warning(
                "refused: user=%s move/link %s -> %s crosses locations with different rights",
                self.user,
                old.path,
                new.path,
            )
            raise OSError(
                errno.EXDEV,
                f"{old.asked} -> {new.asked}: the two locations give different rights "
                "(copy and delete instead)",
            )

    def op_rename(self, req: m.Rename) -> None:
        both = (Right.WRITE, Right.DELETE) if req.exchange else ()
        old_path = self.precheck(req.old, Right.DELETE, *both)
        new_path = self.precheck(req.new, Right.WRITE, *both)
        with self.root.locate(old_path) as old, self.root.locate(new_path) as new:
            self.require(old, Right.DELETE)
            self.require(new, Right.WRITE)
            if req.exchange:
                self.require(old, Right.WRITE)
                self.require(new, Right.DELETE)
            self._same_rights(old, new, both_ways=req.exchange)
            (ofd, oname), (nfd, nname) = old.at, new.at
            if req.exchange:
                native.renameat2(ofd, oname, nfd, nname, native.RENAME_EXCHANGE)
                return
            try:
                # Without replacing first: replacing deletes what is there, which needs `delete`.
                native.renameat2(ofd, oname, nfd, nname, native.RENAME_NOREPLACE)
                return
            except FileExistsError:
                if req.noreplace:
                    raise
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # a filesystem without RENAME_NOREPLACE
                    raise
            self.require(new, Right.DELETE)
            os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)

    def op_symlink(self, req: m.Symlink) -> m.Attr:
        with self.at(req.path, Right.WRITE) as loc:
            dfd, name = loc.at
            # The target is stored as data; following it later is confined by openat2.
            os.symlink(req.target, name, dir_fd=dfd)
            return to_attr(os.stat(name, dir_fd=dfd, follow_symlinks=False))

    def op_link(self, req: m.Link) -> m.Attr:
        with self.at(req.old, Right.READ) as old, self.at(req.new, Right.WRITE) as new:
            self._same_rights(old, new, both_ways=False)
            (ofd, oname), (nfd, nname) = old.at, new.at
            os.link(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd, follow_symlinks=False)
            return to_attr(os.stat(nname, dir_fd=nfd, follow_symlinks=False))

    def op_setattr(self, req: m.SetAttr) -> m.Attr:
        with self.at(req.path, Right.WRITE) as loc:
            if req.size is not None:
                _check_range(0, req.size)
                fd = self.root.open_at(loc, os.O_WRONLY)
                try:
                    os.ftruncate(fd, req.size)
                finally:
                    os.close(fd)
            pfd = self.root.open_at(loc, os.O_PATH)
            try:
                return self._setattr(loc, pfd, req)
            finally:
                os.close(pfd)

    def _setattr(self, loc: Located, pfd: int, req: m.SetAttr) -> m.Attr:
        # An O_PATH fd cannot be fchmod'ed; its /proc magic link can (we opened it confined).
        proc = f"/proc/self/fd/{pfd}"
        s = os.fstat(pfd)
        is_link = st.S_ISLNK(s.st_mode)
        # A symlink is changed through its directory: the /proc link of an O_PATH fd of a
        # symlink would lead to what it points to.
        dfd, name = loc.at
        if req.uid is not None or req.gid is not None:
            for value in (req.uid, req.gid):
                if value is not None and not 0 <= value < 2**32 - 1:
                    raise OSError(errno.EINVAL, f"owner or group {value} out of range")
            self._check_chown(s, req.uid, req.gid)
            uid = -1 if req.uid is None else req.uid
            gid = -1 if req.gid is None else req.gid
            if is_link:
                os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
            else:
                os.chown(proc, uid, gid)
            if not self.may_setid and not is_link and not st.S_ISDIR(s.st_mode):
                # A root server keeps setuid/setgid across chown (CAP_FSETID); a user would not.
                after = os.fstat(pfd)
                if after.st_mode & SETID:
                    os.chmod(proc, after.st_mode & 0o7777 & ~SETID)
        if req.mode is not None and not is_link:
            mode = req.mode & 0o7777
            if not self.may_setid:
                mode &= ~SETID
            os.chmod(proc, mode)
        if req.atime_ns is not None or req.mtime_ns is not None or req.atime_now or req.mtime_now:
            now = time.time_ns()
            atime = now if req.atime_now else (s.st_atime_ns if req.atime_ns is None else req.atime_ns)
            mtime = now if req.mtime_now else (s.st_mtime_ns if req.mtime_ns is None else req.mtime_ns)
            if is_link:
                os.utime(name, ns=(atime, mtime), dir_fd=dfd, follow_symlinks=False)
            else:
                os.utime(proc, ns=(atime, mtime))
        return to_attr(os.fstat(pfd))

    def _check_chown(self, s: os.stat_result, uid: int | None, gid: int | None) -> None:
        """POSIX's rule for a user without privileges, unless the config grants ``may_chown``:
        the owner stays, and the group may only become one of the account's groups."""
        if self.may_chown:
            return
        if uid is not None and uid != s.st_uid:
            raise PermissionError(errno.EPERM, f"user {self.user!r} may not change owners (may_chown)")
        if gid is not None and gid != s.st_gid:
            mine = () if self.account is None else (self.account.gid, *self.account.groups)
            if gid not in mine:
                raise PermissionError(
                    errno.EPERM, f"user {self.user!r} may only give files to the account's own groups"
                )

    def op_ftruncate(self, req: m.FTruncate) -> m.Attr:
        h = self._handle(req.handle)
        if not h.writable:
            raise OSError(errno.EBADF, "file handle not open for writing")
        _check_range(0, req.size)
        os.ftruncate(h.fd, req.size)
        return to_attr(os.fstat(h.fd))

    # --- checksums and xattrs ---------------------------------------------------------------------
    def op_checksum(self, req: m.Checksum) -> str:
        _check_range(req.offset, max(req.length, 0))
        if req.length < -1:
            raise OSError(errno.EINVAL, f"length {req.length} out of range")
        with self.at(req.path, Right.READ) as loc:
            fd = self.root.open_at(loc, os.O_RDONLY)
        try:
            return file_digest(fd, req.offset, req.length, stop=self.closed)
        finally:
            os.close(fd)

    @contextmanager
    def _xattr_target(self, path: str, right: Right) -> Iterator[str]:
        with self.at(path, right) as loc:
            fd = self.root.open_at(loc, os.O_PATH)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)

    def op_getxattr(self, req: m.GetXattr) -> bytes:
        _check_xattr_name(req.name)
        with self._xattr_target(req.path, Right.READ) as proc:
            return os.getxattr(proc, req.name)

    def op_listxattr(self, req: m.ListXattr) -> list[str]:
        with self._xattr_target(req.path, Right.READ) as proc:
            try:
                names = os.listxattr(proc)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EPERM):
                    return []
                raise
            return [n for n in names if n.startswith(XATTR_PREFIX)]

    def op_setxattr(self, req: m.SetXattr) -> None:
        _check_xattr_name(req.name)
        with self._xattr_target(req.path, Right.WRITE) as proc:
            os.setxattr(proc, req.name, req.value)

    def op_removexattr(self, req: m.RemoveXattr) -> None:
        _check_xattr_name(req.name)
        with self._xattr_target(req.path, Right.WRITE) as proc:
            os.removexattr(proc, req.name)


# The server answers exactly these requests of a session (transfers are `TransferService`'s).
OPERATIONS: dict[type[m.Request[Any]], Callable[[Session, Any], Any]] = {
    m.Ping: Session.op_ping,
    m.Stat: Session.op_stat,
    m.List: Session.op_list,
    m.Readlink: Session.op_readlink,
    m.StatFs: Session.op_statfs,
    m.Open: Session.op_open,
    m.Create: Session.op_create,
    m.Read: Session.op_read,
    m.Write: Session.op_write,
    m.Close: Session.op_close,
    m.FStat: Session.op_fstat,
    m.FTruncate: Session.op_ftruncate,
    m.Fsync: Session.op_fsync,
    m.Mkdir: Session.op_mkdir,
    m.Mknod: Session.op_mknod,
    m.Rmdir: Session.op_rmdir,
    m.Unlink: Session.op_unlink,
    m.Rename: Session.op_rename,
    m.Symlink: Session.op_symlink,
    m.Link: Session.op_link,
    m.SetAttr: Session.op_setattr,
    m.Checksum: Session.op_checksum,
    m.GetXattr: Session.op_getxattr,
    m.ListXattr: Session.op_listxattr,
    m.SetXattr: Session.op_setxattr,
    m.RemoveXattr: Session.op_removexattr,
}


MAX_OFFSET = 2**63 - 1


def _check_range(offset: int, length: int) -> None:
    """Client-supplied offsets and sizes: EINVAL instead of a ValueError/OverflowError in the syscall."""
    if not (0 <= offset <= MAX_OFFSET and 0 <= length <= MAX_OFFSET and offset + length <= MAX_OFFSET):
        raise OSError(errno.EINVAL, f"offset {offset} / size {length} out of range")


def _check_xattr_name(name: str) -> None:
    if not name.startswith(XATTR_PREFIX):
        raise OSError(errno.EOPNOTSUPP, "only user.* extended attributes are supported")


def file_digest(fd: int, offset: int = 0, length: int = -1, stop: threading.Event | None = None) -> str:
    """xxh3-128 hex digest of a range of an open file; ECANCELED once ``stop`` is set."""
    h = xxhash.xxh3_128()
    end = os.fstat(fd).st_size if length < 0 else offset + length
    pos = offset
    while pos < end:
        if stop is not None and stop.is_set():
            raise OSError(errno.ECANCELED, "checksum cancelled: the connection ended")
        chunk = os.pread(fd, min(8 * 1024 * 1024, end - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()
