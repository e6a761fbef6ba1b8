"""cffi build script for ``etfs.copyrange._fusecfr`` (out-of-line API mode).

The compiled module defines its own ``fuse_session_new``. Loaded with RTLD_GLOBAL before
pyfuse3, it is found first by the dynamic linker when pyfuse3 binds that symbol, so it can
add a ``copy_file_range`` op to the ops table pyfuse3 hands to libfuse (pyfuse3 has none).
See ``etfs/copyrange/__init__.py`` for the why and the Python side.

Run ``python etfs/copyrange/build.py`` to compile in place (next to this file).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from cffi import FFI

MODULE_NAME = "etfs.copyrange._fusecfr"

# What Python can see. fuse_req_t stays opaque: Python only passes it back to libfuse.
CDEF = r"""
typedef struct fuse_req *fuse_req_t;

/* Replies, exported straight from libfuse (each frees the request: call exactly once). */
int fuse_reply_write(fuse_req_t req, size_t count);
int fuse_reply_err(fuse_req_t req, int err);
int fuse_req_interrupted(fuse_req_t req);

/* Interposer status: see the ETFS_CFR_* values below. */
#define ETFS_CFR_NOT_CALLED 0
#define ETFS_CFR_INSTALLED 1
#define ETFS_CFR_OPS_TOO_LARGE -1
#define ETFS_CFR_NO_REAL_SYMBOL -2
int etfs_cfr_status(void);
size_t etfs_cfr_op_size_seen(void);
size_t etfs_cfr_op_size_compiled(void);

/* Register our interrupt func for req; returns 1 if req was already interrupted
   (the Python side then runs its callback itself, outside libfuse's locks). */
int etfs_cfr_watch_interrupt(fuse_req_t req, uint64_t req_id);

extern "Python" void _etfs_cfr_on_copy(fuse_req_t req, uint64_t ino_in, int64_t off_in, uint64_t fh_in,
                                       uint64_t ino_out, int64_t off_out, uint64_t fh_out,
                                       size_t len, int flags);
extern "Python" void _etfs_cfr_on_interrupt(uint64_t req_id);
"""

C_SOURCE = r"""
#define FUSE_USE_VERSION 35
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* dlvsym, RTLD_NEXT (Python.h usually defines it already) */
#endif
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <fuse_lowlevel.h>

#define ETFS_CFR_NOT_CALLED 0
#define ETFS_CFR_INSTALLED 1
#define ETFS_CFR_OPS_TOO_LARGE -1
#define ETFS_CFR_NO_REAL_SYMBOL -2

#define ETFS_EXPORT __attribute__((visibility("default")))

/* cffi emits these later in this file; declared here so the C code can call them. */
static void _etfs_cfr_on_copy(fuse_req_t req, uint64_t ino_in, int64_t off_in, uint64_t fh_in,
                              uint64_t ino_out, int64_t off_out, uint64_t fh_out,
                              size_t len, int flags);
static void _etfs_cfr_on_interrupt(uint64_t req_id);

static int etfs_cfr_state = ETFS_CFR_NOT_CALLED;
static size_t etfs_cfr_seen_op_size = 0;
/* libfuse keeps a copy of the ops table, but keep ours alive for the whole process anyway. */
static struct fuse_lowlevel_ops etfs_cfr_ops;

static void etfs_cfr_copy_file_range(fuse_req_t req, fuse_ino_t ino_in, off_t off_in,
                                     struct fuse_file_info *fi_in, fuse_ino_t ino_out,
                                     off_t off_out, struct fuse_file_info *fi_out,
                                     size_t len, int flags)
{
    /* extern "Python" takes the GIL itself (pyfuse3 runs libfuse with it released). */
    _etfs_cfr_on_copy(req, (uint64_t)ino_in, (int64_t)off_in, (uint64_t)fi_in->fh,
                      (uint64_t)ino_out, (int64_t)off_out, (uint64_t)fi_out->fh, len, flags);
}

/* The kernel asks for security.* and system.* attributes on nearly every ls -l entry
   (security.selinux, system.posix_acl_access) and write (security.capability). etfs only
   has user.* attributes, so answer the others "no such attribute" right here instead of
   a round trip through Python (~26 us each); user.* still goes to pyfuse3. */
static void (*etfs_cfr_python_getxattr)(fuse_req_t, fuse_ino_t, const char *, size_t) = NULL;

static void etfs_cfr_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (strncmp(name, "user.", 5) != 0 || etfs_cfr_python_getxattr == NULL) {
        fuse_reply_err(req, ENODATA);
        return;
    }
    etfs_cfr_python_getxattr(req, ino, name, size);
}

typedef struct fuse_session *(*etfs_cfr_session_new_t)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                                        size_t, void *);

/* The interposer: same name and signature as libfuse's (FUSE_3.0 version, what pyfuse3 references). */
ETFS_EXPORT struct fuse_session *fuse_session_new(struct fuse_args *args,
                                                  const struct fuse_lowlevel_ops *op,
                                                  size_t op_size, void *userdata)
{
    etfs_cfr_session_new_t real =
        (etfs_cfr_session_new_t)dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
    if (real == NULL) {
        /* Cannot happen with a libfuse3 in the process; try the default version before giving up. */
        real = (etfs_cfr_session_new_t)dlsym(RTLD_NEXT, "fuse_session_new");
        etfs_cfr_state = ETFS_CFR_NO_REAL_SYMBOL;
        fprintf(stderr, "etfs.copyrange: dlvsym(fuse_session_new, FUSE_3.0) failed: %s\n", dlerror());
        if (real == NULL)
            return NULL;
        return real(args, op, op_size, userdata);
    }
    etfs_cfr_seen_op_size = op_size;
    if (op_size > sizeof(struct fuse_lowlevel_ops)) {
        /* The caller knows ops we do not: copying a prefix would drop them. Leave it alone. */
        etfs_cfr_state = ETFS_CFR_OPS_TOO_LARGE;
        fprintf(stderr,
                "etfs.copyrange: fuse_session_new op_size %zu > %zu compiled in; "
                "copy_file_range NOT installed\n", op_size, sizeof(struct fuse_lowlevel_ops));
        return real(args, op, op_size, userdata);
    }
    memset(&etfs_cfr_ops, 0, sizeof(etfs_cfr_ops));
    memcpy(&etfs_cfr_ops, op, op_size);
    etfs_cfr_ops.copy_file_range = etfs_cfr_copy_file_range;
    etfs_cfr_python_getxattr = etfs_cfr_ops.getxattr;
    if (etfs_cfr_python_getxattr != NULL)
        etfs_cfr_ops.getxattr = etfs_cfr_getxattr;
    etfs_cfr_state = ETFS_CFR_INSTALLED;
    /* Pass our full size: the op may lie beyond a (smaller) caller's struct. */
    return real(args, &etfs_cfr_ops, sizeof(etfs_cfr_ops), userdata);
}

int etfs_cfr_status(void) { return etfs_cfr_state; }
size_t etfs_cfr_op_size_seen(void) { return etfs_cfr_seen_op_size; }
size_t etfs_cfr_op_size_compiled(void) { return sizeof(struct fuse_lowlevel_ops); }

/* libfuse calls the interrupt func with req->lock held; when it does so from inside
   fuse_req_interrupt_func() (interrupt came first), a reply from the callback would free req
   under that lock. So during registration only note the fact and let Python act afterwards. */
static __thread int etfs_cfr_registering = 0;
static __thread int etfs_cfr_fired_while_registering = 0;

static void etfs_cfr_interrupt_func(fuse_req_t req, void *data)
{
    (void)req;
    if (etfs_cfr_registering) {
        etfs_cfr_fired_while_registering = 1;
        return;
    }
    _etfs_cfr_on_interrupt((uint64_t)(uintptr_t)data);
}

int etfs_cfr_watch_interrupt(fuse_req_t req, uint64_t req_id)
{
    etfs_cfr_registering = 1;
    etfs_cfr_fired_while_registering = 0;
    fuse_req_interrupt_func(req, etfs_cfr_interrupt_func, (void *)(uintptr_t)req_id);
    etfs_cfr_registering = 0;
    return etfs_cfr_fired_while_registering;
}
"""


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
    if "dl" not in libraries:
        libraries.append("dl")
    return include_dirs, library_dirs, libraries


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_inc, _libdirs, _libs = _build_flags()
ffibuilder.set_source(
    MODULE_NAME,
    C_SOURCE,
    include_dirs=_inc,
    library_dirs=_libdirs,
    libraries=_libs,
)


if __name__ == "__main__":
    # Compile in a scratch dir (distutils would otherwise parse the repo's pyproject.toml and trip
    # over cffi_modules), then copy the extension next to this file.
    import glob
    import shutil
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="etfs-cfr-build-") as tmp:
        built = ffibuilder.compile(tmpdir=tmp, verbose="-v" in sys.argv)
        for old in glob.glob(os.path.join(here, "_fusecfr.*.so")):
            os.unlink(old)
        target = os.path.join(here, os.path.basename(built))
        shutil.copy2(built, target)
    print(target)
