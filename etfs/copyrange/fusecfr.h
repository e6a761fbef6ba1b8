/* etfs.copyrange._fusecfr: the functions Python calls (see fusecfr.c).
 *
 * build.py hands these prototypes to cffi's cdef parser as they are, so keep this file to
 * plain prototypes: no includes, no macros (fuse_req_t and uint64_t come from fuse_lowlevel.h
 * and stdint.h in fusecfr.c, from build.py's cdef for cffi).  fusecfr.c includes it, so the
 * compiler checks that both agree. */

/* Interposer status: one of the ETFS_CFR_* values. */
int etfs_cfr_status(void);
size_t etfs_cfr_op_size_seen(void);
size_t etfs_cfr_op_size_compiled(void);

/* Register our interrupt func for req; returns 1 if req was already interrupted
   (the Python side then runs its callback itself, outside libfuse's locks). */
int etfs_cfr_watch_interrupt(fuse_req_t req, uint64_t req_id);

/* The inode of the statfs request being handled (0: none seen, or the op is not wrapped). */
uint64_t etfs_statfs_ino(void);

/* The getxattr fast path (see fusecfr.c): enable before pyfuse3.init(). */
int etfs_fast_enable(int on);
uint64_t etfs_fast_answered(void);
uint64_t etfs_fast_chained(void);
