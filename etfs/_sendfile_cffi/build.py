"""cffi out-of-line API builder for ``etfs._sendfile_cffi._native``.

The zero-copy / low-overhead data-path syscalls Python lacks (or wraps with
one Python-level round trip per partial transfer): ``sendfile`` and
``pread``+``send`` loops for the sender, ``recv``+``pwrite`` and
socket->pipe->file ``splice`` loops for the receiver, and ``openat2`` with
``RESOLVE_*`` flags for confined path resolution.

Every loop runs to completion in C (EINTR and partial transfers handled
there), so one call moves one whole block with the GIL released (cffi drops
the GIL around every call into ``lib``).  They are meant for worker threads
and **blocking** sockets whose SO_RCVTIMEO/SO_SNDTIMEO bound every wait: on a
blocking socket EAGAIN means that timeout expired, and the call fails with
ETIMEDOUT (Python: ``TimeoutError``) instead of retrying, so a silent peer
cannot hang a transfer.  A non-blocking socket is tolerated: EAGAIN waits in
``poll`` for at most the socket's timeout for that direction (30 s if none is
set) and then fails with ETIMEDOUT as well.  For ``splice`` only the socket
side can time out; the pipe is ours and always drained.

The C is in ``native.c`` (prototypes in ``native.h``), compiled with ``-Wall -Wextra
-Werror``.  Registered in setup.py's ``cffi_modules`` as ``etfs/_sendfile_cffi/build.py:ffibuilder``.
To build in place for development::

    python etfs/_sendfile_cffi/build.py      # from anywhere; .so lands next to this file
"""

from __future__ import annotations

import os

from cffi import FFI

MODULE_NAME = "etfs._sendfile_cffi._native"

HERE = os.path.dirname(os.path.abspath(__file__))

# The prototypes are native.h, read as they are; these constants come from the system headers
# (cffi fills in their values when it compiles).
CDEF_CONSTANTS = """
#define RESOLVE_NO_XDEV ...
#define RESOLVE_NO_MAGICLINKS ...
#define RESOLVE_NO_SYMLINKS ...
#define RESOLVE_BENEATH ...
#define RESOLVE_IN_ROOT ...
#define RESOLVE_CACHED ...
#define RENAME_NOREPLACE ...
#define RENAME_EXCHANGE ...
#define SYNC_FILE_RANGE_WRITE ...
"""

with open(os.path.join(HERE, "native.h")) as _header:
    CDEF = _header.read() + CDEF_CONSTANTS

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
# One translation unit: cffi's glue plus native.c, which stays a real C file for the compiler
# (warnings are errors), clang-format and C linters.
ffibuilder.set_source(
    MODULE_NAME,
    '#include "native.c"',
    include_dirs=[HERE],
    extra_compile_args=["-Wall", "-Wextra", "-Werror"],
)


def build_in_place(verbose: bool = True) -> str:
    """Compile the extension and put the ``.so`` next to this file; return its path.

    ``compile(tmpdir=X)`` maps the dotted module name to ``X/etfs/_sendfile_cffi/_native.c``
    and builds the ``.so`` beside it, but it also runs distutils from ``X``, which parses
    ``X/pyproject.toml``: building from the repo root therefore fails while that file has
    keys setuptools rejects.  Build in a scratch directory and copy the result in instead.
    """
    import shutil
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="etfs-cffi-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose=verbose)
        dest = os.path.join(here, os.path.basename(built))
        tmp_dest = dest + ".tmp"
        shutil.copyfile(built, tmp_dest)
        os.chmod(tmp_dest, 0o755)
        os.replace(tmp_dest, dest)  # atomic: a running process keeps its mapped copy
    return dest


if __name__ == "__main__":
    print(build_in_place())
