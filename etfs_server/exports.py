"""Confinement: every path a client names resolves beneath its export, also under races.

Paths on the wire are export-relative (``/tmp/x``).  They are normalised first
(``..`` is refused outright), then every open goes through ``openat2`` with
``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` from a directory fd of the export root,
so a symlink pointing out, an absolute symlink or a directory swapped for a symlink
between two operations cannot lead outside: the kernel refuses (EXDEV/ELOOP) and we
answer EACCES.  Operations on the last component use the parent's fd plus a name
and never follow it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from etfs import _sendfile_cffi as native

RESOLVE = native.RESOLVE_BENEATH | native.RESOLVE_NO_MAGICLINKS
# openat2 takes at most PATH_MAX (4096) bytes with the NUL, and /proc/self/fd names no path
# longer than a page: deeper paths are resolved in chunks of whole components, each chunk
# beneath the directory the previous one reached.  Chunks after the first follow no symlinks,
# so the real path of a deep directory is the first chunk's real path plus the rest as named.
PATH_CHUNK = 2048


def chunks(rel: str) -> list[str]:
    """``rel`` (no leading slash) cut at component boundaries into pieces of <= PATH_CHUNK bytes."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for part in rel.split("/"):
        n = len(part.encode()) + 1
        if cur and size + n > PATH_CHUNK:
            out.append("/".join(cur))
            cur, size = [], 0
        cur.append(part)
        size += n
    out.append("/".join(cur))
    return out


class EscapeError(PermissionError):
    def __init__(self, path: str, why: str = "escapes the export") -> None:
        super().__init__(errno.EACCES, f"path {path!r} {why}")


def normalize(path: str) -> str:
    """Canonical export-relative form: ``/a/b`` (``/`` for the root).  Refuses ``..`` and NULs."""
    if not isinstance(path, str) or "\0" in path:
        raise EscapeError(repr(path), "is not a valid path")
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise EscapeError(path)
        parts.append(part)
    return "/" + "/".join(parts)


def split(path: str) -> tuple[str, str]:
    """(parent, name) of a normalised path; the root has no name."""
    parent, _, name = path.rpartition("/")
    return parent or "/", name


@dataclass(frozen=True)
class Located:
    """A client path resolved once (see `ExportRoot.locate`)."""

    dir_fd: int  # O_PATH fd of the parent directory (the export root's own fd for "/")
    name: str  # the last component; "" for the export root
    path: str  # where the object really is: the real path of ``dir_fd`` plus ``name``
    asked: str  # the normalised path the client named (differs when a parent is a symlink)

    @property
    def at(self) -> tuple[int, str]:
        """(dir_fd, name) for the ``*at`` syscalls; the root is ``(root_fd, ".")``."""
        return self.dir_fd, self.name or "."


class ExportRoot:
    """An open export directory and safe operations relative to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.fd)

    def open(self, path: str, flags: int, mode: int = 0o666) -> int:
        """openat2 beneath the export; ``path`` must be normalised."""
        rel = path.lstrip("/") or "."
        if len(rel.encode()) < PATH_CHUNK:
            return self._openat(self.fd, rel, flags, mode, path)
        parent, _, name = rel.rpartition("/")
        dir_fd, _real = self._open_dir(parent, path)
        try:
            return self._openat(dir_fd, name, flags, mode, path, native.RESOLVE_NO_SYMLINKS)
        finally:
            os.close(dir_fd)

    def _open_dir(self, rel: str, shown: str) -> tuple[int, str]:
        """O_PATH fd of the directory ``rel`` beneath the export, and its real export path."""
        if not rel:
            return os.dup(self.fd), "/"
        pieces = chunks(rel)
        fd = self._openat(self.fd, pieces[0], os.O_PATH | os.O_DIRECTORY, 0, shown)
        try:
            real = self.real_path(fd)
            for piece in pieces[1:]:
                nfd = self._openat(
                    fd, piece, os.O_PATH | os.O_DIRECTORY, 0, shown, native.RESOLVE_NO_SYMLINKS
                )
                os.close(fd)
                fd = nfd
                real = real.rstrip("/") + "/" + piece
        except BaseException:
            os.close(fd)
            raise
        return fd, real

    def open_at(self, loc: Located, flags: int, mode: int = 0o666) -> int:
        """Open the object ``loc`` names, never following its last component.

        ``loc.dir_fd`` was resolved (and its ACL checked) once; the name is one component,
        so nothing is resolved again between the check and this open.
        """
        return self._openat(loc.dir_fd, loc.name or ".", flags | os.O_NOFOLLOW, mode, loc.path)

    def _openat(self, dir_fd: int, rel: str, flags: int, mode: int, shown: str, resolve: int = 0) -> int:
        if not flags & os.O_CREAT:
            mode = 0  # openat2 refuses a mode without O_CREAT
        # Data opens are non-blocking at first: opening a FIFO (or a device) would otherwise
        # wait for a partner forever and hold the server's loop or a worker thread.
        probe = not flags & os.O_PATH and not flags & os.O_NONBLOCK
        try:
            fd = native.openat2(
                dir_fd, rel, flags | os.O_CLOEXEC | (os.O_NONBLOCK if probe else 0), mode, RESOLVE | resolve
            )
        except OSError as exc:
            # EXDEV: resolution would leave the export (also when only the final component is
            # followed-free: an intermediate symlink pointing out).  ELOOP: a magic link, a loop,
            # or (with O_NOFOLLOW) a symlink as the last component, which we never follow.
            if exc.errno in (errno.EXDEV, errno.ELOOP):
                raise EscapeError(shown, "leads outside the export (or through a symlink)") from None
            if exc.errno == errno.ENXIO:  # a FIFO without a reader, a socket
                raise OSError(errno.EINVAL, f"{shown}: not a regular file or directory") from None
            raise
        if probe:
            try:
                kind = stat.S_IFMT(os.fstat(fd).st_mode)
                if kind not in (stat.S_IFREG, stat.S_IFDIR):
                    raise OSError(errno.EINVAL, f"{shown}: not a regular file or directory")
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
        return fd

    @contextmanager
    def locate(self, path: str) -> Iterator[Located]:
        """Resolve ``path`` once: its parent directory held open, and where that really is.

        The ACL must be checked on `Located.path` and the operation done through
        `Located.dir_fd` + `Located.name`: a directory swapped for a symlink between the
        check and the operation then cannot redirect it (the fd keeps pointing at the
        directory that was checked).
        """
        asked = normalize(path)
        parent, name = split(asked)
        if not name:
            yield Located(self.fd, "", "/", asked)
            return
        fd, real = self._open_dir(parent.lstrip("/"), asked)
        try:
            yield Located(fd, name, (real.rstrip("/") + "/" + name) if real != "/" else "/" + name, asked)
        finally:
            os.close(fd)

    def real_path(self, fd: int) -> str:
        """The export-relative path an open fd really refers to (after following symlinks)."""
        target = os.readlink(f"/proc/self/fd/{fd}")
        root = str(self.path)
        if target == root:
            return "/"
        if not target.startswith(root.rstrip("/") + "/"):
            raise EscapeError(target, "resolves outside the export")
        return "/" + target[len(root.rstrip("/")) + 1 :]
