"""Writing files by name without damaging the host: the one way etfs and etfs-server do it.

Port files, logs, registry and state files live at paths an operator (or, in a shared
directory such as /tmp, another user) chose.  Whatever already has the name may be a
symlink to /etc/passwd, a FIFO that blocks the writer, a device node, or another user's
file.  So every file written by name goes through here:

* `check_replaceable` refuses anything at the name but a regular file that belongs to us;
* `write_atomic` writes a fresh temporary file (``O_EXCL | O_NOFOLLOW``) and renames it over
  the name, so readers see the old or the new contents, never half;
* `create_new` makes a fresh part or temporary file the same way;
* `open_append` opens a log for appending, refusing the same things, and checks again on
  the open file (the name may have been swapped in between);
* `read_regular` reads back a file of this kind, never blocking on a FIFO put in its place.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _refuse(path: str | Path, s: os.stat_result) -> OSError | None:
    """Why ``s`` (what ``path`` names) must not be written over, or None."""
    if not stat.S_ISREG(s.st_mode):
        return OSError(errno.EEXIST, f"{path} exists and is not a regular file; not replacing it")
    if s.st_uid != os.geteuid():
        return OSError(errno.EPERM, f"{path} belongs to uid {s.st_uid}, not to us; not replacing it")
    return None


def check_replaceable(path: str | Path) -> None:
    """Refuse to write over anything but a regular file of ours (a device node, a FIFO, a
    symlink, someone else's file): OSError with a message naming the path."""
    try:
        s = os.lstat(path)
    except FileNotFoundError:
        return
    if (exc := _refuse(path, s)) is not None:
        raise exc


def write_atomic(path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` at once (a fresh temporary file renamed over it), and
    never over what `check_replaceable` refuses.  ``mode`` is set exactly (no umask)."""
    path = Path(path)
    check_replaceable(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    f = create_new(tmp, mode)
    try:
        with f:
            os.fchmod(f.fileno(), mode)
            f.write(data.encode() if isinstance(data, str) else data)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_new(path: str | Path, mode: int = 0o600) -> BinaryIO:
    """A fresh, empty file at ``path`` opened for writing (a part or temporary file).  Only a
    regular file of ours already there is replaced; the new one is created with ``O_EXCL |
    O_NOFOLLOW``, so a name planted after the check fails the call instead of being written."""
    check_replaceable(path)
    Path(path).unlink(missing_ok=True)
    return os.fdopen(os.open(path, _CREATE | os.O_EXCL, mode), "wb")


def open_append(path: str | Path, mode: int = 0o644) -> BinaryIO:
    """``path`` opened for appending (created if missing), only if it is a regular file of ours."""
    check_replaceable(path)  # before open(2): opening a device may already do something
    # O_NONBLOCK: a FIFO swapped in after the check must not block the open.
    fd = os.open(path, _CREATE | os.O_APPEND | os.O_NONBLOCK, mode)
    if (exc := _refuse(path, os.fstat(fd))) is not None:
        os.close(fd)
        raise exc
    os.set_blocking(fd, True)
    return os.fdopen(fd, "ab")


def read_regular(path: str | Path) -> bytes:
    """The contents of ``path`` if it is a regular file (not through a symlink: a FIFO planted
    under the name would block the reader forever, a symlink could point anywhere)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        return f.read()


def log_handler(path: str | Path) -> logging.Handler:
    """A logging handler appending to ``path`` (see `open_append`)."""
    # utf-8 text over the binary file, line-buffered so a crash loses nothing already logged.
    stream = io.TextIOWrapper(open_append(path), encoding="utf-8", errors="replace", line_buffering=True)
    return logging.StreamHandler(stream)


__all__ = ["check_replaceable", "create_new", "log_handler", "open_append", "read_regular", "write_atomic"]
