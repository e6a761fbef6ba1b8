"""cffi build script for ``etfs.copyrange._fusecfr`` (out-of-line API mode).

The compiled module defines its own ``fuse_session_new``. Loaded with RTLD_GLOBAL before
pyfuse3, it is found first by the dynamic linker when pyfuse3 binds that symbol, so it can
add a ``copy_file_range`` op to the ops table pyfuse3 hands to libfuse (pyfuse3 has none).
It also interposes ``fuse_session_receive_buf`` for the getxattr fast path (see fusecfr.c).
See ``etfs/copyrange/__init__.py`` for the why and the Python side.

The C is in ``fusecfr.c`` (the prototypes Python calls in ``fusecfr.h``), compiled with ``-Wall
-Wextra -Werror``.  Registered in setup.py's ``cffi_modules``.  Run ``python
etfs/copyrange/build.py`` to compile in place (next to this file).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from cffi import FFI

MODULE_NAME = "etfs.copyrange._fusecfr"

HERE = os.path.dirname(os.path.abspath(__file__))

# What Python can see: fusecfr.h's prototypes, read as they are, around the parts only cffi
# understands.  fuse_req_t stays opaque: Python only passes it back to libfuse.
CDEF_HEAD = """
typedef struct fuse_req *fuse_req_t;

/* Replies, exported straight from libfuse (each frees the request: call exactly once). */
int fuse_reply_write(fuse_req_t req, size_t count);
int fuse_reply_err(fuse_req_t req, int err);
int fuse_req_interrupted(fuse_req_t req);
"""
# Values from fusecfr.c (cffi fills them in when it compiles).
CDEF_CONSTANTS = """
#define ETFS_CFR_NOT_CALLED ...
#define ETFS_CFR_INSTALLED ...
#define ETFS_CFR_OPS_TOO_LARGE ...
#define ETFS_CFR_NO_REAL_SYMBOL ...
"""
# The Python callbacks fusecfr.c calls (it declares them itself: cffi emits them after it).
CDEF_CALLBACKS = """
extern "Python" void _etfs_cfr_on_copy(fuse_req_t req, uint64_t ino_in, int64_t off_in, uint64_t fh_in,
                                       uint64_t ino_out, int64_t off_out, uint64_t fh_out,
                                       size_t len, int flags);
extern "Python" void _etfs_cfr_on_interrupt(uint64_t req_id);
"""

with open(os.path.join(HERE, "fusecfr.h")) as _header:
    CDEF = CDEF_HEAD + _header.read() + CDEF_CONSTANTS + CDEF_CALLBACKS


def _pkg_config(*args: str) -> list[str] | None:
    try:
        out = subprocess.run(
            ["pkg-config", *args, "fuse3"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return shlex.split(out)


def _build_flags() -> tuple[list[str], list[str], list[str]]:
    """(include_dirs, library_dirs, libraries) for fuse3, plus dl for dlvsym."""
    cflags = _pkg_config("--cflags")
    libs = _pkg_config("--libs")
    include_dirs = [f[2:] for f in cflags or [] if f.startswith("-I")] or ["/usr/include/fuse3"]
    library_dirs = [f[2:] for f in libs or [] if f.startswith("-L")]
    libraries = [f[2:] for f in libs or [] if f.startswith("-l")] or ["fuse3"]
    for extra in ("dl",):
        if extra not in libraries:
            libraries.append(extra)
    return include_dirs, library_dirs, libraries


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_inc, _libdirs, _libs = _build_flags()
# One translation unit: cffi's glue plus fusecfr.c, which stays a real C file for the compiler
# (warnings are errors), clang-format and C linters.
ffibuilder.set_source(
    MODULE_NAME,
    '#include "fusecfr.c"',
    include_dirs=[HERE, *_inc],
    library_dirs=_libdirs,
    libraries=_libs,
    extra_compile_args=["-Wall", "-Wextra", "-Werror"],
)


if __name__ == "__main__":
    # Compile in a scratch dir (distutils would otherwise parse the repo's pyproject.toml and trip
    # over cffi_modules), then copy the extension next to this file.
    import glob
    import shutil
    import tempfile

    here = HERE
    with tempfile.TemporaryDirectory(prefix="etfs-cfr-build-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose="-v" in sys.argv)
        for old in glob.glob(os.path.join(here, "_fusecfr.*.so")):
            os.unlink(old)
        target = os.path.join(here, os.path.basename(built))
        shutil.copy2(built, target)
    print(target)
