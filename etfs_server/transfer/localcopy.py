"""Same-server copies: the server's own copy_file_range into a part file, then rename.

Both paths are resolved once and checked on what they reach (`Session.at`): the source is
opened through its held directory, and the part file is created fresh in the destination's
held directory (`WorkDir`) and renamed there, all with the user's account.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath

from etfs.protocol.transfer import CopyMode, TransferState, noreplace, part_paths, same_version

from ..acl import Right
from ..handlers import Session
from ..identity import as_account
from .capabilities import file_identity
from .errors import TransferError
from .records import Record
from .workdir import WorkDir

log = logging.getLogger(__name__)


def copy_within(
    session: Session, src: str, dst: str, mode: CopyMode, preserve_times: bool, rec: Record
) -> None:
    """Copy ``src`` to ``dst`` in the session's export (blocking); progress and outcome go to ``rec``."""
    with as_account(session.account):
        with session.at(src, Right.READ) as sloc, session.at(dst, Right.WRITE) as dloc:
            sfd = session.root.open_at(sloc, os.O_RDONLY)
            owner = session.account.uid if session.account is not None else os.geteuid()
            workdir = WorkDir.of(dloc, owner)
        try:
            _copy(sfd, workdir, dloc.name, dst, mode, preserve_times, rec)
        finally:
            os.close(sfd)
            workdir.close()


def _copy(
    sfd: int, wd: WorkDir, name: str, dst: str, mode: CopyMode, preserve_times: bool, rec: Record
) -> None:
    part = posixpath.basename(part_paths(dst)[0])
    s = os.fstat(sfd)
    rec.bytes_total = s.st_size
    old = wd.lstat(name)
    if old is not None and mode == CopyMode.NEW:
        raise TransferError(errno.EEXIST, f"destination {dst} exists (mode new)")
    if (
        old is not None
        and mode == CopyMode.SKIP_EXISTING
        and same_version(old.st_size, old.st_mtime_ns, s.st_size, s.st_mtime_ns)
    ):
        rec.state, rec.bytes_done = TransferState.SKIPPED, s.st_size
        return
    dfd = wd.create(part, os.O_WRONLY, 0o644)
    try:
        pos = 0
        while pos < s.st_size:
            n = os.copy_file_range(sfd, dfd, s.st_size - pos, pos, pos)
            if n == 0:
                break
            pos += n
        now = os.fstat(sfd)
        if pos != s.st_size or file_identity(now) != file_identity(s):
            raise TransferError(errno.ESTALE, f"source of {dst} changed during the copy")
        if preserve_times or mode == CopyMode.SKIP_EXISTING:
            # so that the next skip-existing run recognises the copy
            os.utime(dfd, ns=(s.st_mtime_ns, s.st_mtime_ns))
        os.fdatasync(dfd)
        rec.bytes_done = pos
        wd.rename(part, name, noreplace=noreplace(mode))
    except BaseException:
        wd.remove_quietly(part)
        raise
    finally:
        os.close(dfd)
    rec.state = TransferState.DONE
