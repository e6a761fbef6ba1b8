"""Which errno a failed copy answers the program with (`cp`, `etfs cp`): one function.

A failed transfer carries the destination's typed failure code when it gave one
(``TransferFailed.code``, `etfs.protocol.transfer.FailureCode`) and always an errno (the
server's `Err` reply or transfer status, ``TransferFailed.errno``).  `reply_errno` answers
from the code first, else keeps the errnos that say what happened (disk full, quota, source
changed, timed out, permission...), and turns the rest into EIO.

It never answers an errno that makes GNU `cp` quietly retry with read/write through the
client (coreutils treats ENOSYS, EOPNOTSUPP, EINVAL, EBADF, EXDEV, ETXTBSY and EPERM
from copy_file_range as "not supported here"): EPERM becomes EACCES, the others EIO.
ENOSYS in particular would disable copy_file_range for the whole mount (see README).
"""

from __future__ import annotations

import errno

from etfs.protocol.transfer import FailureCode

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
# A typed failure code says it best (NO_SPACE: ENOSPC or EDQUOT, whichever errno came with it).
BY_CODE = {
    FailureCode.SOURCE_CHANGED: errno.ESTALE,
    FailureCode.TIMED_OUT: errno.ETIMEDOUT,
    FailureCode.PERMISSION: errno.EACCES,
    FailureCode.CAPABILITY_EXPIRED: errno.EACCES,
    FailureCode.CAPABILITY_REFUSED: errno.EACCES,
    FailureCode.PEER_UNREACHABLE: errno.EIO,  # the servers cannot reach each other (policy always)
    FailureCode.CANCELLED: errno.EINTR,
    FailureCode.EXISTS: errno.EEXIST,
    FailureCode.IO: errno.EIO,
}


def reply_errno(exc: BaseException) -> int:
    """The errno to answer a program with for the failed copy ``exc`` (never ENOSYS)."""
    err = getattr(exc, "errno", None) or errno.EIO
    code = getattr(exc, "code", None)
    if code == FailureCode.NO_SPACE:
        return err if err in (errno.ENOSPC, errno.EDQUOT) else errno.ENOSPC
    if isinstance(code, FailureCode) and code in BY_CODE:
        return BY_CODE[code]
    err = RENAMED.get(err, err)
    return err if err in MEANINGFUL else errno.EIO
