"""Real-mount tests for etfs.copyrange: GNU cp between two bind mounts of one pyfuse3 mount.

The FUSE daemon (tests/copyrange_passthrough.py) runs in a subprocess so this process never imports
pyfuse3. Needs root, /dev/fuse, fusermount3, strace and GNU cp.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DAEMON = REPO / "tests" / "copyrange_passthrough.py"
BUILD = REPO / "etfs" / "copyrange" / "build.py"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount --bind)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(
        not all(shutil.which(t) for t in ("fusermount3", "strace", "cp", "mount", "umount")),
        reason="needs fusermount3, strace, cp, mount",
    ),
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("ETFS_CFR_TEST_MODE", None)
    return env


@pytest.fixture(scope="session")
def compiled_module() -> None:
    """Build the cffi module in place if no install provided it."""
    sys.path.insert(0, str(REPO))
    try:
        found = importlib.util.find_spec("etfs.copyrange._fusecfr") is not None
    finally:
        sys.path.remove(str(REPO))
    if not found:
        subprocess.run([sys.executable, str(BUILD)], check=True, cwd=REPO, capture_output=True)


@dataclass
class Mount:
    root: Path
    src: Path  # underlying directory (what the daemon serves)
    mnt: Path  # the FUSE mount
    x: Path  # bind mount of mnt/a
    y: Path  # bind mount of mnt/b
    events_path: Path
    stderr_path: Path
    daemon: subprocess.Popen[bytes]
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        lines = self.events_path.read_text().splitlines() if self.events_path.exists() else []
        evs = [json.loads(line) for line in lines if line.strip()]
        return [e for e in evs if kind is None or e["event"] == kind]

    def wait_event(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            evs = self.events(kind)
            if evs:
                return evs[0]
            if self.daemon.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"no {kind!r} event within {timeout}s; daemon stderr:\n{self.daemon_stderr()}")

    def daemon_stderr(self) -> str:
        return self.stderr_path.read_text() if self.stderr_path.exists() else ""

    def popen(self, argv: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.children.append(p)
        return p


def _run_quiet(argv: list[str]) -> None:
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=30)


def _is_mount(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _teardown(m: Mount) -> None:
    # cp may be blocked in the kernel until the daemon answers: signal it now, reap it last.
    for p in m.children:
        if p.poll() is None:
            p.kill()
    # Binds first: while they exist the superblock stays alive and the daemon never sees ENODEV.
    for bind in (m.x, m.y):
        if _is_mount(bind):
            _run_quiet(["umount", "-l", str(bind)])
    if _is_mount(m.mnt):
        _run_quiet(["fusermount3", "-u", "-z", str(m.mnt)])
    try:
        m.daemon.wait(timeout=5)
    except subprocess.TimeoutExpired:
        m.daemon.kill()  # by pid (Popen); closing /dev/fuse also aborts any pending request
        m.daemon.wait(timeout=10)
    for p in m.children:
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


@pytest.fixture
def make_mount(tmp_path: Path, compiled_module: None) -> Iterator[Callable[[str], Mount]]:
    mounts: list[Mount] = []

    def start(mode: str) -> Mount:
        root = tmp_path / f"m{len(mounts)}"
        src, mnt, x, y = root / "src", root / "mnt", root / "x", root / "y"
        for d in (src / "a", src / "b", mnt, x, y):
            d.mkdir(parents=True)
        events_path, stderr_path = root / "events.jsonl", root / "daemon.stderr"
        with open(stderr_path, "wb") as err:
            daemon = subprocess.Popen(
                [sys.executable, str(DAEMON), str(src), str(mnt), "--log", str(events_path), "--mode", mode],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_env(),
            )
        m = Mount(root, src, mnt, x, y, events_path, stderr_path, daemon)
        mounts.append(m)
        ready = m.wait_event("ready")
        assert ready["installed"], f"copy_file_range op not installed: {ready}"
        subprocess.run(["mount", "--bind", str(mnt / "a"), str(x)], check=True)
        subprocess.run(["mount", "--bind", str(mnt / "b"), str(y)], check=True)
        return m

    try:
        yield start
    finally:
        for m in mounts:
            _teardown(m)


def _random_file(path: Path, size: int) -> None:
    with open("/dev/urandom", "rb") as r, open(path, "wb") as w:
        left = size
        while left:
            chunk = r.read(min(left, 1 << 20))
            w.write(chunk)
            left -= len(chunk)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


_SYSCALL = re.compile(r"^(?:\[pid\s+)?\d*\]?\s*(\w+)\((\d+)<([^>]*)>.*\)\s+=\s+(-?\d+)")


def _trace_calls(trace: str) -> list[tuple[str, str, int]]:
    """(syscall, path of first fd, result) from `strace -f -y` output."""
    out = []
    for line in trace.splitlines():
        mt = _SYSCALL.match(line.strip())
        if mt:
            out.append((mt.group(1), mt.group(3), int(mt.group(4))))
    return out


SIZE = 50 * 1024 * 1024


def test_cp_between_binds_is_one_request(make_mount: Callable[[str], Mount], tmp_path: Path) -> None:
    m = make_mount("copy")
    _random_file(m.src / "a" / "f", SIZE)
    trace = tmp_path / "cp.strace"

    t0 = time.monotonic()
    r = subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-o",
            str(trace),
            "-e",
            "trace=copy_file_range,read,write",
            "cp",
            str(m.x / "f"),
            f"{m.y}/",
        ],
        capture_output=True,
        timeout=120,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr.decode()

    calls = _trace_calls(trace.read_text())
    ours = [c for c in calls if c[1].startswith((str(m.x), str(m.y), str(m.mnt)))]
    cfr = [c for c in ours if c[0] == "copy_file_range"]
    assert cfr and cfr[0][2] == SIZE, calls
    assert sum(c[2] for c in cfr) == SIZE
    data_rw = [c for c in ours if c[0] in ("read", "write")]
    assert not data_rw, f"cp read/wrote file data: {data_rw}"

    reqs = m.events("request")
    assert len(reqs) == 1, reqs
    assert reqs[0]["off_in"] == 0 and reqs[0]["off_out"] == 0 and reqs[0]["length"] >= SIZE
    replies = m.events("reply")
    assert replies == [{**replies[0], "count": SIZE}]
    # No data went through the daemon's read/write ops either (checked before we read via the mount).
    # FUSE_RELEASE is sent after close(2) has returned: wait for both.
    deadline = time.monotonic() + 10
    while len(releases := m.events("release")) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(releases) == 2 and all(e["reads"] == 0 and e["writes"] == 0 for e in releases), releases
    assert _sha256(m.src / "a" / "f") == _sha256(m.src / "b" / "f") == _sha256(m.y / "f")
    print(f"cp of {SIZE >> 20} MiB via one copy_file_range request: {elapsed * 1000:.1f} ms (under strace)")


def test_ctrl_c_interrupts_stalled_copy(make_mount: Callable[[str], Mount]) -> None:
    m = make_mount("stall")
    _random_file(m.src / "a" / "f", 1 << 20)
    cp = m.popen(["cp", str(m.x / "f"), f"{m.y}/"])
    req = m.wait_event("request")
    time.sleep(0.2)
    assert cp.poll() is None, "cp finished although the daemon stalls"

    t0 = time.monotonic()
    cp.send_signal(signal.SIGINT)
    cp.wait(timeout=10)
    elapsed = time.monotonic() - t0
    # Typically a few ms; the bound only has to tell "interrupted" from "stalled forever".
    assert elapsed < 5.0, f"cp took {elapsed:.2f}s to exit after SIGINT"
    assert cp.returncode in (-signal.SIGINT, 130), cp.returncode

    intr = m.wait_event("interrupt", timeout=2)
    assert intr["id"] == req["id"] and not intr["late"]
    assert m.events("reply") == [{**m.events("reply")[0], "id": req["id"], "error": "EINTR"}]
    print(
        f"cp exited {elapsed * 1000:.1f} ms after SIGINT; interrupt reached daemon "
        f"{(intr['t'] - req['t']) * 1000:.0f} ms after the request"
    )


def test_interrupt_before_registration(make_mount: Callable[[str], Mount]) -> None:
    # The daemon registers its interrupt callback 1.5 s after the request; SIGINT comes first.
    m = make_mount("late")
    _random_file(m.src / "a" / "f", 1 << 20)
    cp = m.popen(["cp", str(m.x / "f"), f"{m.y}/"])
    req = m.wait_event("request")
    t0 = time.monotonic()
    cp.send_signal(signal.SIGINT)
    cp.wait(timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 6.5, elapsed  # 1.5 s of it is the daemon's deliberate delay
    assert cp.returncode in (-signal.SIGINT, 130), cp.returncode
    intr = m.wait_event("interrupt", timeout=2)
    assert intr["id"] == req["id"] and intr["late"]
    assert [e["error"] for e in m.events("reply")] == ["EINTR"]


def test_eio_reply_makes_cp_fail(make_mount: Callable[[str], Mount]) -> None:
    m = make_mount("eio")
    _random_file(m.src / "a" / "f", 1 << 20)
    r = subprocess.run(["cp", str(m.x / "f"), f"{m.y}/"], capture_output=True, timeout=60)
    assert r.returncode != 0
    assert os.strerror(errno.EIO) in r.stderr.decode(), r.stderr.decode()
    assert len(m.events("request")) == 1


@pytest.mark.parametrize("mode", ["eopnotsupp", "enosys", "nohandler"])
def test_eopnotsupp_falls_back_to_kernel_copy(make_mount: Callable[[str], Mount], mode: str) -> None:
    m = make_mount(mode)
    _random_file(m.src / "a" / "f", 4 << 20)
    for name in ("f1", "f2"):
        r = subprocess.run(["cp", str(m.x / "f"), str(m.y / name)], capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert _sha256(m.src / "a" / "f") == _sha256(m.src / "b" / name)
    # ENOSYS must not have reached the kernel: the op is still enabled for the second cp.
    if mode != "nohandler":
        assert len(m.events("request")) == 2, m.events()
        asked = errno.errorcode[errno.EOPNOTSUPP if mode == "eopnotsupp" else errno.ENOSYS]
        assert [e["error"] for e in m.events("reply")] == [asked] * 2
    # The kernel's fallback moved the data through the daemon's read/write ops (FUSE_RELEASE
    # arrives after close(2) returned: wait for it).
    deadline = time.monotonic() + 10
    while not any(e["writes"] > 0 for e in m.events("release")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any(e["writes"] > 0 for e in m.events("release")), m.events()
    if mode == "enosys":
        assert "answering EOPNOTSUPP" in m.daemon_stderr()


def test_second_reply_is_refused(make_mount: Callable[[str], Mount]) -> None:
    m = make_mount("double")
    _random_file(m.src / "a" / "f", 1 << 20)
    r = subprocess.run(["cp", str(m.x / "f"), f"{m.y}/"], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert _sha256(m.src / "a" / "f") == _sha256(m.src / "b" / "f")
    m.wait_event("double_reply_refused", timeout=2)
    assert not m.events("double_reply_accepted")


def test_install_after_pyfuse3_import_is_refused(compiled_module: None) -> None:
    code = (
        "import pyfuse3\n"
        "from etfs import copyrange\n"
        "try:\n"
        "    copyrange.install()\n"
        "except copyrange.CopyRangeError as e:\n"
        "    print('refused:', e)\n"
        "else:\n"
        "    raise SystemExit('install() accepted a late call')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=_env(), timeout=60)
    assert r.returncode == 0 and b"refused:" in r.stdout, r.stdout + r.stderr


def test_status_before_init(compiled_module: None) -> None:
    code = (
        "from etfs import copyrange\n"
        "assert copyrange.status() is copyrange.Status.NOT_LOADED\n"
        "copyrange.install(); copyrange.install()\n"
        "assert copyrange.status() is copyrange.Status.NOT_CALLED, copyrange.status()\n"
        "assert not copyrange.installed()\n"
        "try:\n"
        "    copyrange.require_installed()\n"
        "except copyrange.CopyRangeError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('require_installed passed')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=_env(), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_fast_xattr_path_and_mount_life_cycle(tmp_path: Path) -> None:
    """With the getxattr fast path on: security.* answered ENODATA in C; after pyfuse3.close()
    programs still inside the mount get ENOTCONN at once; a second mount in one process works."""
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    try:
        r = subprocess.run(
            [sys.executable, str(REPO / "tests" / "fast_xattr_lifecycle.py"), str(src), str(mnt)],
            capture_output=True,
            text=True,
            timeout=90,
        )
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rounds = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rounds) == 2, r.stdout + r.stderr[-3000:]
    for rnd in rounds:
        assert rnd["stat"] == "5" and rnd["xattr"] == f"[{errno.ENODATA}]", rnd
        assert rnd["answered_in_c"] >= 200, rnd
        after = rnd["after_unmount"]
        assert after["errno"] in (str(errno.ENOTCONN), str(errno.ECONNABORTED)), rnd
        assert after["seconds"] < 1.0, rnd
