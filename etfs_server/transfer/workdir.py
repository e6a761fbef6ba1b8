"""The destination directory of a copy, and the hidden work files a copy keeps in it.

A copy writes into a part file (plus a restart record and a journal for resumes) beside its
destination, in a directory that users can write to.  Someone may have put a hard link to
another file there under one of those names (a file they may only read, or not even see),
or a symlink: a copy that opened the name would then write into that other file.  So:

* the destination directory is resolved and checked **once** (`Session.at`), and the copy
  keeps that directory open (`WorkDir`) for all it does: later renames of a parent or a
  symlink swapped in cannot redirect it;
* work files are created fresh: whatever has the name is unlinked (which only removes that
  name), then the file is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``;
* an existing work file is reopened for a resume only when it is a regular file with one
  link that belongs to the account the copy runs as; anything else is replaced.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as st
from dataclasses import dataclass

from etfs import _sendfile_cffi as native

from ..exports import Located

log = logging.getLogger(__name__)


@dataclass
class WorkDir:
    """An open destination directory (O_PATH) and the uid the copy's files belong to."""

    fd: int
    path: str  # where the directory really is, export-relative (for messages)
    owner: int

    @classmethod
    def of(cls, loc: Located, owner: int) -> WorkDir:
        """Keep ``loc``'s directory open (a duplicate fd: ``loc`` closes its own)."""
        return cls(os.dup(loc.dir_fd), loc.path.rpartition("/")[0] or "/", owner)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def create(self, name: str, flags: int = os.O_RDWR, mode: int = 0o600) -> int:
        """A fresh, empty file of ours under ``name`` (whatever had the name is unlinked first)."""
        while True:
            self.remove(name)
            try:
                return os.open(
                    name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd
                )
            except FileExistsError:
                continue  # someone put a name there in between: take it away again

    def reopen(self, name: str, flags: int) -> int | None:
        """An existing work file, only if it is surely ours; None otherwise (or when missing)."""
        try:
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR):
                log.warning("cannot reopen %s/%s: %s", self.path, name, exc)
            return None
        s = os.fstat(fd)
        if not st.S_ISREG(s.st_mode) or s.st_nlink != 1 or s.st_uid != self.owner:
            log.warning(
                "not resuming from %s/%s: not a regular file with one link owned by uid %d",
                self.path,
                name,
                self.owner,
            )
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return fd

    def write_file(self, name: str, data: bytes) -> None:
        fd = self.create(name, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def remove(self, name: str) -> None:
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def remove_quietly(self, name: str) -> None:
        try:
            self.remove(name)
        except OSError:
            pass

    def rename(self, old: str, new: str, *, noreplace: bool) -> None:
        """``old`` becomes ``new`` in this directory (EEXIST instead of replacing, with ``noreplace``)."""
        native.renameat2(self.fd, old, self.fd, new, native.RENAME_NOREPLACE if noreplace else 0)
