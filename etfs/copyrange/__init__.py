"""Receive FUSE ``copy_file_range`` requests next to an unchanged pyfuse3.

Why: a plain ``cp`` between two top-level directories of our mount reaches the daemon as one
``copy_file_range`` request (see docs/architecture.md section 1), which is what lets us turn it into a
server-to-server transfer. pyfuse3 has no such op: libfuse answers ENOSYS and the kernel then
disables the op for the whole connection.

The trick (docs/architecture.md section 2): pyfuse3's compiled module calls
``fuse_session_new@FUSE_3.0`` from libfuse3. Our cffi module ``_fusecfr`` defines a
``fuse_session_new`` too. Imported with ``RTLD_GLOBAL`` *before* pyfuse3, it sits earlier in the
process's global symbol scope than libfuse3, so pyfuse3 binds to it. The wrapper copies the ops
table pyfuse3 passes, adds a C ``copy_file_range`` op, and calls the real function (found with
``dlvsym(RTLD_NEXT, ..., "FUSE_3.0")``). The C op calls back into Python (``extern "Python"``), in
pyfuse3's trio thread, with the GIL.

The same module also has a getxattr fast path (``enable_fast_xattr()``): in an interposed
``fuse_session_receive_buf``, getxattr requests for names outside ``user.*`` (``ls -l`` asks two
per entry) are answered on the spot, and the next request is read in the same call when it
follows within 0.1 ms. See "The getxattr fast path" in ``build.py``.

Usage, in a pyfuse3 trio daemon::

    from etfs import copyrange
    copyrange.install()            # before anything imports pyfuse3
    import pyfuse3

    def handle(req: copyrange.CopyRequest) -> None:   # must not block
        nursery.start_soon(do_copy, req)              # answer later, exactly once

    copyrange.set_handler(handle)
    pyfuse3.init(ops, mountpoint, options)
    copyrange.require_installed()  # raises CopyRangeError if the op did not get in

    async def do_copy(req):
        with trio.CancelScope() as scope:
            req.on_interrupt(scope.cancel)            # Ctrl-C on cp -> FUSE_INTERRUPT
            n = await ...                             # the actual copy
            req.reply_count(n)
        if scope.cancelled_caught:
            req.reply_error(errno.EINTR)

Reply semantics (what ``cp`` does): a count is success (a short count is fine, cp asks again
from the next offset); EOPNOTSUPP/EXDEV make the kernel do its own read/write copy through the
daemon; any other error makes cp fail. ENOSYS is never sent (it would disable the op for the
connection); it is mapped to EOPNOTSUPP.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import importlib
import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeAlias

__all__ = [
    "MAX_REPLY_COUNT",
    "CopyRangeError",
    "CopyRequest",
    "Handler",
    "Status",
    "enable_fast_xattr",
    "fast_xattr_stats",
    "install",
    "installed",
    "require_installed",
    "set_handler",
    "status",
]

log = logging.getLogger(__name__)

# libfuse 3.14 answers the 64-bit opcode (53) with ENOSYS itself, so the kernel uses opcode 47 whose
# reply (fuse_write_out.size) is a u32; the kernel caps such requests at this length.
MAX_REPLY_COUNT = 0xFFFFF000


class CopyRangeError(RuntimeError):
    """The copy_file_range op cannot be (or was not) installed, or a request was misused."""


class Status(enum.Enum):
    """Where the interposer stands; only INSTALLED means copy requests will reach us."""

    NOT_LOADED = "install() has not been called"
    NOT_CALLED = "fuse_session_new did not go through the interposer (pyfuse3.init() not yet called?)"
    INSTALLED = "copy_file_range op installed"
    OPS_TOO_LARGE = "caller's fuse_lowlevel_ops is larger than the one compiled in; op not installed"
    NO_REAL_SYMBOL = "fuse_session_new@FUSE_3.0 not found in libfuse3; op not installed"


# Values of the C-side state (see build.py).
_C_STATUS = {
    0: Status.NOT_CALLED,
    1: Status.INSTALLED,
    -1: Status.OPS_TOO_LARGE,
    -2: Status.NO_REAL_SYMBOL,
}

_install_lock = threading.Lock()
_ffi: Any = None
_lib: Any = None
_handler: Handler | None = None
# Requests not yet answered, by id: the interrupt func gets an id, never a pointer that may be freed.
_pending: dict[int, CopyRequest] = {}
_ids = itertools.count(1)


def install() -> None:
    """Load the interposer into the global symbol scope. Call before ``import pyfuse3``.

    Idempotent. Raises CopyRangeError if pyfuse3 is already imported (its symbol is bound by then:
    Python loads extensions with RTLD_NOW), if the compiled module is missing, or if another
    ``fuse_session_new`` already precedes ours in the global scope.
    """
    global _ffi, _lib
    with _install_lock:
        if _lib is not None:
            return
        if "pyfuse3" in sys.modules:
            raise CopyRangeError(
                "etfs.copyrange.install() must run before pyfuse3 is imported: pyfuse3 has already "
                "bound fuse_session_new, copy_file_range cannot be added"
            )
        old_flags = sys.getdlopenflags()
        # RTLD_GLOBAL puts our fuse_session_new (and libfuse3, our dependency, after it) into the
        # global scope, which the dynamic linker searches before pyfuse3's own dependencies.
        sys.setdlopenflags(os.RTLD_NOW | os.RTLD_GLOBAL)
        try:
            mod = importlib.import_module(__name__ + "._fusecfr")
        except ImportError as exc:
            raise CopyRangeError(
                "compiled module etfs.copyrange._fusecfr is missing: run `pip install -e .` "
                "or `python etfs/copyrange/build.py`"
            ) from exc
        finally:
            sys.setdlopenflags(old_flags)

        ffi, lib = mod.ffi, mod.lib
        # Register the callbacks before any request can arrive: an unregistered extern "Python"
        # would only print a warning and leave the request unanswered (cp hangs).
        ffi.def_extern(name="_etfs_cfr_on_copy", onerror=_on_callback_error)(_on_copy)
        ffi.def_extern(name="_etfs_cfr_on_interrupt", onerror=_on_callback_error)(_on_interrupt)

        ours = ctypes.CDLL(mod.__file__).fuse_session_new
        first = ctypes.CDLL(None).fuse_session_new  # dlopen(NULL): the global scope, in order
        if ctypes.cast(ours, ctypes.c_void_p).value != ctypes.cast(first, ctypes.c_void_p).value:
            raise CopyRangeError(
                "another fuse_session_new precedes etfs.copyrange's in the global symbol scope "
                "(libfuse3 loaded globally earlier?); copy_file_range would not be installed"
            )
        _ffi, _lib = ffi, lib
        log.debug(
            "copyrange interposer loaded from %s (fuse_lowlevel_ops: %d bytes)",
            mod.__file__,
            lib.etfs_cfr_op_size_compiled(),
        )


def status() -> Status:
    """Interposer status; meaningful for the op after ``pyfuse3.init()``."""
    if _lib is None:
        return Status.NOT_LOADED
    return _C_STATUS.get(int(_lib.etfs_cfr_status()), Status.NOT_CALLED)


def installed() -> bool:
    """True once ``pyfuse3.init()`` went through the interposer and the op is in the session."""
    return status() is Status.INSTALLED


def require_installed() -> None:
    """Raise CopyRangeError (with the reason) unless the op is installed. Call after pyfuse3.init()."""
    st = status()
    if st is not Status.INSTALLED:
        detail = ""
        if _lib is not None:
            detail = (
                f" (op_size seen {int(_lib.etfs_cfr_op_size_seen())}, "
                f"compiled {int(_lib.etfs_cfr_op_size_compiled())})"
            )
        raise CopyRangeError(f"copy_file_range not installed: {st.value}{detail}")


def enable_fast_xattr(on: bool = True) -> None:
    """Turn the getxattr fast path on or off. Call after install(), before pyfuse3.init().

    getxattr of names outside ``user.*`` (``ls -l`` asks ``security.selinux`` and
    ``system.posix_acl_access`` for every entry; the kernel caches neither) is answered
    ENODATA in C as soon as it is read, and a request that follows within 0.1 ms is read in
    the same call, without a trip through pyfuse3's trio loop. It works only together with
    the copy_file_range op (the same interposer); other requests are not touched.
    """
    if _lib is None:
        raise CopyRangeError("etfs.copyrange.install() must run before enable_fast_xattr()")
    _lib.etfs_fast_enable(1 if on else 0)


def fast_xattr_stats() -> tuple[int, int]:
    """(getxattr requests answered by the fast path, requests read right after one of them)."""
    if _lib is None:
        return 0, 0
    return int(_lib.etfs_fast_answered()), int(_lib.etfs_fast_chained())


def statfs_inode() -> int:
    """The inode of the statfs request being handled, or 0 (not known: shim not loaded).

    pyfuse3's statfs handler gets no inode; read this as the handler's first statement (the C
    side records it just before pyfuse3 starts the handler, with nothing in between).
    """
    if _lib is None:
        return 0
    return int(_lib.etfs_statfs_ino())


def set_handler(handler: Handler | None) -> None:
    """Set the callable run for each request (None: answer EOPNOTSUPP, the kernel copies itself).

    It runs synchronously in pyfuse3's trio thread, inside pyfuse3's request loop, with the GIL.
    It must not block: start a task and return; that task answers through the CopyRequest.
    """
    global _handler
    _handler = handler


class CopyRequest:
    """One FUSE copy_file_range request; answer it exactly once with reply_count or reply_error.

    ``fh_in``/``fh_out`` are the handles returned by your pyfuse3 ``open``/``create``.
    """

    __slots__ = (
        "_interrupt_cb",
        "_interrupted",
        "_lock",
        "_replied",
        "_req",
        "_watching",
        "fh_in",
        "fh_out",
        "flags",
        "id",
        "ino_in",
        "ino_out",
        "length",
        "off_in",
        "off_out",
    )

    def __init__(
        self,
        req: Any,
        *,
        ino_in: int,
        fh_in: int,
        off_in: int,
        ino_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
    ) -> None:
        self._req = req  # fuse_req_t; freed by libfuse on reply, never touched afterwards
        self.id = next(_ids)
        self.ino_in = ino_in
        self.fh_in = fh_in
        self.off_in = off_in
        self.ino_out = ino_out
        self.fh_out = fh_out
        self.off_out = off_out
        self.length = length
        self.flags = flags
        # A lock because a reply may come from a worker thread while the trio thread handles
        # an interrupt; libfuse replies are thread-safe, our bookkeeping must be too.
        self._lock = threading.Lock()
        self._replied = False
        self._interrupted = False
        self._watching = False
        self._interrupt_cb: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return (
            f"CopyRequest(id={self.id}, ino_in={self.ino_in}, fh_in={self.fh_in}, off_in={self.off_in}, "
            f"ino_out={self.ino_out}, fh_out={self.fh_out}, off_out={self.off_out}, "
            f"length={self.length}, flags={self.flags}, replied={self._replied})"
        )

    @property
    def replied(self) -> bool:
        return self._replied

    @property
    def interrupted(self) -> bool:
        return self._interrupted

    def reply_count(self, n: int) -> None:
        """Answer with the number of bytes copied (0 <= n <= min(length, MAX_REPLY_COUNT)).

        An out-of-range count is answered with EIO (so cp never hangs) and raises ValueError.
        """
        limit = min(self.length, MAX_REPLY_COUNT)
        if not 0 <= n <= limit:
            self._reply(errno.EIO, None)
            raise ValueError(f"copy count {n} out of range 0..{limit} for {self!r}; answered EIO")
        self._reply(None, n)

    def reply_error(self, err: int) -> None:
        """Answer with a positive errno. ENOSYS becomes EOPNOTSUPP (ENOSYS disables the op)."""
        if err == errno.ENOSYS:
            log.warning("copy_file_range: ENOSYS would disable the op for the mount; answering EOPNOTSUPP")
            err = errno.EOPNOTSUPP
        if err <= 0:
            # 0 would be an empty success reply the kernel rejects; negative is a caller mix-up.
            self._reply(errno.EIO, None)
            raise ValueError(f"reply_error needs a positive errno, got {err}; answered EIO")
        self._reply(err, None)

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the kernel interrupts this request (e.g. Ctrl-C on cp).

        Runs in pyfuse3's trio thread; typically ``cancel_scope.cancel``. If the interrupt already
        arrived, the callback runs now, before this returns. No-op once the request is answered.
        """
        with self._lock:
            if self._replied:
                return
            self._interrupt_cb = callback
            already = self._interrupted
            register = not self._watching
            self._watching = True
            if register:
                # Under our lock so a concurrent reply cannot free req meanwhile. (pyfuse3 runs
                # libfuse in one thread, so libfuse's own req lock cannot be held against us here.)
                # Returns 1 if libfuse had seen the interrupt already (possibly before the request
                # reached us); the C side then deliberately did not call into Python.
                already = bool(_lib.etfs_cfr_watch_interrupt(self._req, self.id)) or already
        if already:
            self._fire_interrupt(force=True)

    # -- internals -------------------------------------------------------------------------

    def _reply(self, err: int | None, count: int | None) -> None:
        with self._lock:
            if self._replied:
                log.error("copy_file_range request %d answered twice; second reply dropped", self.id)
                raise CopyRangeError(f"request {self.id} already answered")
            self._replied = True
            req, self._req = self._req, None
            self._interrupt_cb = None
            _pending.pop(self.id, None)
            if err is None:
                assert count is not None
                rc = _lib.fuse_reply_write(req, count)
            else:
                rc = _lib.fuse_reply_err(req, err)
        if rc != 0:
            # Typically -ENOENT: the kernel side is gone (request aborted, fs unmounted).
            log.warning("copy_file_range request %d: libfuse reply failed: %d", self.id, rc)

    def _fire_interrupt(self, force: bool = False) -> None:
        with self._lock:
            if self._replied or (self._interrupted and not force):
                return
            self._interrupted = True
            cb = self._interrupt_cb
        if cb is not None:
            try:
                cb()
            except Exception:
                log.exception("copy_file_range request %d: interrupt callback failed", self.id)


# What set_handler() takes.
Handler: TypeAlias = Callable[[CopyRequest], None]


def _on_copy(
    req: Any,
    ino_in: int,
    off_in: int,
    fh_in: int,
    ino_out: int,
    off_out: int,
    fh_out: int,
    length: int,
    flags: int,
) -> None:
    """C op -> Python. Every path answers the request or hands it to the handler."""
    r = CopyRequest(
        req,
        ino_in=int(ino_in),
        fh_in=int(fh_in),
        off_in=int(off_in),
        ino_out=int(ino_out),
        fh_out=int(fh_out),
        off_out=int(off_out),
        length=int(length),
        flags=int(flags),
    )
    handler = _handler
    if handler is None:
        # Kernel falls back to its own read/write copy through the daemon; op stays enabled.
        r.reply_error(errno.EOPNOTSUPP)
        return
    _pending[r.id] = r
    try:
        handler(r)
    except BaseException:  # nothing can propagate through C: never leave cp waiting
        log.exception("copy_file_range handler failed for %r", r)
        if not r.replied:
            r.reply_error(errno.EIO)


def _on_interrupt(req_id: int) -> None:
    """libfuse interrupt func -> Python (called while libfuse processes FUSE_INTERRUPT)."""
    r = _pending.get(int(req_id))
    if r is not None:
        r._fire_interrupt()


def _on_callback_error(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    log.error("exception escaped a copyrange C callback", exc_info=(exc_type, exc, tb))
