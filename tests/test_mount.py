"""Real-mount tests of `etfs mount`: everyday tools through the mount, resilience, CLI.

Servers and mounts come from tests/conftest.py (real processes on loopback, real FUSE mounts).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import Env, mounted, wait_for

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
]
ROOT = os.geteuid() == 0


def sh(*cmd: str | Path, cwd: Path | None = None) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree(root: Path) -> dict[str, str]:
    """relative path -> content digest (or link target / 'dir') of a directory tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = digest(p)
    return out


def make_tree(root: Path, files: int, size: int = 3000) -> None:
    for i in range(files):
        d = root / f"d{i % 7}" / f"e{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.bin").write_bytes(os.urandom(size + i))
    os.symlink("d0/e0/f0.bin", root / "link")


@pytest.fixture
def area(etfs_env: Env, request: pytest.FixtureRequest) -> tuple[Path, Path, Path]:
    """(a fresh directory on jive through the mount, the same on the server, the onsala twin)."""
    name = request.node.name.replace("[", "_").replace("]", "")
    (etfs_env.export("jive") / "tmp" / name).mkdir()
    (etfs_env.export("onsala") / "tmp" / name).mkdir()
    return (
        etfs_env.dir("jive") / "tmp" / name,
        etfs_env.export("jive") / "tmp" / name,
        etfs_env.dir("onsala") / "tmp" / name,
    )


# --- basics -------------------------------------------------------------------------------------
def test_root_lists_servers_and_mountpoints(etfs_env: Env) -> None:
    assert sorted(os.listdir(etfs_env.mount.root)) == ["jive", "onsala"]
    for name in ("jive", "onsala"):
        mp = etfs_env.dir(name)
        if ROOT:
            assert mounted(mp), f"{mp} should be a bind mount"
        assert "tmp" in os.listdir(mp)
        # Same superblock everywhere: what makes copy_file_range reach the daemon.
        assert os.stat(mp).st_dev == os.stat(etfs_env.mount.root).st_dev
    if ROOT:
        dev = os.stat(etfs_env.mount.root).st_dev
        ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text().strip()
        assert ra == "1024"


def test_write_read_dd(area: tuple[Path, Path, Path]) -> None:
    mnt, srv, _ = area
    src = srv.parent.parent.parent / "dd-src.bin"
    src.write_bytes(os.urandom(9 * 1024 * 1024 + 12345))
    try:
        sh("dd", f"if={src}", f"of={mnt / 'big.bin'}", "bs=1M", "status=none")
        assert digest(srv / "big.bin") == digest(src)
        assert digest(mnt / "big.bin") == digest(src)
        # small unaligned reads and a random read pattern
        with open(mnt / "big.bin", "rb") as f, open(src, "rb") as g:
            for off in (0, 5_000_000, 123, 9 * 1024 * 1024, 1 << 20):
                f.seek(off)
                g.seek(off)
                assert f.read(70_001) == g.read(70_001)
        sh("dd", f"if={mnt / 'big.bin'}", f"of={mnt / 'copy.bin'}", "bs=64k", "status=none")
        assert digest(srv / "copy.bin") == digest(src)
    finally:
        src.unlink()


def test_ls_stat_find(area: tuple[Path, Path, Path]) -> None:
    mnt, srv, _ = area
    make_tree(srv, 30)
    found = sh("find", mnt).split()
    assert len(found) == 1 + 30 + 7 + 7 * 3 + 1
    listing = sh("ls", "-lR", mnt)
    assert "f29.bin" in listing and "link -> d0/e0/f0.bin" in listing
    size = sh("stat", "-c", "%s %F", mnt / "d1" / "e1" / "f1.bin").split()
    assert size[0] == str(3001) and "regular" in " ".join(size[1:])
    assert tree(mnt) == tree(srv)


def test_st_blocks_never_look_sparse(area: tuple[Path, Path, Path]) -> None:
    mnt, srv, _ = area
    with open(srv / "sparse", "wb") as f:
        f.truncate(10 * 1024 * 1024)
    st = os.stat(mnt / "sparse")
    assert st.st_blocks * 512 >= st.st_size
    assert st.st_blksize == 1024 * 1024


def test_missing_file_is_enoent(area: tuple[Path, Path, Path]) -> None:
    mnt, _, _ = area
    with pytest.raises(FileNotFoundError):
        (mnt / "nope").read_bytes()
    r = subprocess.run(["cat", str(mnt / "nope")], capture_output=True, text=True)
    assert r.returncode != 0 and "No such file or directory" in r.stderr


def test_cp_and_mv(area: tuple[Path, Path, Path], etfs_env: Env) -> None:
    mnt, srv, onsala = area
    (srv / "a.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    want = digest(srv / "a.bin")
    sh("cp", mnt / "a.bin", mnt / "b.bin")
    assert digest(srv / "b.bin") == want
    sh("cp", mnt / "a.bin", onsala / "a.bin")
    onsala_srv = etfs_env.export("onsala") / "tmp" / srv.name
    assert digest(onsala_srv / "a.bin") == want
    sh("mv", mnt / "b.bin", mnt / "c.bin")
    assert not (srv / "b.bin").exists() and digest(srv / "c.bin") == want
    sh("mv", mnt / "c.bin", onsala / "c.bin")  # across servers: EXDEV, then copy + unlink
    assert not (srv / "c.bin").exists() and digest(onsala_srv / "c.bin") == want
    # renaming a directory keeps its children reachable
    (mnt / "dir1" / "sub").mkdir(parents=True)
    (mnt / "dir1" / "sub" / "x").write_text("x")
    sh("mv", mnt / "dir1", mnt / "dir2")
    assert (mnt / "dir2" / "sub" / "x").read_text() == "x"
    assert (srv / "dir2" / "sub" / "x").read_text() == "x"


def test_rename_flags(area: tuple[Path, Path, Path]) -> None:
    mnt, srv, _ = area
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100

    def renameat2(a: Path, b: Path, flags: int) -> int:
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags)
        return 0 if rc == 0 else ctypes.get_errno()

    assert renameat2(mnt / "a", mnt / "b", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert renameat2(mnt / "a", mnt / "b", 2) == 0  # RENAME_EXCHANGE
    assert (srv / "a").read_text() == "B" and (srv / "b").read_text() == "A"
    assert (mnt / "a").read_text() == "B" and (mnt / "b").read_text() == "A"


def test_rsync_and_tar(area: tuple[Path, Path, Path], tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("needs rsync")
    mnt, srv, _ = area
    local = tmp_path / "src"
    make_tree(local, 60)
    sh("rsync", "-a", f"{local}/", f"{mnt / 'r'}/")
    assert tree(srv / "r") == tree(local)
    # mtimes survive (rsync -a sets them via setattr)
    a, b = os.stat(local / "d1" / "e1" / "f1.bin"), os.stat(srv / "r" / "d1" / "e1" / "f1.bin")
    assert int(a.st_mtime) == int(b.st_mtime)
    # a second rsync finds nothing to do
    out = sh("rsync", "-a", "--itemize-changes", f"{local}/", f"{mnt / 'r'}/")
    assert out.strip() == ""
    sh("tar", "-cf", mnt / "t.tar", "-C", mnt / "r", ".")
    (mnt / "x").mkdir()
    sh("tar", "-xf", mnt / "t.tar", "-C", mnt / "x")
    assert tree(srv / "x") == tree(local)
    sh("rm", "-r", mnt / "x")
    assert not (srv / "x").exists()


def test_truncate_symlink_chmod_touch_append_link(area: tuple[Path, Path, Path]) -> None:
    mnt, srv, _ = area
    f = mnt / "f.txt"
    f.write_text("hello world\n")
    sh("truncate", "-s", "5", f)
    assert (srv / "f.txt").read_bytes() == b"hello"
    sh("truncate", "-s", "1M", f)
    assert os.path.getsize(srv / "f.txt") == 1 << 20 and os.path.getsize(f) == 1 << 20
    with open(f, "r+b") as fp:  # ftruncate on an open handle with buffered writes
        fp.write(b"X" * 100)
        fp.flush()
        os.ftruncate(fp.fileno(), 10)
    assert (srv / "f.txt").read_bytes() == b"X" * 10
    sh("ln", "-s", "f.txt", mnt / "lnk")
    assert os.readlink(mnt / "lnk") == "f.txt" and os.readlink(srv / "lnk") == "f.txt"
    assert (mnt / "lnk").read_bytes() == b"X" * 10
    sh("chmod", "600", f)
    assert stat.S_IMODE(os.stat(srv / "f.txt").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    sh("touch", "-d", "2020-01-02 03:04:05 UTC", f)
    assert os.stat(srv / "f.txt").st_mtime == pytest.approx(1577934245)
    assert os.stat(f).st_mtime == pytest.approx(1577934245)
    sh("touch", f)  # UTIME_NOW
    assert abs(os.stat(srv / "f.txt").st_mtime - time.time()) < 5
    for i in range(3):
        with open(f, "a") as fp:
            fp.write(f"line {i}\n")
    assert (srv / "f.txt").read_bytes() == b"X" * 10 + b"line 0\nline 1\nline 2\n"
    sh("sh", "-c", f"echo more >> '{f}'")
    assert (srv / "f.txt").read_bytes().endswith(b"line 2\nmore\n")
    sh("ln", f, mnt / "hard")
    assert os.stat(srv / "hard").st_ino == os.stat(srv / "f.txt").st_ino
    assert (mnt / "hard").read_bytes() == (srv / "f.txt").read_bytes()


def test_xattrs(area: tuple[Path, Path, Path]) -> None:
    mnt, srv, _ = area
    f = mnt / "x"
    f.write_bytes(b"data")
    try:
        os.setxattr(srv / "x", "user.probe", b"1")
    except OSError:
        pytest.skip("the server's filesystem has no user xattrs")
    os.setxattr(f, "user.color", b"blue")
    assert os.getxattr(srv / "x", "user.color") == b"blue"
    assert os.getxattr(f, "user.color") == b"blue"
    assert "user.color" in os.listxattr(f)
    assert os.getxattr(f, "user.etfs.server") == b"jive"
    assert os.getxattr(f, "user.etfs.path").endswith(b"/x")
    assert os.getxattr(f, "user.etfs.checksum").startswith(b"xxh3-128:")
    os.removexattr(f, "user.color")
    with pytest.raises(OSError) as exc:
        os.getxattr(f, "user.color")
    assert exc.value.errno == errno.ENODATA
    with pytest.raises(OSError) as exc:
        os.setxattr(f, "user.etfs.server", b"x")
    assert exc.value.errno == errno.EPERM


def test_server_side_changes_show_up(area: tuple[Path, Path, Path]) -> None:
    mnt, srv, _ = area
    os.listdir(mnt)
    assert not (mnt / "later.txt").exists()  # also caches a negative entry
    (srv / "later.txt").write_text("from the server")
    wait_for(lambda: "later.txt" in os.listdir(mnt), 5, "new file in the listing")
    wait_for(lambda: (mnt / "later.txt").exists(), 5, "new file by name")
    assert (mnt / "later.txt").read_text() == "from the server"
    (srv / "later.txt").write_text("changed on the server, longer")
    wait_for(lambda: (mnt / "later.txt").read_text() == "changed on the server, longer", 5, "new content")


def test_concurrent_readers_and_writers(area: tuple[Path, Path, Path]) -> None:
    mnt, srv, _ = area
    shared = os.urandom(4 * 1024 * 1024)
    (srv / "shared.bin").write_bytes(shared)
    want = hashlib.sha256(shared).hexdigest()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(3):
                assert digest(mnt / "shared.bin") == want
        except BaseException as exc:
            errors.append(exc)

    def writer(i: int) -> None:
        try:
            data = os.urandom(2 * 1024 * 1024 + i)
            (mnt / f"w{i}.bin").write_bytes(data)
            assert (srv / f"w{i}.bin").read_bytes() == data
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    threads += [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_df(etfs_env: Env) -> None:
    out = sh("df", "-P", etfs_env.dir("jive")).splitlines()
    assert len(out) == 2 and int(out[1].split()[1]) > 0
