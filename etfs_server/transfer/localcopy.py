"""Same-server copies: the server's own copy_file_range into a part file, then rename."""

from __future__ import annotations

import errno
import logging
import os

from etfs.protocol.transfer import CopyMode, TransferState, part_paths, same_version

from ..exports import ExportRoot
from .capabilities import file_identity
from .destination import remove_quietly, rename_into_place
from .errors import TransferError
from .records import Record

log = logging.getLogger(__name__)


def copy_within(
    root: ExportRoot, src: str, dst: str, mode: CopyMode, preserve_times: bool, rec: Record
) -> None:
    """Copy ``src`` to ``dst`` in ``root`` (blocking); progress and outcome go to ``rec``."""
    part, _, _ = part_paths(dst)
    with root.opened(src, os.O_RDONLY | os.O_NOFOLLOW) as sfd:
        s = os.fstat(sfd)
        rec.bytes_total = s.st_size
        try:
            old: os.stat_result | None = root.lstat(dst)
        except FileNotFoundError:
            old = None
        if old is not None and mode == CopyMode.NEW:
            raise TransferError(errno.EEXIST, f"destination {dst} exists (mode new)")
        if (
            old is not None
            and mode == CopyMode.SKIP_EXISTING
            and same_version(old.st_size, old.st_mtime_ns, s.st_size, s.st_mtime_ns)
        ):
            rec.state, rec.bytes_done = TransferState.SKIPPED, s.st_size
            return
        dfd = root.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            pos = 0
            while pos < s.st_size:
                n = os.copy_file_range(sfd, dfd, s.st_size - pos, pos, pos)
                if n == 0:
                    break
                pos += n
            now = os.fstat(sfd)
            if pos != s.st_size or file_identity(now) != file_identity(s):
                raise TransferError(errno.ESTALE, f"source {src} changed during the copy")
            if preserve_times or mode == CopyMode.SKIP_EXISTING:
                # so that the next skip-existing run recognises the copy
                os.utime(dfd, ns=(s.st_mtime_ns, s.st_mtime_ns))
            os.fdatasync(dfd)
            rec.bytes_done = pos
            rename_into_place(root, part, dst, mode)
        except BaseException:
            remove_quietly(root, part)
            raise
        finally:
            os.close(dfd)
    rec.state = TransferState.DONE
