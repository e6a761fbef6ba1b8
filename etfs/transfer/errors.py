"""Which errno a failed copy answers the program with (`cp`, `etfs cp`): one function.

A failed transfer carries the errno the server's `Err` reply or transfer status gave
(``TransferFailed.errno``).  `reply_errno` keeps the ones that say what happened (disk
full, quota, source changed, timed out, permission...) and turns the rest into EIO.

It never answers an errno that makes GNU `cp` quietly retry with read/write through the
client (coreutils treats ENOSYS, EOPNOTSUPP, EINVAL, EBADF, EXDEV, ETXTBSY and EPERM
from copy_file_range as "not supported here"): EPERM becomes EACCES, the others EIO.
ENOSYS in particular would disable copy_file_range for the whole mount (see README).

When the server reports a typed failure code in the transfer status, map it here.
"""

from __future__ import annotations

import errno

# Errnos a transfer failure passes on unchanged.
MEANINGFUL = frozenset(
    {
        errno.ENOSPC,  # destination full
        errno.EDQUOT,  # quota exceeded
        errno.EFBIG,  # file too large for the destination
        errno.ESTALE,  # the source changed during the transfer
        errno.ETIMEDOUT,  # a server or peer went silent
        errno.EHOSTDOWN,  # a server is unreachable
        errno.EACCES,  # refused by an ACL, a capability or transfer.peers
        errno.EROFS,
        errno.ENOENT,
        errno.EEXIST,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENAMETOOLONG,
        errno.EBUSY,  # another transfer into the same file runs
        errno.EINTR,  # cancelled
    }
)
# Errnos that would make the program do something else than report the failure.
RENAMED = {errno.EPERM: errno.EACCES}


def reply_errno(exc: BaseException) -> int:
    """The errno to answer a program with for the failed copy ``exc`` (never ENOSYS)."""
    code = getattr(exc, "errno", None) or errno.EIO
    code = RENAMED.get(code, code)
    return code if code in MEANINGFUL else errno.EIO
