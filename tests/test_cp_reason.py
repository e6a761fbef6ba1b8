"""Issue 14 item 4 (client side): the reason for a failed copy reaches the program.

A destination server whose directory is a small tmpfs fills up halfway through a `cp`
between mounts: `cp` says "No space left on device" (not "Input/output error"); after
space is freed, the same `cp` resumes instead of sending the whole file again.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.mount import Mount, MountFactory
from harness.process import throttled, wait_for
from harness.server import ServerFactory, ServerProcess
from test_cp_mounts import digest, random_file

from etfs.protocol.transfer import FailureCode
from etfs.transfer.engine import TransferFailed
from etfs.transfer.errors import reply_errno

SIZE = 128 * 2**20


@dataclass
class Full:
    """A `cp` that failed because the destination filled up at about half the file."""

    jive: ServerProcess
    onsala: ServerProcess
    mount: Mount
    src: Path
    filler: Path
    cp: subprocess.CompletedProcess[str]
    done_at_fault: int


def fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full."""
    block = b"\0" * 2**20
    # Unbuffered: a short last write must not leave bytes for close() to fail on.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def arrived(part: Path) -> int:
    """Bytes of the destination's part file actually written (it is sparse until then)."""
    try:
        return part.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def copy_until_full(
    start_server: ServerFactory, start_mount: MountFactory, tmpfs: Callable[[Path, str], None]
) -> Full:
    jive, onsala = start_server("jive"), start_server("onsala")
    tmpfs(onsala.export / "tmp", f"{2 * SIZE // 2**20 + 8}m")  # room for the file, checked at start
    m = start_mount([jive, onsala])
    src = jive.export / "tmp" / "full"
    random_file(src, SIZE, seed=41)
    filler = onsala.export / "tmp" / "filler"
    cmd = ["cp", str(m.dir("jive") / "tmp" / "full"), str(m.dir("onsala") / "tmp") + "/"]
    part = onsala.export / "tmp" / ".full.etfs-part"
    assert jive.proc is not None
    # The source runs 4% of the time from before the copy starts, so we can act at about half.
    with throttled(jive.proc, run=0.002, pause=0.048):
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as cp:
            try:
                wait_for(lambda: arrived(part) >= SIZE // 2, 60, "half the file to arrive")
                done_at_fault = arrived(part)
                fill(filler)
                out, err = cp.communicate(timeout=120)
            finally:
                if cp.poll() is None:
                    cp.kill()
    return Full(
        jive, onsala, m, src, filler, subprocess.CompletedProcess(cmd, cp.returncode, out, err), done_at_fault
    )


def test_reply_errno_keeps_the_reason_and_never_says_enosys() -> None:
    assert reply_errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert reply_errno(OSError(errno.EDQUOT, "quota")) == errno.EDQUOT
    assert reply_errno(OSError(errno.ESTALE, "changed")) == errno.ESTALE
    assert reply_errno(OSError(errno.ETIMEDOUT, "silent")) == errno.ETIMEDOUT
    assert reply_errno(OSError(errno.EACCES, "denied")) == errno.EACCES
    # cp would quietly fall back to copying through the client on these: not a reason.
    assert reply_errno(OSError(errno.EPERM, "x")) == errno.EACCES
    for code in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EXDEV, errno.ECONNRESET, 0):
        assert reply_errno(OSError(code, "x")) == errno.EIO
    # The destination's typed failure code comes first (the errno beside it may be generic).
    assert reply_errno(TransferFailed(errno.EIO, "x", FailureCode.NO_SPACE)) == errno.ENOSPC
    assert reply_errno(TransferFailed(errno.EDQUOT, "x", FailureCode.NO_SPACE)) == errno.EDQUOT
    assert reply_errno(TransferFailed(errno.EIO, "x", FailureCode.SOURCE_CHANGED)) == errno.ESTALE
    assert reply_errno(TransferFailed(errno.EIO, "x", FailureCode.TIMED_OUT)) == errno.ETIMEDOUT
    assert reply_errno(TransferFailed(errno.EPERM, "x", FailureCode.PERMISSION)) == errno.EACCES
    assert reply_errno(TransferFailed(errno.EHOSTUNREACH, "x", FailureCode.PEER_UNREACHABLE)) == errno.EIO
    assert reply_errno(TransferFailed(errno.ENOSPC, "x", FailureCode.NONE)) == errno.ENOSPC


def test_full_destination_says_no_space(
    start_server: ServerFactory, start_mount: MountFactory, tmpfs: Callable[[Path, str], None]
) -> None:
    full = copy_until_full(start_server, start_mount, tmpfs)
    print(f"destination filled at {full.done_at_fault / SIZE:.0%} of the file")
    assert full.cp.returncode != 0
    assert "No space left on device" in full.cp.stderr, full.cp.stderr
    assert "Input/output error" not in full.cp.stderr
    final = full.onsala.export / "tmp" / "full"
    assert not final.exists() or final.stat().st_size < SIZE
    # Plain writes through the mount (no transfer) say it too, at write or at close.
    fill(full.onsala.export / "tmp" / "filler2")  # (the failed transfer may have freed space)
    r = subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={full.mount.dir('onsala') / 'tmp' / 'more'}",
            "bs=1M",
            "count=4",
            "conv=fsync",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0 and "No space left on device" in r.stderr, r.stderr


def test_rerun_after_freeing_space_resumes(
    start_server: ServerFactory, start_mount: MountFactory, tmpfs: Callable[[Path, str], None]
) -> None:
    full = copy_until_full(start_server, start_mount, tmpfs)
    assert full.cp.returncode != 0
    full.filler.unlink()
    dst_dir = full.mount.dir("onsala") / "tmp"
    r = subprocess.run(["cp", str(full.mount.dir("jive") / "tmp" / "full"), f"{dst_dir}/"], check=False)
    assert r.returncode == 0
    assert digest(full.onsala.export / "tmp" / "full") == digest(full.src)
    found = re.findall(r"resuming with (\d+) of \d+ bytes", full.onsala.log_path.read_text())
    present = int(found[-1]) if found else 0
    resent = SIZE - present
    print(f"re-run re-sent {resent / SIZE:.1%} of the file (fault at {full.done_at_fault / SIZE:.0%})")
    assert resent < 0.6 * SIZE
