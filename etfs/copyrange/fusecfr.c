/* etfs.copyrange._fusecfr: copy_file_range (and a statfs inode, a getxattr fast path) for pyfuse3.
 *
 * Compiled by build.py (cffi API mode); see its docstring and etfs/copyrange/__init__.py for
 * why this interposes libfuse's fuse_session_new and fuse_session_receive_buf. */
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

#include "fusecfr.h"

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
/* The getxattr fast path (below): the session's /dev/fuse fd, once made non-blocking. */
static int etfs_fast_fd = -1;
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

/* statfs: pyfuse3 drops the inode, so `df /mnt/jive` could only get a sum over all servers.
   pyfuse3 runs the handler's coroutine right after this callback returns, in the same task and
   before anything else is read from the device, so the handler reads the inode from here as
   its first statement. */
static void (*etfs_real_statfs)(fuse_req_t req, fuse_ino_t ino) = NULL;
static uint64_t etfs_statfs_current = 0;

static void etfs_statfs(fuse_req_t req, fuse_ino_t ino)
{
    etfs_statfs_current = (uint64_t)ino;
    etfs_real_statfs(req, ino);
}

uint64_t etfs_statfs_ino(void) { return etfs_statfs_current; }

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
    if (etfs_cfr_ops.statfs != NULL && etfs_cfr_ops.statfs != etfs_statfs) {
        etfs_real_statfs = etfs_cfr_ops.statfs;
        etfs_cfr_ops.statfs = etfs_statfs;
    }
    etfs_fast_fd = -1; /* a new session: its fd is not yet made non-blocking */
    etfs_cfr_state = ETFS_CFR_INSTALLED;
    /* Pass our full size: the op may lie beyond a (smaller) caller's struct. */
    return real(args, &etfs_cfr_ops, sizeof(etfs_cfr_ops), userdata);
}

/* ---- The getxattr fast path ---------------------------------------------------------------
   `ls -l` asks two xattrs per entry that the kernel never caches (security.selinux,
   system.posix_acl_access), and writes ask security.capability. etfs has only user.*
   attributes (EtfsOperations.getxattr answers the others ENODATA), but each request costs a
   trip through pyfuse3's trio loop (~50-100 us), and a 10,000-file `ls -lR` spent ~1.5 s on
   them. Here, in fuse_session_receive_buf (interposed like fuse_session_new), a
   request for such a name is answered on the spot and we keep reading for a moment
   (ETFS_FAST_WAIT_NS, spinning: a sleeping thread costs more to wake than the whole answer)
   because the next request is usually another one of these (`ls` asks them back to back) or
   the write that asked: it is then read in this same call, without a trip through trio.
   Every other request goes to pyfuse3 exactly as before, at no extra cost. The device fd is
   made non-blocking so that this never blocks the trio thread; "nothing to read" reaches
   pyfuse3 as EINTR, which it answers by waiting on the fd again. */
#include <fcntl.h>
#include <time.h>

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
#define ETFS_FUSE_GETXATTR 22
#define ETFS_GETXATTR_IN_SIZE 8
#define ETFS_FAST_WAIT_NS 100000L /* 0.1 ms: longest the trio thread spins for a next request */
/* Answered in one call at most: a client asking getxattr in a tight loop must not keep trio
   (and the replies other requests wait for) from running. */
#define ETFS_FAST_MAX_CHAIN 64

static int etfs_fast_enabled = 0;
static uint64_t etfs_fast_n_answered = 0, etfs_fast_n_chained = 0;

int etfs_fast_enable(int on) { int old = etfs_fast_enabled; etfs_fast_enabled = on; return old; }
uint64_t etfs_fast_answered(void) { return etfs_fast_n_answered; }
uint64_t etfs_fast_chained(void) { return etfs_fast_n_chained; }

/* A getxattr of a name outside user.*: answer ENODATA and return 1. */
static int etfs_fast_answer(int fd, const char *mem, size_t n)
{
    const struct etfs_fuse_in_header *in = (const struct etfs_fuse_in_header *)mem;
    size_t at = sizeof(*in) + ETFS_GETXATTR_IN_SIZE;
    if (n <= at || in->opcode != ETFS_FUSE_GETXATTR)
        return 0;
    const char *name = mem + at;
    if (memchr(name, 0, n - at) == NULL || strncmp(name, "user.", 5) == 0)
        return 0;
    struct etfs_fuse_out_header out = {sizeof(out), -ENODATA, in->unique};
    /* ENOENT: the request was interrupted meanwhile; nothing else to do either way. */
    while (write(fd, &out, sizeof(out)) < 0 && errno == EINTR)
        ;
    etfs_fast_n_answered++;
    return 1;
}

typedef int (*etfs_receive_buf_t)(struct fuse_session *, struct fuse_buf *);

/* Returns what libfuse's returns (size, 0 at unmount, -errno), except that "nothing to read
   after all" is -EINTR, which pyfuse3 answers by waiting again. */
ETFS_EXPORT int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    static etfs_receive_buf_t real = NULL;
    if (real == NULL) {
        real = (etfs_receive_buf_t)dlvsym(RTLD_NEXT, "fuse_session_receive_buf", "FUSE_3.0");
        if (real == NULL)
            real = (etfs_receive_buf_t)dlsym(RTLD_NEXT, "fuse_session_receive_buf");
    }
    if (!etfs_fast_enabled || etfs_cfr_state != ETFS_CFR_INSTALLED)
        return real(se, buf);
    int fd = fuse_session_fd(se);
    if (fd != etfs_fast_fd) {
        int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0))
            return real(se, buf); /* cannot make it safe: no fast path */
        etfs_fast_fd = fd;
    }
    int res = real(se, buf);
    struct timespec start = {0, 0};
    int answered = 0;
    for (int chained = 0;; chained = 1) {
        if (res == -EAGAIN) {
            if (!chained)
                return -EINTR;
            /* Spin (do not sleep): waking a sleeping thread costs more than the whole answer,
               and the next request usually comes within microseconds. */
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            long waited = (now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec);
            if (waited > ETFS_FAST_WAIT_NS)
                return -EINTR;
            res = real(se, buf);
            continue;
        }
        if (chained && res > 0)
            etfs_fast_n_chained++;
        if (res <= 0 || (buf->flags & FUSE_BUF_IS_FD) || !etfs_fast_answer(fd, buf->mem, (size_t)res))
            return res;
        if (++answered >= ETFS_FAST_MAX_CHAIN)
            return -EINTR; /* the fd may still be readable: pyfuse3 comes straight back */
        clock_gettime(CLOCK_MONOTONIC, &start);
        res = real(se, buf);
    }
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
