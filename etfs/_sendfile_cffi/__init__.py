"""Zero-copy / low-overhead data-path syscalls for etfs (cffi out-of-line API module).

Each function moves one whole block in a single C call: the loop over partial
transfers and EINTR runs in C with the GIL released, so call these from worker
threads (``trio.to_thread.run_sync``) with **blocking** sockets.  A blocking call
cannot be cancelled from Python: to abort one, ``shutdown()`` the socket (or close
the peer), which makes the call fail with an ``OSError``.  Bound every wait with
SO_RCVTIMEO/SO_SNDTIMEO: when one expires the call raises ``TimeoutError``
(``ETIMEDOUT``) rather than waiting on a silent peer.  A non-blocking socket is
polled for at most its own timeout (30 s if none is set), then ``TimeoutError``.

Senders
    :func:`sendfile` (``sendfile(2)``, no user-space copy) and :func:`read_send`
    (``pread`` into a caller buffer + ``send``; on loopback this is the faster one,
    and the buffer is available for hashing afterwards).  Both return ``count``, or
    fewer only when the source file ends before ``offset + count`` (a truncated
    source: the caller must treat a short count as an error on the stream).

Receivers
    :func:`recv_write` (``recv(MSG_WAITALL)`` + ``pwrite`` through a caller buffer,
    which then holds the block for hashing) and :func:`splice_recv` (socket -> pipe ->
    file with ``splice(2)``).  Both return exactly ``count`` or raise; a peer that
    closes early raises ``ConnectionResetError`` (``ECONNRESET``), never a short count.

Paths
    :func:`openat2` with the ``RESOLVE_*`` flags, e.g. ``RESOLVE_BENEATH |
    RESOLVE_NO_MAGICLINKS`` to keep a client-supplied path inside an export root.

Errors are raised as ``OSError(errno, strerror)`` (so the usual subclasses such as
``ConnectionResetError`` or ``BrokenPipeError`` apply).  Build in place for
development with ``python etfs/_sendfile_cffi/build.py``.
"""

from __future__ import annotations

import fcntl
import os
from types import TracebackType
from typing import Any, TypeAlias

from etfs._sendfile_cffi._native import ffi, lib

__all__ = [
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "RESOLVE_BENEATH",
    "RESOLVE_CACHED",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "Pipe",
    "openat2",
    "read_send",
    "recv_write",
    "renameat2",
    "sendfile",
    "splice_recv",
    "sync_file_range",
]

RESOLVE_NO_XDEV: int = int(lib.RESOLVE_NO_XDEV)
RESOLVE_NO_MAGICLINKS: int = int(lib.RESOLVE_NO_MAGICLINKS)
RESOLVE_NO_SYMLINKS: int = int(lib.RESOLVE_NO_SYMLINKS)
RESOLVE_BENEATH: int = int(lib.RESOLVE_BENEATH)
RESOLVE_IN_ROOT: int = int(lib.RESOLVE_IN_ROOT)
RESOLVE_CACHED: int = int(lib.RESOLVE_CACHED)

_PIPE_MAX_SIZE_FILE = "/proc/sys/fs/pipe-max-size"
_DEFAULT_PIPE_SIZE = 1 << 20

Buffer: TypeAlias = bytearray | memoryview


def _raise_errno() -> None:
    err = ffi.errno
    raise OSError(err, os.strerror(err))


def _check(result: int) -> int:
    if result < 0:
        _raise_errno()
    return int(result)


def _check_range(offset: int, count: int) -> None:
    if offset < 0 or count < 0:
        raise ValueError(f"offset and count must be >= 0 (got offset={offset}, count={count})")


def _writable(buf: Buffer) -> tuple[Any, int]:
    """cffi view of a writable, C-contiguous buffer and its length in bytes."""
    cbuf = ffi.from_buffer("char[]", buf, require_writable=True)
    return cbuf, len(cbuf)


def sendfile(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """Send ``count`` bytes of ``file_fd`` starting at ``offset`` to ``sock_fd``.

    Uses ``sendfile(2)``; the file position is not changed.  Returns the bytes sent:
    ``count``, or fewer if the file ends first.
    """
    _check_range(offset, count)
    return _check(lib.etfs_sendfile(sock_fd, file_fd, offset, count))


def read_send(file_fd: int, sock_fd: int, offset: int, count: int, buf: Buffer) -> int:
    """``pread`` ``count`` bytes at ``offset`` into ``buf`` and ``send`` them to ``sock_fd``.

    Works in ``len(buf)``-sized chunks; when ``count <= len(buf)`` the whole block is in
    ``buf[:count]`` afterwards (hash it there).  Returns ``count``, or fewer if the file
    ends first.  ``buf`` must be writable and contiguous.
    """
    _check_range(offset, count)
    cbuf, buflen = _writable(buf)
    if count and not buflen:
        raise ValueError("buf must not be empty")
    return _check(lib.etfs_read_send(file_fd, sock_fd, offset, count, cbuf, buflen))


def recv_write(sock_fd: int, file_fd: int, offset: int, count: int, buf: Buffer) -> int:
    """Receive exactly ``count`` bytes from ``sock_fd`` and ``pwrite`` them at ``offset``.

    Works in ``len(buf)``-sized chunks; when ``count <= len(buf)`` the block is in
    ``buf[:count]`` afterwards.  Returns ``count``; a peer closing early raises
    ``ConnectionResetError`` (the bytes before it may already be written).
    """
    _check_range(offset, count)
    cbuf, buflen = _writable(buf)
    if count and not buflen:
        raise ValueError("buf must not be empty")
    return _check(lib.etfs_recv_write(sock_fd, file_fd, offset, count, cbuf, buflen))


def _pipe_max_size() -> int:
    try:
        with open(_PIPE_MAX_SIZE_FILE) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return _DEFAULT_PIPE_SIZE


class Pipe:
    """A blocking, close-on-exec pipe enlarged for :func:`splice_recv`.

    ``size`` defaults to ``/proc/sys/fs/pipe-max-size`` (1 MiB here); if the kernel
    refuses (per-user pipe page limits), the pipe keeps the largest size it accepted.
    One pipe per concurrent transfer: a pipe must not be shared between threads.
    """

    __slots__ = ("_requested", "r", "size", "w")

    r: int
    w: int
    size: int

    def __init__(self, size: int | None = None) -> None:
        self._requested = _pipe_max_size() if size is None else size
        self.r = self.w = -1
        self.size = 0
        self._open()

    def _open(self) -> None:
        r, w = os.pipe2(os.O_CLOEXEC)
        want = self._requested
        while True:
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
                break
            except OSError:
                if want <= 65536:
                    break
                want //= 2
        self.r, self.w = r, w
        self.size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)

    def reset(self) -> None:
        """Replace the fds with a fresh empty pipe (after a failed splice left data in it)."""
        self.close()
        self._open()

    @property
    def closed(self) -> bool:
        return self.r < 0

    def close(self) -> None:
        r, w = self.r, self.w
        self.r = self.w = -1
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> Pipe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Pipe r={self.r} w={self.w} size={self.size}>"


def splice_recv(sock_fd: int, file_fd: int, offset: int, count: int, pipe: Pipe) -> int:
    """Move exactly ``count`` bytes from ``sock_fd`` into ``file_fd`` at ``offset`` via ``pipe``.

    socket -> pipe -> file with ``splice(2)``, no user-space copy (so nothing to hash:
    verify by re-reading the file if needed).  Returns ``count``; a peer closing early
    raises ``ConnectionResetError``.  On any error the pipe may hold stray data, so it is
    reset (new fds) before the exception propagates.
    """
    _check_range(offset, count)
    if pipe.closed:
        raise ValueError("pipe is closed")
    result = lib.etfs_splice_recv(sock_fd, file_fd, offset, count, pipe.r, pipe.w)
    if result < 0:
        err = ffi.errno
        pipe.reset()
        raise OSError(err, os.strerror(err))
    return int(result)


def openat2(
    dirfd: int,
    path: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    flags: int,
    mode: int = 0,
    resolve: int = 0,
) -> int:
    """``openat2(2)``: open ``path`` relative to ``dirfd`` with ``RESOLVE_*`` restrictions.

    Like ``os.open``, ``O_CLOEXEC`` is always added (PEP 446).  ``mode`` must be 0 unless
    ``flags`` has ``O_CREAT`` or ``O_TMPFILE`` (the kernel rejects it otherwise).  With
    ``RESOLVE_BENEATH``, ``..`` escaping ``dirfd``, absolute paths and symlinks leading
    outside fail with ``EXDEV``; ``RESOLVE_NO_SYMLINKS`` / ``RESOLVE_NO_MAGICLINKS`` give
    ``ELOOP``.  Returns the new fd.
    """
    bpath = os.fsencode(path)
    if b"\0" in bpath:
        raise ValueError("embedded null byte in path")
    return _check(lib.etfs_openat2(dirfd, bpath, flags | os.O_CLOEXEC, mode, resolve))


RENAME_NOREPLACE: int = int(lib.RENAME_NOREPLACE)
RENAME_EXCHANGE: int = int(lib.RENAME_EXCHANGE)


def renameat2(olddirfd: int, oldpath: str, newdirfd: int, newpath: str, flags: int = 0) -> None:
    """``renameat2(2)``: rename with ``RENAME_NOREPLACE`` (fail with EEXIST) or ``RENAME_EXCHANGE``."""
    _check(lib.etfs_renameat2(olddirfd, os.fsencode(oldpath), newdirfd, os.fsencode(newpath), flags))


SYNC_FILE_RANGE_WRITE: int = int(lib.SYNC_FILE_RANGE_WRITE)


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int = SYNC_FILE_RANGE_WRITE) -> None:
    """``sync_file_range(2)``; with the default flag: start writeback of a range, do not wait."""
    _check_range(offset, nbytes)
    _check(lib.etfs_sync_file_range(fd, offset, nbytes, flags))


def set_fs_identity(uid: int, gid: int, groups: tuple[int, ...]) -> None:
    """Set the calling thread's filesystem uid, gid and supplementary groups (not the process's).

    Needs CAP_SETUID/CAP_SETGID; fails with EPERM when the kernel did not take a value.
    """
    arr = ffi.new("unsigned int[]", list(groups) or [0])
    _check(lib.etfs_set_fs_identity(uid, gid, len(groups), arr))
