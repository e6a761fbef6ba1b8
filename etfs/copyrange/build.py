"""cffi build script for ``etfs.copyrange._fusecfr`` (out-of-line API mode).

The compiled module defines its own ``fuse_session_new``. Loaded with RTLD_GLOBAL before
pyfuse3, it is found first by the dynamic linker when pyfuse3 binds that symbol, so it can
add a ``copy_file_range`` op to the ops table pyfuse3 hands to libfuse (pyfuse3 has none).
It also interposes ``fuse_session_fd``, ``fuse_session_receive_buf`` and ``fuse_session_unmount``
for the front reader (a C thread that reads /dev/fuse ahead of pyfuse3; see "The front reader").
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

/* The front reader (see FRONT_READER below): enable before pyfuse3.init(). */
int etfs_front_enable(int on);
int etfs_front_active(void);
uint64_t etfs_front_answered(void);
uint64_t etfs_front_forwarded(void);

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

/* ---- The front reader ---------------------------------------------------------------------
   pyfuse3 reads /dev/fuse from its trio loop: each request costs a trio wake-up (~100 us) even
   when C answers it. `ls -l` asks two xattrs the kernel never caches (security.selinux,
   system.posix_acl_access) for every entry, so a 10,000-file `ls -lR` spent ~1.5 s on them.
   With the front reader a C thread reads /dev/fuse itself, answers those getxattr requests
   at once, and queues every other request for pyfuse3, which waits on a pipe instead of the
   device (we interpose fuse_session_fd and fuse_session_receive_buf, as fuse_session_new).
   Invariant: the pipe holds a byte exactly while the queue is non-empty or the reader ended.
   fuse_session_unmount (interposed too) stops the thread and closes its dup of the device
   *before* libfuse closes the session fd: that last close is what aborts the connection, so
   programs still inside the mount get ENOTCONN instead of waiting for the process to exit. */
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

/* Kernel ABI (include/uapi/linux/fuse.h), stable since 7.x. */
struct etfs_fuse_in_header {
    uint32_t len, opcode;
    uint64_t unique, nodeid;
    uint32_t uid, gid, pid;
    uint16_t total_extlen, padding;
};
struct etfs_fuse_out_header {
    uint32_t len;
    int32_t error;
    uint64_t unique;
};
#define ETFS_FUSE_FORGET 2
#define ETFS_FUSE_GETXATTR 22
#define ETFS_FUSE_BATCH_FORGET 42
#define ETFS_GETXATTR_IN_SIZE 8
/* Requests up to this size are copied out of the read buffer; larger ones (writes) take it. */
#define ETFS_FRONT_COPY_MAX (64 * 1024)
#define ETFS_FRONT_MAX_BUFSIZE (64 * 1024 * 1024)

struct etfs_front_item {
    struct etfs_front_item *next;
    char *mem;
    size_t len;
};

static int etfs_front_enabled = 0;
static int etfs_front_started = 0;
static pthread_t etfs_front_thread;
static int etfs_front_dev = -1;      /* our dup of the session's /dev/fuse fd */
static int etfs_front_pipe[2] = {-1, -1};  /* pyfuse3 waits on [0] */
static int etfs_front_stop_pipe[2] = {-1, -1};  /* a byte in it stops the thread */
static size_t etfs_front_bufsize = 0;
static pthread_mutex_t etfs_front_lock = PTHREAD_MUTEX_INITIALIZER;
static struct etfs_front_item *etfs_front_head = NULL, *etfs_front_tail = NULL;
static int etfs_front_ended = 0;     /* the reader stopped; end_err 0 after ENODEV (unmounted) */
static int etfs_front_end_err = 0;
static uint64_t etfs_front_n_answered = 0, etfs_front_n_forwarded = 0;

int etfs_front_enable(int on) { int old = etfs_front_enabled; etfs_front_enabled = on; return old; }
int etfs_front_active(void) { return etfs_front_started; }
uint64_t etfs_front_answered(void) { return __atomic_load_n(&etfs_front_n_answered, __ATOMIC_RELAXED); }
uint64_t etfs_front_forwarded(void) { return __atomic_load_n(&etfs_front_n_forwarded, __ATOMIC_RELAXED); }

static void etfs_front_wake(void)
{
    char c = 1;
    /* The pipe is non-blocking; a full pipe is already readable, which is all we need. */
    while (write(etfs_front_pipe[1], &c, 1) < 0 && errno == EINTR)
        ;
}

static void etfs_front_push(struct etfs_front_item *item)
{
    pthread_mutex_lock(&etfs_front_lock);
    int was_empty = etfs_front_head == NULL;
    if (etfs_front_tail)
        etfs_front_tail->next = item;
    else
        etfs_front_head = item;
    etfs_front_tail = item;
    if (was_empty && !etfs_front_ended)
        etfs_front_wake();
    pthread_mutex_unlock(&etfs_front_lock);
}

static void etfs_front_end(int err)
{
    pthread_mutex_lock(&etfs_front_lock);
    if (!etfs_front_ended) {
        etfs_front_ended = 1;
        etfs_front_end_err = err;
        etfs_front_wake();
    }
    pthread_mutex_unlock(&etfs_front_lock);
}

static void etfs_front_reply_err(uint64_t unique, int err)
{
    struct etfs_fuse_out_header out = {sizeof(out), -err, unique};
    /* ENOENT: the request was interrupted meanwhile; nothing else to do either way. */
    while (write(etfs_front_dev, &out, sizeof(out)) < 0 && errno == EINTR)
        ;
}

/* A getxattr we answer ourselves: any name outside user.* (etfs has no others). */
static int etfs_front_answer(const char *mem, size_t n)
{
    const struct etfs_fuse_in_header *in = (const struct etfs_fuse_in_header *)mem;
    size_t at = sizeof(*in) + ETFS_GETXATTR_IN_SIZE;
    if (in->opcode != ETFS_FUSE_GETXATTR || n <= at)
        return 0;
    const char *name = mem + at;
    size_t room = n - at;
    if (memchr(name, 0, room) == NULL || strncmp(name, "user.", 5) == 0)
        return 0;
    etfs_front_reply_err(in->unique, ENODATA);
    __atomic_add_fetch(&etfs_front_n_answered, 1, __ATOMIC_RELAXED);
    return 1;
}

/* Wait until the device is readable (1) or we are told to stop (0). */
static int etfs_front_wait(void)
{
    struct pollfd pfd[2] = {{etfs_front_dev, POLLIN, 0}, {etfs_front_stop_pipe[0], POLLIN, 0}};
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1; /* let read() report the problem */
        }
        if (pfd[1].revents)
            return 0;
        if (pfd[0].revents)
            return 1;
    }
}

static void *etfs_front_main(void *arg)
{
    (void)arg;
    char *buf = NULL;
    while (etfs_front_wait()) {
        if (buf == NULL && (buf = malloc(etfs_front_bufsize)) == NULL) {
            etfs_front_end(-ENOMEM);
            break;
        }
        ssize_t n = read(etfs_front_dev, buf, etfs_front_bufsize);
        if (n < 0) {
            /* As libfuse: ENOENT is a request interrupted before we read it; ENODEV unmounted. */
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;
            if (errno == EINVAL && etfs_front_bufsize < ETFS_FRONT_MAX_BUFSIZE) {
                /* Buffer smaller than max_write + headers (bigger pages, a larger max_pages). */
                etfs_front_bufsize *= 2;
                free(buf);
                buf = NULL;
                continue;
            }
            etfs_front_end(errno == ENODEV ? 0 : -errno);
            break;
        }
        if ((size_t)n < sizeof(struct etfs_fuse_in_header)) {
            fprintf(stderr, "etfs.copyrange: short read on fuse device (%zd bytes)\n", n);
            etfs_front_end(-EIO);
            break;
        }
        if (etfs_front_answer(buf, (size_t)n))
            continue;
        struct etfs_front_item *item = malloc(sizeof(*item));
        char *mem = (size_t)n <= ETFS_FRONT_COPY_MAX ? malloc((size_t)n) : buf;
        if (item == NULL || mem == NULL) {
            const struct etfs_fuse_in_header *in = (const struct etfs_fuse_in_header *)buf;
            free(item);
            if (mem != buf)
                free(mem);
            if (in->opcode != ETFS_FUSE_FORGET && in->opcode != ETFS_FUSE_BATCH_FORGET)
                etfs_front_reply_err(in->unique, ENOMEM);
            continue;
        }
        if (mem == buf)
            buf = NULL; /* handed over with the request */
        else
            memcpy(mem, buf, (size_t)n);
        item->next = NULL;
        item->mem = mem;
        item->len = (size_t)n;
        __atomic_add_fetch(&etfs_front_n_forwarded, 1, __ATOMIC_RELAXED);
        etfs_front_push(item);
    }
    free(buf);
    return NULL;
}

static void etfs_front_close_fds(void)
{
    int *fds[] = {&etfs_front_dev, &etfs_front_pipe[0], &etfs_front_pipe[1],
                  &etfs_front_stop_pipe[0], &etfs_front_stop_pipe[1]};
    for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

static int etfs_front_start(int fd)
{
    long page = sysconf(_SC_PAGESIZE);
    /* libfuse's own buffer: 256 pages of data plus 4 KiB for headers (max_write is capped to it). */
    etfs_front_bufsize = 256 * (size_t)(page > 0 ? page : 4096) + 4096;
    etfs_front_ended = 0;
    etfs_front_end_err = 0;
    etfs_front_dev = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (etfs_front_dev < 0 || pipe2(etfs_front_pipe, O_CLOEXEC | O_NONBLOCK) < 0 ||
        pipe2(etfs_front_stop_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        int err = errno;
        etfs_front_close_fds();
        return err;
    }
    /* Signals belong to Python's main thread: the reader blocks them all. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&etfs_front_thread, NULL, etfs_front_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        etfs_front_close_fds();
        return rc;
    }
    etfs_front_started = 1;
    return 0;
}

/* Stop and join the reader, drop what pyfuse3 did not take, close our fds (the dup first:
   after that the session fd is the device's last reference again). */
static void etfs_front_stop(void)
{
    if (!etfs_front_started)
        return;
    char c = 1;
    while (write(etfs_front_stop_pipe[1], &c, 1) < 0 && errno == EINTR)
        ;
    pthread_join(etfs_front_thread, NULL);
    pthread_mutex_lock(&etfs_front_lock);
    struct etfs_front_item *item = etfs_front_head;
    etfs_front_head = etfs_front_tail = NULL;
    etfs_front_started = 0;
    pthread_mutex_unlock(&etfs_front_lock);
    while (item) {
        struct etfs_front_item *next = item->next;
        free(item->mem);
        free(item);
        item = next;
    }
    etfs_front_close_fds();
}

typedef int (*etfs_session_fd_t)(struct fuse_session *);
typedef int (*etfs_receive_buf_t)(struct fuse_session *, struct fuse_buf *);
typedef void (*etfs_unmount_t)(struct fuse_session *);

static void *etfs_real(const char *name)
{
    void *f = dlvsym(RTLD_NEXT, name, "FUSE_3.0");
    return f ? f : dlsym(RTLD_NEXT, name);
}

/* pyfuse3 asks for the fd once, right after fuse_session_mount: start the reader there and
   give pyfuse3 the pipe to wait on. */
ETFS_EXPORT int fuse_session_fd(struct fuse_session *se)
{
    static etfs_session_fd_t real = NULL;
    if (real == NULL)
        real = (etfs_session_fd_t)etfs_real("fuse_session_fd");
    int fd = real(se);
    if (etfs_front_started)
        return etfs_front_pipe[0];
    if (!etfs_front_enabled || fd < 0 || etfs_cfr_state != ETFS_CFR_INSTALLED)
        return fd;
    int err = etfs_front_start(fd);
    if (err != 0) {
        fprintf(stderr, "etfs.copyrange: front reader not started (%s); pyfuse3 reads the device\n",
                strerror(err));
        return fd;
    }
    return etfs_front_pipe[0];
}

/* Called by pyfuse3 when the pipe is readable: hand over the oldest request. Returns its size,
   -EINTR when there is none (pyfuse3 waits again), 0 once unmounted (as libfuse). */
ETFS_EXPORT int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    if (!etfs_front_started) {
        static etfs_receive_buf_t real = NULL;
        if (real == NULL)
            real = (etfs_receive_buf_t)etfs_real("fuse_session_receive_buf");
        return real(se, buf);
    }
    pthread_mutex_lock(&etfs_front_lock);
    struct etfs_front_item *item = etfs_front_head;
    if (item) {
        etfs_front_head = item->next;
        if (etfs_front_head == NULL)
            etfs_front_tail = NULL;
    }
    int ended = etfs_front_ended, err = etfs_front_end_err;
    if (etfs_front_head == NULL && !ended) {
        char drain[64];
        while (read(etfs_front_pipe[0], drain, sizeof(drain)) > 0)
            ;
    }
    pthread_mutex_unlock(&etfs_front_lock);
    if (item == NULL) {
        if (!ended)
            return -EINTR;
        if (err == 0)
            fuse_session_exit(se);
        return err;
    }
    /* pyfuse3 owns buf->mem and frees it with free() at the end; ours come from malloc too. */
    free(buf->mem);
    buf->mem = item->mem;
    buf->size = item->len;
    buf->flags = 0;
    buf->fd = -1;
    buf->pos = 0;
    int n = (int)item->len;
    free(item);
    return n;
}

ETFS_EXPORT void fuse_session_unmount(struct fuse_session *se)
{
    static etfs_unmount_t real = NULL;
    if (real == NULL)
        real = (etfs_unmount_t)etfs_real("fuse_session_unmount");
    etfs_front_stop();
    real(se);
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
    for extra in ("dl", "pthread"):
        if extra not in libraries:
            libraries.append(extra)
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
