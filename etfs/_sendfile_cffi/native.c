/* etfs._sendfile_cffi._native: data-path syscalls for etfs, compiled by build.py (cffi API mode).
 *
 * See build.py's docstring for what each loop does and the rules they follow. */
/* cffi includes Python.h first; pyconfig.h already sets these. */
#ifndef _GNU_SOURCE
#  define _GNU_SOURCE 1
#endif
#ifndef _FILE_OFFSET_BITS
#  define _FILE_OFFSET_BITS 64
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/fsuid.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

#ifndef SYS_openat2
#  define SYS_openat2 437
#endif
/* <linux/openat2.h> may be missing on old headers: define what we need. */
#ifndef RESOLVE_NO_XDEV
#  define RESOLVE_NO_XDEV       0x01
#  define RESOLVE_NO_MAGICLINKS 0x02
#  define RESOLVE_NO_SYMLINKS   0x04
#  define RESOLVE_BENEATH       0x08
#  define RESOLVE_IN_ROOT       0x10
#endif
#ifndef RESOLVE_CACHED
#  define RESOLVE_CACHED        0x20
#endif
struct etfs_open_how {
    uint64_t flags;
    uint64_t mode;
    uint64_t resolve;
};

#ifndef F_GETPIPE_SZ
#  define F_GETPIPE_SZ 1032
#endif

/* Largest single transfer the kernel does for read/write/sendfile/splice. */
#define ETFS_MAX_XFER 0x7ffff000LL

/* Longest single wait for a non-blocking socket with no SO_RCVTIMEO/SO_SNDTIMEO
 * set (ms): a silent peer must never hang a transfer forever. */
#ifndef ETFS_DEFAULT_WAIT_MS
#  define ETFS_DEFAULT_WAIT_MS 30000
#endif

static long long etfs_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

/* Called after a socket call failed with EAGAIN/EWOULDBLOCK.
 *
 * On a BLOCKING fd that means the socket's SO_RCVTIMEO/SO_SNDTIMEO expired
 * (the data path bounds every wait that way): give up with ETIMEDOUT.
 * On a non-blocking fd wait in poll() until it is ready, for at most the
 * socket's own timeout for that direction (ETFS_DEFAULT_WAIT_MS if none is
 * set or the fd is not a socket), then give up with ETIMEDOUT.
 * Returns 0 to retry, -1 with errno set otherwise. */
static int etfs_wait_fd(int fd, short events)
{
    struct pollfd p;
    struct timeval tv;
    socklen_t tvlen = sizeof tv;
    long long wait_ms = ETFS_DEFAULT_WAIT_MS;
    long long deadline;
    int fl, r;

    fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    if (!(fl & O_NONBLOCK)) {
        errno = ETIMEDOUT;
        return -1;
    }
    memset(&tv, 0, sizeof tv);
    if (getsockopt(fd, SOL_SOCKET, (events & POLLOUT) ? SO_SNDTIMEO : SO_RCVTIMEO,
                   &tv, &tvlen) == 0
            && (tv.tv_sec > 0 || tv.tv_usec > 0)) {
        wait_ms = (long long)tv.tv_sec * 1000LL + (tv.tv_usec + 999) / 1000;
        if (wait_ms > INT_MAX)
            wait_ms = INT_MAX;
    }
    deadline = etfs_now_ms() + wait_ms;
    p.fd = fd;
    p.events = events;
    for (;;) {
        long long left = deadline - etfs_now_ms();
        if (left < 0)
            left = 0;
        p.revents = 0;
        r = poll(&p, 1, (int)left);
        if (r > 0)
            return 0;           /* ready, or an error the retried call reports */
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (errno != EINTR)
            return -1;
    }
}

static int etfs_bad_args(long long offset, long long count)
{
    if (offset < 0 || count < 0) {
        errno = EINVAL;
        return 1;
    }
    return 0;
}

/* Send exactly len bytes of buf.  0 on success, -1 with errno. */
static int etfs_send_all(int sock_fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(sock_fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (etfs_wait_fd(sock_fd, POLLOUT) < 0)
                    return -1;
                continue;
            }
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Write exactly len bytes of buf at off.  0 on success, -1 with errno. */
static int etfs_pwrite_all(int file_fd, const char *buf, size_t len, off_t off)
{
    while (len > 0) {
        ssize_t n = pwrite(file_fd, buf, len, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {           /* should not happen for regular files */
            errno = EIO;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

/* Receive exactly len bytes into buf.  0 on success, -1 with errno;
 * a peer that closes before len bytes arrived gives ECONNRESET. */
static int etfs_recv_all(int sock_fd, char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = recv(sock_fd, buf, len, MSG_WAITALL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (etfs_wait_fd(sock_fd, POLLIN) < 0)
                    return -1;
                continue;
            }
            return -1;
        }
        if (n == 0) {
            errno = ECONNRESET;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* sendfile(2) loop.  Returns count, or fewer if the file ends first
 * (the caller must treat that as a truncated source), or -1/errno. */
long long etfs_sendfile(int sock_fd, int file_fd, long long offset, long long count)
{
    off_t off = (off_t)offset;
    long long done = 0;
    if (etfs_bad_args(offset, count))
        return -1;
    while (done < count) {
        long long want = count - done;
        ssize_t n;
        if (want > ETFS_MAX_XFER)
            want = ETFS_MAX_XFER;
        n = sendfile(sock_fd, file_fd, &off, (size_t)want);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (etfs_wait_fd(sock_fd, POLLOUT) < 0)
                    return -1;
                continue;
            }
            return -1;
        }
        if (n == 0)             /* end of file */
            break;
        done += n;
    }
    return done;
}

/* Both copy loops below move at most ETFS_STEP bytes per syscall pair, walking
 * forward through buf and wrapping to its start only when it is full.  So the
 * data just received/read is still in L2 when it is written/sent, and the two
 * ends of a connection overlap (measured on loopback: a 4 MiB step ran at 0.4-
 * 2.5 GB/s, 1 MiB at ~2.8 GB/s), while a block with count <= buflen still ends
 * up whole in buf[0:count]. */
#ifndef ETFS_STEP
#  define ETFS_STEP (1024 * 1024)
#endif

/* Next piece: at most ETFS_STEP, the rest of the block, and the room left in
 * buf after *pos (wrapping *pos to 0 when buf is full). */
static size_t etfs_next_piece(long long remaining, size_t buflen, size_t *pos)
{
    size_t want;
    if (*pos >= buflen)
        *pos = 0;
    want = buflen - *pos;
    if (want > ETFS_STEP)
        want = ETFS_STEP;
    if ((unsigned long long)remaining < want)
        want = (size_t)remaining;
    return want;
}

/* etfs_bad_args, and a buffer a non-empty copy can use (EINVAL). */
static int etfs_bad_buffer_args(long long offset, long long count, const char *buf, size_t buflen)
{
    if (etfs_bad_args(offset, count))
        return 1;
    if (count > 0 && (buf == NULL || buflen == 0)) {
        errno = EINVAL;
        return 1;
    }
    return 0;
}

/* pread into buf, send from buf, piece by piece.  When count <= buflen the
 * whole block is in buf[0:count] afterwards.  Returns count, fewer if the
 * file ends first, or -1/errno. */
long long etfs_read_send(int file_fd, int sock_fd, long long offset, long long count,
                         char *buf, size_t buflen)
{
    long long done = 0;
    size_t pos = 0;
    if (etfs_bad_buffer_args(offset, count, buf, buflen))
        return -1;
    while (done < count) {
        size_t want = etfs_next_piece(count - done, buflen, &pos);
        size_t got = 0;
        int eof = 0;
        while (got < want) {
            ssize_t n = pread(file_fd, buf + pos + got, want - got,
                              (off_t)(offset + done + (long long)got));
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            if (n == 0) {
                eof = 1;
                break;
            }
            got += (size_t)n;
        }
        if (got > 0 && etfs_send_all(sock_fd, buf + pos, got) < 0)
            return -1;
        done += (long long)got;
        pos += got;
        if (eof)
            break;
    }
    return done;
}

/* recv exactly count bytes and pwrite them at offset, piece by piece.  When
 * count <= buflen the block is in buf[0:count] afterwards.  Returns count or
 * -1/errno (ECONNRESET on early EOF). */
long long etfs_recv_write(int sock_fd, int file_fd, long long offset, long long count,
                          char *buf, size_t buflen)
{
    long long done = 0;
    size_t pos = 0;
    if (etfs_bad_buffer_args(offset, count, buf, buflen))
        return -1;
    while (done < count) {
        size_t want = etfs_next_piece(count - done, buflen, &pos);
        if (etfs_recv_all(sock_fd, buf + pos, want) < 0)
            return -1;
        if (etfs_pwrite_all(file_fd, buf + pos, want, (off_t)(offset + done)) < 0)
            return -1;
        done += (long long)want;
        pos += want;
    }
    return done;
}

/* socket -> pipe -> file with splice(2).  The pipe must be empty on entry;
 * it is empty again on success (on error it may hold data: discard it).
 * Returns count or -1/errno (ECONNRESET on early EOF). */
long long etfs_splice_recv(int sock_fd, int file_fd, long long offset, long long count,
                           int pipe_r, int pipe_w)
{
    const unsigned int fl = SPLICE_F_MOVE | SPLICE_F_MORE;
    loff_t off = (loff_t)offset;
    long long done = 0;
    long long cap;
    if (etfs_bad_args(offset, count))
        return -1;
    if (count == 0)
        return 0;
    cap = fcntl(pipe_w, F_GETPIPE_SZ);
    if (cap <= 0)
        cap = 65536;
    while (done < count) {
        long long want = count - done;
        ssize_t in;
        if (want > cap)
            want = cap;
        in = splice(sock_fd, NULL, pipe_w, NULL, (size_t)want, fl);
        if (in < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (etfs_wait_fd(sock_fd, POLLIN) < 0)
                    return -1;
                continue;
            }
            return -1;
        }
        if (in == 0) {
            errno = ECONNRESET;
            return -1;
        }
        while (in > 0) {
            ssize_t out = splice(pipe_r, NULL, file_fd, &off, (size_t)in, fl);
            if (out < 0) {
                if (errno == EINTR)
                    continue;
                return -1;
            }
            if (out == 0) {
                errno = EIO;
                return -1;
            }
            in -= out;
            done += out;
        }
    }
    return done;
}

/* renameat2 through syscall(): glibc's wrapper needs <stdio.h> with _GNU_SOURCE and is
   newer than some headers; the syscall itself exists since Linux 3.15. */
#ifndef RENAME_NOREPLACE
#  define RENAME_NOREPLACE (1 << 0)
#endif
#ifndef RENAME_EXCHANGE
#  define RENAME_EXCHANGE (1 << 1)
#endif
/* Start writeback of a range without waiting: a receiver calls it per block so the final
   fdatasync only waits for the tail instead of the whole file. */
int etfs_sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags)
{
    return sync_file_range(fd, (off64_t)offset, (off64_t)nbytes, flags);
}

int etfs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags)
{
    return (int)syscall(SYS_renameat2, olddirfd, oldpath, newdirfd, newpath, flags);
}

/* The filesystem identity of the calling thread only: the raw setgroups syscall (glibc's
   setgroups() changes every thread of the process) and setfsgid/setfsuid, which report no
   errors, so each is read back.  Leaving fsuid 0 also drops this thread's filesystem
   capabilities (CAP_DAC_OVERRIDE, CAP_CHOWN, CAP_FOWNER, CAP_FSETID); fsuid 0 restores them. */
int etfs_set_fs_identity(unsigned int uid, unsigned int gid, int ngroups, const unsigned int *groups)
{
    if (syscall(SYS_setgroups, (long)ngroups, groups) != 0)
        return -1;
    setfsgid((gid_t)gid);
    if ((unsigned int)setfsgid((gid_t)-1) != gid) {
        errno = EPERM;
        return -1;
    }
    setfsuid((uid_t)uid);
    if ((unsigned int)setfsuid((uid_t)-1) != uid) {
        errno = EPERM;
        return -1;
    }
    return 0;
}

int etfs_openat2(int dirfd, const char *path, int flags, int mode, unsigned long long resolve)
{
    struct etfs_open_how how;
    long r;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)(unsigned int)flags;
    how.mode = (uint64_t)(unsigned int)mode;
    how.resolve = (uint64_t)resolve;
    do {
        r = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    } while (r < 0 && errno == EINTR);
    return (int)r;
}
