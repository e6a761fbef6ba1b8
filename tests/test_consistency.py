"""Consistency of the mount within one client: what was written reads back, sizes never roll back.

Starts with the exact reproduction of issue 10 (pwrite, pwrite, pread, then fstat said 0 and the
file ended empty), then checks the same promise through other handles, stat, lseek and mmap.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from harness.mount import Env, MountFactory
from harness.server import ServerFactory

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
]


@pytest.fixture
def jive(etfs_env: Env, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(a fresh directory on jive through the mount, the same directory on the server)."""
    name = request.node.name.replace("[", "_").replace("]", "")
    (etfs_env.export("jive") / "tmp" / name).mkdir()
    return etfs_env.dir("jive") / "tmp" / name, etfs_env.export("jive") / "tmp" / name


def test_issue10_pwrite_pwrite_pread_keeps_size(jive: tuple[Path, Path]) -> None:
    mnt, srv = jive
    rnd = random.Random(10)
    a = rnd.randbytes(41294)
    b = rnd.randbytes(65193)
    want = bytearray(165633)
    want[87330 : 87330 + len(a)] = a
    want[100440 : 100440 + len(b)] = b
    for attempt in range(20):  # the original lost the size every time; repeat for races
        p = mnt / f"f{attempt}"
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            assert os.pwrite(fd, a, 87330) == len(a)
            assert os.pwrite(fd, b, 100440) == len(b)
            assert os.fstat(fd).st_size == 165633
            assert os.pread(fd, 31354, 855) == bytes(want[855 : 855 + 31354])
            assert os.fstat(fd).st_size == 165633
            assert os.lseek(fd, 0, os.SEEK_END) == 165633
        finally:
            os.close(fd)
        assert os.stat(p).st_size == 165633
        assert p.read_bytes() == want
        assert (srv / f"f{attempt}").read_bytes() == want


def test_unlinked_open_file_keeps_growing(jive: tuple[Path, Path]) -> None:
    """fstat of an open, unlinked file answers from the file, not from the last cached stat."""
    mnt, _ = jive
    p = mnt / "gone"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 1000)
        os.unlink(p)
        os.pwrite(fd, b"y" * 5000, 1000)
        assert os.pread(fd, 10, 5990) == b"y" * 10  # the write is on the server now
        assert os.fstat(fd).st_size == 6000
        assert not p.exists()
    finally:
        os.close(fd)


def test_second_handle_sees_writes_at_once(jive: tuple[Path, Path]) -> None:
    mnt, _ = jive
    p = mnt / "two"
    w = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    r = os.open(p, os.O_RDONLY)
    try:
        for i in range(50):
            data = bytes([i]) * (1000 + i * 37)
            off = i * 997
            os.pwrite(w, data, off)
            assert os.pread(r, len(data), off) == data
            end = max(off + len(data), (i - 1) * 997 + 1000 + (i - 1) * 37 if i else 0)
            assert os.fstat(r).st_size == end
            assert os.lseek(r, 0, os.SEEK_END) == end
            assert os.stat(p).st_size == end
    finally:
        os.close(w)
        os.close(r)


def test_close_to_open_across_two_mounts(start_server: ServerFactory, start_mount: MountFactory) -> None:
    """What one client closes, another client's next open sees (as NFS promises), even with
    the file's old attributes and pages cached on the reader."""
    srv = start_server("jive")
    a = start_mount([srv], mountpoints=False).dir("jive") / "tmp"
    b = start_mount([srv], mountpoints=False).dir("jive") / "tmp"
    rnd = random.Random(7)
    for j in range(3):  # new names are subject to negative_ttl: create them before b looks
        (a / f"c2o{j}").write_bytes(b"old")
    for i in range(40):
        name = f"c2o{i % 3}"
        writer, reader = (a, b) if i % 2 == 0 else (b, a)
        os.stat(reader / name)  # the reader caches the old attributes (attr_ttl)
        (reader / name).read_bytes()  # and the old pages
        want = rnd.randbytes(rnd.choice([0, 10, 4096, 70_000, 1_500_000]))
        with open(writer / name, "wb") as f:
            f.write(want)
        fd = os.open(reader / name, os.O_RDONLY)
        try:
            assert os.fstat(fd).st_size == len(want), f"round {i}"
            got = b""
            while chunk := os.read(fd, 1 << 20):
                got += chunk
            assert got == want, f"round {i}: read {len(got)} bytes, want {len(want)}"
        finally:
            os.close(fd)


def test_hard_link_name_unlinked_elsewhere(jive: tuple[Path, Path]) -> None:
    """A file of two names is one inode on the mount, its requests going by one of the names;
    another client (here: the server's own side) unlinks that name: the other still opens.
    (tests/test_model.py seed 7: the second mount said ENOENT for a name that stat listed.)"""
    mnt, srv = jive
    data = random.Random(1).randbytes(70_000)
    (srv / "a").write_bytes(data)
    os.link(srv / "a", srv / "b")
    assert (mnt / "a").read_bytes() == data  # the mount's node for the file is known as "a"...
    assert (mnt / "b").read_bytes() == data  # ... and "b" joins it (one inode)
    assert os.stat(mnt / "a").st_ino == os.stat(mnt / "b").st_ino
    os.unlink(srv / "a")
    assert (mnt / "b").read_bytes() == data  # was ENOENT: the open went by "a"
    time.sleep(1.1)  # attr_ttl: stat asks the server again
    st = os.stat(mnt / "b")
    assert (st.st_size, st.st_nlink) == (len(data), 1)
    assert (mnt / "b").read_bytes() == data


def test_hard_link_name_replaced_elsewhere(jive: tuple[Path, Path]) -> None:
    """Another client replaces one name of a file of two names by a new file: the next open
    of that name (close-to-open, no waiting for entry_ttl: the kernel's dentry of it still
    points at the two-name inode) reads the new file, the other name the old one."""
    mnt, srv = jive
    rnd = random.Random(2)
    old, new = rnd.randbytes(50_000), rnd.randbytes(3000)
    (srv / "c").write_bytes(old)
    os.link(srv / "c", srv / "d")
    assert (mnt / "c").read_bytes() == old
    assert (mnt / "d").read_bytes() == old
    os.unlink(srv / "d")
    (srv / "d").write_bytes(new)
    assert (mnt / "d").read_bytes() == new  # was the old file: the open went by "c"
    assert (mnt / "c").read_bytes() == old
    assert os.stat(mnt / "c").st_ino != os.stat(mnt / "d").st_ino


def test_writes_while_cp_between_servers_reads_the_file(etfs_env: Env) -> None:
    """cp jive -> onsala (a server-to-server transfer) while a program keeps writing into the
    source: the writer's file ends exactly as written; cp either finished first or fails
    with ESTALE and commits nothing (tests/test_changed_source.py covers the copy side)."""
    src = etfs_env.dir("jive") / "tmp" / "busy.bin"
    dst = etfs_env.dir("onsala") / "tmp" / "busy-copy.bin"
    size = 24 * 1024 * 1024
    rnd = random.Random(3)
    want = bytearray(rnd.randbytes(size))
    src.write_bytes(want)
    fd = os.open(src, os.O_WRONLY)
    try:
        cp = subprocess.Popen(["cp", str(src), str(dst)], stderr=subprocess.PIPE)
        writes = 0
        while cp.poll() is None or writes < 20:
            off = rnd.randrange(0, size - 65536)
            data = rnd.randbytes(rnd.randrange(1, 65536))
            os.pwrite(fd, data, off)
            want[off : off + len(data)] = data
            writes += 1
        _, err = cp.communicate(timeout=120)
    finally:
        os.close(fd)
    assert src.read_bytes() == want
    assert (etfs_env.export("jive") / "tmp" / "busy.bin").read_bytes() == want
    if cp.returncode == 0:
        assert dst.stat().st_size == size
    else:
        assert b"Stale file handle" in err, err
        assert not dst.exists() or dst.stat().st_size == 0


def test_fsync_covers_writes_of_other_descriptors(jive: tuple[Path, Path]) -> None:
    mnt, srv = jive
    a = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    b = os.open(mnt / "f", os.O_WRONLY)
    try:
        os.pwrite(a, b"written through a", 0)  # stays in a's write-behind buffer
        os.fsync(b)
        assert (srv / "f").read_bytes() == b"written through a"
    finally:
        os.close(a)
        os.close(b)
