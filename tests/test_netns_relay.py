"""Issue 14 item 3: a relayed copy (servers that cannot reach each other) survives kill -9 of the
mount daemon: the remounted daemon resumes the relay's part file on the next `cp`, and no relay
file outlives it.

jive, onsala and the client in three network namespaces, no route between the servers, the
client's link to onsala capped at 100 Mbit/s so the relay is still running when it is killed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness.netlab import NetLab
from harness.process import child_env, wait_for
from harness.transfers import make_file, sha256
from test_netns_mount import (
    MIB,
    Topology,
    build,
    cp,
    lab,
    no_full_file,
    pytestmark,
    transfers_to,
)

__all__ = ["lab", "pytestmark"]  # fixture and skip marker, re-exported for pytest


def relay_files(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.glob(f".{name}.etfs-relay*"))


def relay_lab(lab: NetLab, base: Path, name: str, size: int, seed: int) -> tuple[Topology, str, Path]:
    """Servers that cannot reach each other, a 100 Mbit/s client -> onsala link, a source file:
    (topology, its sha256, onsala's tmp directory)."""
    t = build(lab, base, server_link=False)
    lab.shape(t.client_ns, t.client_ifs[1], 100)  # client -> onsala: ~12 MB/s
    return t, make_file(t.src(name), size, seed=seed), t.onsala.export / "tmp"


def test_kill9_mid_relay_then_remount_resumes_and_leaves_no_orphan(lab: NetLab, tmp_path: Path) -> None:
    size = 64 * MIB + 12345
    t, want, dst_dir = relay_lab(lab, tmp_path, "relay.bin", size, 5)
    proc = subprocess.Popen(
        ["cp", str(t.mp("jive") / "tmp" / "relay.bin"), str(t.mp("onsala") / "tmp" / "relay.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def halfway() -> bool:
            recs = [r for r in transfers_to(t.mount, "onsala:/tmp/relay.bin") if r["kind"] == "relay"]
            return bool(recs) and int(str(recs[-1]["bytes_done"])) >= size // 3

        wait_for(halfway, 60, "the relay to be a third through")
        assert t.mount.proc is not None
        t.mount.proc.kill()  # SIGKILL, by pid
        t.mount.proc.wait(10)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipes
    assert proc.returncode != 0
    assert no_full_file(dst_dir / "relay.bin", size)
    left = relay_files(dst_dir, "relay.bin")
    assert left == [".relay.bin.etfs-relay", ".relay.bin.etfs-relay.id"], left  # what the crash left

    t.mount.start()  # remount: the new daemon cleans the stale mount up
    # (measured now: writes the killed daemon had already sent may land after its death)
    have = (dst_dir / ".relay.bin.etfs-relay").stat().st_size
    assert 0 < have < size
    r = cp(t.mp("jive") / "tmp" / "relay.bin", t.mp("onsala") / "tmp" / "relay.bin")
    assert r.returncode == 0, r.stderr + t.mount.logs()
    assert sha256(dst_dir / "relay.bin") == want
    assert relay_files(dst_dir, "relay.bin") == []
    found = re.findall(r"resuming \S+ with (\d+) of (\d+) bytes", t.mount.log.read_text())
    assert found, t.mount.logs()
    kept = int(found[-1][0])
    [rec] = [r for r in transfers_to(t.mount, "onsala:/tmp/relay.bin") if r["kind"] == "relay"]
    print(
        f"killed with {have} of {size} bytes in the part file; resumed with {kept}; re-sent "
        f"{rec['bytes_via_client']} bytes ({int(str(rec['bytes_via_client'])) / size:.0%})"
    )
    assert kept > 0 and kept <= have
    assert rec["state"] == "done" and int(str(rec["bytes_via_client"])) == size - kept


def test_ctrl_c_on_etfs_cp_mid_relay_keeps_the_part_for_a_resume(lab: NetLab, tmp_path: Path) -> None:
    size = 48 * MIB + 777
    t, want, dst_dir = relay_lab(lab, tmp_path, "int.bin", size, 6)
    cmd = [
        sys.executable,
        "-m",
        "etfs.cli",
        "cp",
        "--mount",
        str(t.mount.root),
        "jive:/tmp/int.bin",
        "onsala:/tmp/",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=child_env())
    try:

        def moving() -> bool:
            recs = [r for r in transfers_to(t.mount, "onsala:/tmp/int.bin") if r["kind"] == "relay"]
            return bool(recs) and int(str(recs[-1]["bytes_done"])) >= size // 4

        wait_for(moving, 60, "the relay to move bytes")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes its pipes
    print(f"etfs cp (relay) exited {proc.returncode} {elapsed * 1000:.0f} ms after SIGINT")
    assert proc.returncode == 130, err
    assert elapsed < 5.0
    [rec] = [r for r in transfers_to(t.mount, "onsala:/tmp/int.bin") if r["kind"] == "relay"]
    assert rec["state"] == "cancelled" and rec["cancel_confirmed"] is True, rec
    assert not (dst_dir / "int.bin").exists()
    assert relay_files(dst_dir, "int.bin") == [".int.bin.etfs-relay", ".int.bin.etfs-relay.id"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert sha256(dst_dir / "int.bin") == want
    assert relay_files(dst_dir, "int.bin") == []
    relays = [r for r in transfers_to(t.mount, "onsala:/tmp/int.bin") if r["kind"] == "relay"]
    assert int(str(relays[-1]["bytes_via_client"])) < size  # resumed, not sent again
