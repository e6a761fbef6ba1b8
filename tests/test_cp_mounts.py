"""Plain `cp` and `mv` between two etfs mountpoints become server-to-server transfers.

Real servers, a real mount with bind-mounted per-server mountpoints, GNU cp/mv, strace.
The daemon's /proc/PID/io shows it moved (almost) no data; the transfer shows in
`etfs status`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness.mount import Env
from harness.process import PY, child_env, throttled, wait_for

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def random_file(path: Path, size: int, seed: int = 1) -> None:
    block = hashlib.sha256(str(seed).encode()).digest() * (1 << 15)  # 1 MiB pattern, seeded
    with open(path, "wb") as f:
        left = size
        i = 0
        while left > 0:
            chunk = (i.to_bytes(8, "big") + block)[: min(left, len(block))]
            f.write(chunk)
            left -= len(chunk)
            i += 1


def sparse_file(path: Path, size: int) -> None:
    """A sparse file with data at the start, the middle and the very end."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off in (0, size // 2, max(0, size - 4096)):
            f.seek(off)
            f.write(os.urandom(min(4096, size - off)))


def digest(path: Path) -> str:
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def daemon_io(e: Env) -> int:
    assert e.mount.proc is not None
    fields = dict(line.split(": ") for line in Path(f"/proc/{e.mount.proc.pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def status(e: Env) -> list[dict[str, object]]:
    out = subprocess.run(
        [PY, "-m", "etfs.cli", "status", "--json", "--mount", str(e.mount.root)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)["transfers"]  # type: ignore[no-any-return]


def transfers_to(e: Env, destination: str) -> list[dict[str, object]]:
    return [t for t in status(e) if t["destination"] == destination]


def test_cp_is_one_copy_file_range_and_no_client_data(etfs_env: Env, tmp_path: Path) -> None:
    e = etfs_env
    src = e.export("jive") / "tmp" / "big"
    random_file(src, 96 * 2**20 + 12345)
    before = daemon_io(e)
    trace = tmp_path / "strace.txt"
    subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-o",
            str(trace),
            "-e",
            "trace=copy_file_range,read,write",
            "cp",
            str(e.dir("jive") / "tmp" / "big"),
            str(e.dir("onsala") / "tmp") + "/",
        ],
        check=True,
        timeout=120,
    )
    moved = daemon_io(e) - before
    text = trace.read_text()
    calls = re.findall(r"copy_file_range\(.*\) = (\d+)", text)
    assert calls and int(calls[0]) == src.stat().st_size, text
    # cp read and wrote nothing of the two files itself (only its own libraries and locale files).
    mount_io = [
        ln for ln in text.splitlines() if re.search(r"\b(read|write)\(\d+<[^>]*/(jive|onsala)/tmp/", ln)
    ]
    assert not mount_io, mount_io
    assert digest(src) == digest(e.export("onsala") / "tmp" / "big")
    assert moved < 8 * 2**20, f"the daemon read+wrote {moved} bytes"
    [t] = transfers_to(e, "onsala:/tmp/big")[-1:]
    assert t["state"] == "done" and t["kind"] == "third-party"
    assert t["bytes_done"] == t["bytes_total"] == src.stat().st_size
    assert t["bytes_via_client"] == 0
    # The destination carries the transfer's digest and id.
    got = os.getxattr(e.dir("onsala") / "tmp" / "big", "user.etfs.digest").decode()
    assert got.startswith("xxh3-64-tree:")
    assert os.getxattr(e.dir("onsala") / "tmp" / "big", "user.etfs.transfer_id")
    # No part file or journal is left behind.
    assert sorted(p.name for p in (e.export("onsala") / "tmp").iterdir() if "etfs-part" in p.name) == []


def test_mv_between_mounts(etfs_env: Env) -> None:
    e = etfs_env
    src = e.export("jive") / "tmp" / "tomove"
    random_file(src, 64 * 2**20, seed=2)
    want = digest(src)
    proc = subprocess.run(
        ["mv", str(e.dir("jive") / "tmp" / "tomove"), str(e.dir("onsala") / "tmp")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert not src.exists()
    assert digest(e.export("onsala") / "tmp" / "tomove") == want


def test_zero_byte_and_small_and_sparse(etfs_env: Env) -> None:
    e = etfs_env
    sd = e.export("jive") / "tmp" / "mixed"
    sd.mkdir()
    (sd / "empty").write_bytes(b"")
    (sd / "one").write_bytes(b"x")
    random_file(sd / "block", 8 * 2**20, seed=3)
    sparse_file(sd / "sparse", 50 * 2**20)
    subprocess.run(
        ["cp", "-r", str(e.dir("jive") / "tmp" / "mixed"), str(e.dir("onsala") / "tmp")],
        check=True,
        timeout=120,
    )
    for name in ("empty", "one", "block", "sparse"):
        assert digest(e.export("onsala") / "tmp" / "mixed" / name) == digest(sd / name), name


def test_parallel_cp_with_xargs(etfs_env: Env) -> None:
    e = etfs_env
    sd = e.export("jive") / "tmp" / "many"
    sd.mkdir()
    for i in range(24):
        random_file(sd / f"f{i:02d}", (i * 97 + 1) * 4096, seed=i)
    dst = e.dir("onsala") / "tmp" / "many"
    dst.mkdir()
    cmd = f"cd {e.dir('jive') / 'tmp' / 'many'} && ls | xargs -P 6 -I{{}} cp {{}} {dst}/"
    subprocess.run(["sh", "-c", cmd], check=True, timeout=120)
    for i in range(24):
        assert digest(e.export("onsala") / "tmp" / "many" / f"f{i:02d}") == digest(sd / f"f{i:02d}")
    done = [t for t in status(e) if str(t["destination"]).startswith("onsala:/tmp/many/")]
    assert len(done) >= 24 and all(t["bytes_via_client"] == 0 for t in done)


def test_same_server_copy_stays_on_server(etfs_env: Env) -> None:
    e = etfs_env
    src = e.export("jive") / "tmp" / "local-src"
    random_file(src, 20 * 2**20, seed=5)
    before = daemon_io(e)
    subprocess.run(
        ["cp", str(e.dir("jive") / "tmp" / "local-src"), str(e.dir("jive") / "tmp" / "local-dst")],
        check=True,
        timeout=60,
    )
    assert daemon_io(e) - before < 4 * 2**20
    assert digest(e.export("jive") / "tmp" / "local-dst") == digest(src)
    [t] = transfers_to(e, "jive:/tmp/local-dst")
    assert t["kind"] == "local" and t["state"] == "done"


def test_ctrl_c_cancels_on_both_servers(etfs_env: Env) -> None:
    e = etfs_env
    dst = "onsala:/tmp/huge"
    src = e.export("jive") / "tmp" / "huge"
    sparse_file(src, 3 * 2**30)
    dst_final = e.export("onsala") / "tmp" / "huge"
    cp = subprocess.Popen(["cp", str(e.dir("jive") / "tmp" / "huge"), str(e.dir("onsala") / "tmp") + "/"])
    jive = e.servers["jive"].proc
    assert jive is not None
    try:
        with throttled(jive):  # so that the copy cannot finish before the SIGINT
            wait_for(lambda: any(t["state"] == "running" for t in transfers_to(e, dst)), 30, "running")
            t0 = time.monotonic()
            cp.send_signal(signal.SIGINT)
            cp.wait(20)
            # Typically ~10 ms; generous for a loaded CI machine (jive is being paused too).
            assert time.monotonic() - t0 < 5.0
    finally:
        if cp.poll() is None:
            cp.kill()
            cp.wait()
    assert cp.returncode != 0
    # The destination name never holds a full-size file; the transfer is cancelled.
    assert not dst_final.exists() or dst_final.stat().st_size < src.stat().st_size
    wait_for(lambda: transfers_to(e, dst)[-1]["state"] == "cancelled", 10, "cancelled")
    # The mount is still usable.
    assert (e.dir("jive") / "tmp").is_dir()
    os.unlink(src)


@pytest.mark.parametrize("size", [4 * 2**30, 4 * 2**30 + 2**20 + 17])
def test_four_gib_and_just_over(etfs_env: Env, size: int) -> None:
    """Opcode 47 replies are u32: the kernel splits these into several calls of one transfer."""
    e = etfs_env
    src = e.export("jive") / "tmp" / "four"
    sparse_file(src, size)
    dst = e.export("onsala") / "tmp" / "four"
    try:
        subprocess.run(
            ["cp", str(e.dir("jive") / "tmp" / "four"), str(e.dir("onsala") / "tmp") + "/"],
            check=True,
            timeout=300,
        )
        assert dst.stat().st_size == size
        assert digest(dst) == digest(src)
        ts = transfers_to(e, "onsala:/tmp/four")
        assert ts[-1]["state"] == "done" and ts[-1]["bytes_done"] == size
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def test_failed_transfer_gives_eio_and_resume_on_rerun(etfs_env: Env) -> None:
    """The source server dies mid-copy: cp fails with EIO, nothing complete-looking is left;
    the server comes back and the same cp resumes from the destination's journal."""
    e = etfs_env
    src = e.export("jive") / "tmp" / "resumable"
    random_file(src, 600 * 2**20, seed=7)
    want = digest(src)
    jive = e.servers["jive"]
    cp = subprocess.Popen(
        ["cp", str(e.dir("jive") / "tmp" / "resumable"), str(e.dir("onsala") / "tmp") + "/"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def progressed() -> bool:
            ts = transfers_to(e, "onsala:/tmp/resumable")
            return bool(ts) and 0 < int(str(ts[-1]["bytes_done"])) and ts[-1]["state"] == "running"

        assert jive.proc is not None
        with throttled(jive.proc):  # the source runs 10% of the time: the copy cannot finish first
            wait_for(progressed, 30, "transfer progress")
            [t] = transfers_to(e, "onsala:/tmp/resumable")[-1:]
            assert int(str(t["bytes_done"])) < int(str(t["bytes_total"])), t
            jive.kill()
        _, err = cp.communicate(timeout=60)
    finally:
        if cp.poll() is None:
            cp.kill()
            cp.wait()
        jive.restart()  # same control port: the mount reconnects
    assert cp.returncode != 0
    assert "Input/output error" in err
    dst = e.export("onsala") / "tmp" / "resumable"
    assert not dst.exists() or dst.stat().st_size < src.stat().st_size

    def jive_back() -> bool:
        try:
            return (e.dir("jive") / "tmp" / "resumable").stat().st_size > 0
        except OSError:
            return False

    wait_for(jive_back, 20, "the mount to reconnect to jive")
    subprocess.run(
        ["cp", str(e.dir("jive") / "tmp" / "resumable"), str(e.dir("onsala") / "tmp") + "/"],
        check=True,
        timeout=120,
    )
    assert digest(dst) == want
    log = e.servers["onsala"].log_path.read_text()
    assert re.search(r"resuming with \d+ of \d+ bytes already present", log), log[-2000:]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
