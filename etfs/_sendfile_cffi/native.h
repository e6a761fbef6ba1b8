/* etfs._sendfile_cffi._native: the functions Python calls (see native.c).
 *
 * build.py hands these prototypes to cffi's cdef parser as they are, so keep this file to
 * plain prototypes: no includes, no macros.  native.c includes it, so the compiler checks
 * that both agree. */

long long etfs_sendfile(int sock_fd, int file_fd, long long offset, long long count);
long long etfs_read_send(int file_fd, int sock_fd, long long offset, long long count,
                         char *buf, size_t buflen);
long long etfs_recv_write(int sock_fd, int file_fd, long long offset, long long count,
                          char *buf, size_t buflen);
long long etfs_splice_recv(int sock_fd, int file_fd, long long offset, long long count,
                           int pipe_r, int pipe_w);
int etfs_openat2(int dirfd, const char *path, int flags, int mode, unsigned long long resolve);
int etfs_renameat2(int olddirfd, const char *oldpath, int newdirfd, const char *newpath, unsigned int flags);
int etfs_sync_file_range(int fd, long long offset, long long nbytes, unsigned int flags);
int etfs_set_fs_identity(unsigned int uid, unsigned int gid, int ngroups, const unsigned int *groups);
