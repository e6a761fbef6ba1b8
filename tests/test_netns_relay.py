"""Issue 14 item 3: a relayed copy (servers that cannot reach each other) survives kill -9 of the
mount daemon: the remounted daemon resumes the relay's part file on the next `cp`, and no relay
file outlives it.

jive, onsala and the client in three network namespaces, no route between the servers, the
client's link to onsala capped at 100 Mbit/s so the relay is still running when it is killed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from netns import NetLab, poll
from test_netns_mount import MIB, build, cp, lab, make_file, no_full_file, pytestmark, sha256, transfers_to

__all__ = ["lab", "pytestmark"]  # fixture and skip marker, re-exported for pytest


def relay_files(directory: Path, name: str) -> list[str]:
    return sorted(p.name for p in directory.glob(f".{name}.etfs-relay*"))


def test_kill9_mid_relay_then_remount_resumes_and_leaves_no_orphan(lab: NetLab, tmp_path: Path) -> None:
    t = build(lab, tmp_path, server_link=False)
    lab.shape(t.client_ns, t.client_ifs[1], 100)  # client -> onsala: ~12 MB/s
    size = 64 * MIB + 12345
    want = make_file(t.src("relay.bin"), size, seed=5)
    dst_dir = t.onsala.export / "tmp"
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

        poll(halfway, 60, "the relay to be a third through", interval=0.1)
        assert t.mount.proc is not None
        t.mount.proc.kill()  # SIGKILL, by pid
        t.mount.proc.wait(10)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode != 0
    assert no_full_file(dst_dir / "relay.bin", size)
    left = relay_files(dst_dir, "relay.bin")
    assert left == [".relay.bin.etfs-relay", ".relay.bin.etfs-relay.id"], left  # what the crash left
    have = (dst_dir / ".relay.bin.etfs-relay").stat().st_size
    assert 0 < have < size

    t.mount.start()  # remount: the new daemon cleans the stale mount up
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
