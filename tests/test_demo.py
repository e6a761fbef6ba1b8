"""`etfs demo --dir D` end to end: the issue's "Done when" list, against a running demo."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.mount import mounted
from harness.process import PY, REPO, child_env, wait_for

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
]


def sh(*cmd: str | Path) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Demo:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.proc = subprocess.Popen(
            [PY, "-m", "etfs.cli", "demo", "--dir", str(d)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(),
            cwd=REPO,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "stops the demo" in line:  # the last line of the ready message
                self.ready.set()
        self.ready.set()  # EOF: let the waiter see the failure

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = tmp_path_factory.mktemp("demo")
    demo = Demo(d)
    try:
        assert demo.ready.wait(60), "demo did not become ready"
        assert demo.proc.poll() is None, demo.output()
        yield demo
    finally:
        demo.stop()
        for p in (d / "mnt" / "jive", d / "mnt" / "onsala", d / "mnt" / ".etfs"):
            for cmd in (["fusermount3", "-u", "-z", str(p)], ["umount", "-l", str(p)]):
                if mounted(p):
                    subprocess.run(cmd, capture_output=True, check=False)


def test_ready_line_and_layout(demo: Demo) -> None:
    d = demo.dir
    first = demo.lines[0].split()
    assert first[:3] == ["etfs", "demo", "ready:"]
    assert first[3:] == [str(d / "mnt" / "jive"), str(d / "mnt" / "onsala")]
    out = demo.output()
    assert f"cp {d / 'mnt' / 'jive'}/tmp/" in out and "status" in out
    assert sorted(os.listdir(d / "mnt" / ".etfs")) == ["jive", "onsala"]
    assert "sample.bin" in os.listdir(d / "mnt" / "jive" / "tmp")
    assert (d / "etc" / "mountpoints.yaml").exists()


def test_64mib_write_is_identical_on_server(demo: Demo) -> None:
    d = demo.dir
    src = d / "payload.bin"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    sh("cp", src, d / "mnt" / "jive" / "tmp" / "payload.bin")
    assert sha(d / "servers" / "jive" / "tmp" / "payload.bin") == sha(src)
    # and server to server with a plain cp
    sh("cp", d / "mnt" / "jive" / "tmp" / "sample.bin", d / "mnt" / "onsala" / "tmp" / "sample.bin")
    assert sha(d / "servers" / "onsala" / "tmp" / "sample.bin") == sha(
        d / "servers" / "jive" / "tmp" / "sample.bin"
    )


def test_everyday_operations_show_on_server(demo: Demo, tmp_path: Path) -> None:
    mnt = demo.dir / "mnt" / "jive" / "tmp"
    srv = demo.dir / "servers" / "jive" / "tmp"
    sh("mkdir", "-p", mnt / "a" / "b" / "c")
    assert (srv / "a" / "b" / "c").is_dir()
    sh("mv", mnt / "a" / "b", mnt / "a" / "renamed")
    assert (srv / "a" / "renamed" / "c").is_dir() and not (srv / "a" / "b").exists()
    f = mnt / "a" / "file.txt"
    f.write_text("first\n")
    sh("touch", "-d", "2021-06-01 12:00:00 UTC", f)
    assert int(os.stat(srv / "a" / "file.txt").st_mtime) == 1622548800
    sh("chmod", "640", f)
    assert os.stat(srv / "a" / "file.txt").st_mode & 0o777 == 0o640
    with open(f, "a") as fp:
        fp.write("second\n")
    assert (srv / "a" / "file.txt").read_text() == "first\nsecond\n"
    sh("truncate", "-s", "6", f)
    assert (srv / "a" / "file.txt").read_text() == "first\n"
    sh("ln", "-s", "file.txt", mnt / "a" / "link")
    assert os.readlink(srv / "a" / "link") == "file.txt"
    # a 200-file tree: tar in, rsync in, find, rm -r
    local = tmp_path / "tree"
    for i in range(200):
        p = local / f"d{i % 10}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(100 + i))
    sh("tar", "-cf", tmp_path / "t.tar", "-C", local, ".")
    (mnt / "untar").mkdir()
    sh("tar", "-xf", tmp_path / "t.tar", "-C", mnt / "untar")
    sh("rsync", "-a", f"{local}/", f"{mnt / 'synced'}/")
    for name in ("untar", "synced"):
        assert sh("find", srv / name, "-type", "f").count("\n") == 200
        assert sh("diff", "-r", local, srv / name) == ""
    assert sh("find", mnt / "synced", "-type", "f").count("\n") == 200
    sh("rm", "-r", mnt / "untar", mnt / "synced")
    assert not (srv / "untar").exists() and not (srv / "synced").exists()
    out = sh("df", "-P", mnt).splitlines()
    assert len(out) == 2 and int(out[1].split()[1]) > 0


def test_errors_and_acl(demo: Demo) -> None:
    mnt = demo.dir / "mnt" / "jive"
    r = subprocess.run(["cat", str(mnt / "tmp" / "missing")], capture_output=True, text=True)
    assert r.returncode == 1 and "No such file or directory" in r.stderr
    with pytest.raises(OSError) as exc:
        (mnt / "tmp" / "missing").read_bytes()
    assert exc.value.errno == errno.ENOENT
    assert "tmp" in os.listdir(mnt)  # 'list' on /
    with pytest.raises(PermissionError):  # but no 'write' outside /tmp
        (mnt / "not-allowed").write_text("x")
    assert not (demo.dir / "servers" / "jive" / "not-allowed").exists()


def test_server_side_file_shows_up(demo: Demo) -> None:
    mnt = demo.dir / "mnt" / "onsala" / "tmp"
    os.listdir(mnt)
    (demo.dir / "servers" / "onsala" / "tmp" / "from-server.txt").write_text("hi")
    wait_for(lambda: "from-server.txt" in os.listdir(mnt), 5, "server-side file in the listing")
    assert (mnt / "from-server.txt").read_text() == "hi"


def test_zz_sigint_exits_cleanly(demo: Demo) -> None:
    d = demo.dir
    assert demo.stop(signal.SIGINT) == 0, demo.output()
    for p in (d / "mnt" / ".etfs", d / "mnt" / "jive", d / "mnt" / "onsala"):
        assert not mounted(p)
    assert not (d / "mnt" / "daemon.json").exists()
    assert "nothing left mounted" in demo.output()
