"""Plain `cp` between mountpoints when the servers and the client sit in their own network namespaces.

Real ``etfs-server`` processes (``jive``, ``onsala``) each in a namespace, the mount daemon in a
third one (network only, via nsenter, so its FUSE mount is visible to this process and to GNU
`cp`), veth links client<->jive and client<->onsala, and optionally jive<->onsala:

* no route between the servers: ``third_party: auto`` relays through the daemon (`etfs status`:
  kind ``relay``, ``bytes_via_client`` == size); ``always`` fails `cp` with EIO and leaves no
  complete-looking file; the mount stays usable.
* a direct server link: `cp` is a third-party transfer, and the client's interfaces carry
  (almost) nothing of the file.
* unmounting while a large `cp` runs: `cp` fails promptly, nothing stays mounted, no
  complete-looking file at the destination name.

Addresses are 10.213.x.y, only inside the namespaces created here; everything (processes by
pid, mounts, namespaces) is removed at teardown, also on failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.mount import Mount
from harness.netlab import NetLab, ServerEntry, make_mount, netns_unavailable, start_server, write_key
from harness.process import child_env, wait_for
from harness.server import ServerProcess
from harness.transfers import make_file, sha256

MIB = 1 << 20

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None or shutil.which("nsenter") is None,
    reason="needs /dev/fuse, fusermount3 and nsenter",
)


def status(mount: Mount) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "etfs.cli", "status", "--json", "--mount", str(mount.root)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
        check=True,
    )
    transfers: list[dict[str, object]] = json.loads(out.stdout)["transfers"]
    return transfers


def transfers_to(mount: Mount, destination: str) -> list[dict[str, object]]:
    return [t for t in status(mount) if t["destination"] == destination]


@dataclass
class Topology:
    lab: NetLab
    client_ns: str
    client_ifs: list[str]
    jive: ServerProcess
    onsala: ServerProcess
    mount: Mount
    server_link: tuple[str, str] | None
    onsala_ns: str

    def src(self, name: str) -> Path:
        return self.jive.export / "tmp" / name

    def mp(self, server: str) -> Path:
        return self.mount.mountpoints[server]


@pytest.fixture
def lab() -> Iterator[NetLab]:
    reason = netns_unavailable()
    if reason and ("ermission" in reason or "not permitted" in reason):
        pytest.skip(reason)
    netlab = NetLab()
    try:
        yield netlab
    finally:
        netlab.cleanup()


def build(
    lab: NetLab,
    base: Path,
    *,
    server_link: bool,
    server_link_mbit: float | None = None,
    pairs: str = "",
) -> Topology:
    """jive, onsala and the client in three namespaces; client linked to both; maybe jive<->onsala."""
    key = write_key(base / "tester.key")
    cns, jns, ons = lab.namespace("cli"), lab.namespace("jive"), lab.namespace("ons")
    c1, _ = lab.link(cns, "10.213.1.1", jns, "10.213.1.2")
    c2, _ = lab.link(cns, "10.213.2.1", ons, "10.213.2.2")
    link = None
    if server_link:
        link = lab.link(jns, "10.213.3.1", ons, "10.213.3.2")
        if server_link_mbit:
            lab.shape(jns, link[0], server_link_mbit)
            lab.shape(ons, link[1], server_link_mbit)
    jive = start_server(lab, jns, "jive", base / "jive", key)
    onsala = start_server(lab, ons, "onsala", base / "onsala", key)
    entries = [
        ServerEntry(jive, "10.213.1.2", "10.213.3.1" if server_link else None),
        ServerEntry(onsala, "10.213.2.2", "10.213.3.2" if server_link else None),
    ]
    mount = make_mount(lab, cns, base / "client", entries, key, third_party="auto", extra=pairs)
    mount.start()  # stopped by the lab's cleanup, also when it fails to start
    return Topology(lab, cns, [c1, c2], jive, onsala, mount, link, ons)


def cp(src: Path, dst: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["cp", str(src), str(dst)], capture_output=True, text=True, timeout=timeout)


def no_full_file(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size < size
    except FileNotFoundError:
        return True


def test_no_server_route_auto_relays_always_fails(lab: NetLab, tmp_path: Path) -> None:
    pairs = "pairs:\n  - {source: onsala, destination: jive, third_party: always}\n"
    t = build(lab, tmp_path, server_link=False, pairs=pairs)
    size = 24 * MIB + 777
    want = make_file(t.src("relay.bin"), size)

    # auto (jive -> onsala): the servers cannot reach each other, the daemon relays.
    r = cp(t.mp("jive") / "tmp" / "relay.bin", t.mp("onsala") / "tmp" / "relay.bin")
    assert r.returncode == 0, r.stderr + t.mount.logs()
    assert sha256(t.onsala.export / "tmp" / "relay.bin") == want
    recs = transfers_to(t.mount, "onsala:/tmp/relay.bin")
    relay = [x for x in recs if x["kind"] == "relay"]
    assert len(relay) == 1, recs
    assert relay[0]["state"] == "done"
    assert relay[0]["bytes_via_client"] == relay[0]["bytes_total"] == size
    tried = [x for x in recs if x["kind"] == "third-party"]
    assert tried and tried[0]["bytes_via_client"] == 0, recs

    # always (onsala -> jive): no fallback; cp fails with EIO, nothing complete-looking is left.
    back = make_file(t.onsala.export / "tmp" / "back.bin", 8 * MIB, seed=2)
    r = cp(t.mp("onsala") / "tmp" / "back.bin", t.mp("jive") / "tmp" / "back.bin")
    assert r.returncode != 0
    assert "Input/output error" in r.stderr, r.stderr
    assert no_full_file(t.jive.export / "tmp" / "back.bin", 8 * MIB)
    assert not list((t.jive.export / "tmp").glob(".back.bin.etfs-part*"))
    [failed] = transfers_to(t.mount, "jive:/tmp/back.bin")
    assert failed["state"] == "failed" and failed["bytes_via_client"] == 0, failed

    # The mount is still usable: listings, a read, and another (relayed) cp.
    assert "relay.bin" in os.listdir(t.mp("onsala") / "tmp")
    with open(t.mp("onsala") / "tmp" / "back.bin", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == back
    r = cp(t.mp("jive") / "tmp" / "relay.bin", t.mp("onsala") / "tmp" / "relay2.bin")
    assert r.returncode == 0, r.stderr
    assert sha256(t.onsala.export / "tmp" / "relay2.bin") == want


def test_direct_server_link_goes_third_party(lab: NetLab, tmp_path: Path) -> None:
    t = build(lab, tmp_path, server_link=True)
    size = 64 * MIB
    want = make_file(t.src("big.bin"), size)
    before = lab.total_bytes(t.client_ns, t.client_ifs)
    r = cp(t.mp("jive") / "tmp" / "big.bin", t.mp("onsala") / "tmp" / "big.bin")
    assert r.returncode == 0, r.stderr + t.mount.logs()
    client_bytes = lab.total_bytes(t.client_ns, t.client_ifs) - before
    assert sha256(t.onsala.export / "tmp" / "big.bin") == want
    [rec] = transfers_to(t.mount, "onsala:/tmp/big.bin")
    assert rec["kind"] == "third-party" and rec["state"] == "done", rec
    assert rec["bytes_via_client"] == 0
    assert rec["bytes_done"] == size
    assert client_bytes < MIB, f"the client's links carried {client_bytes} bytes for a {size}-byte file"
    # And the server link did carry the file.
    assert t.server_link is not None
    rx, _tx = lab.counters(t.onsala_ns, t.server_link[1])
    assert rx >= size


@pytest.mark.parametrize("how", ["etfs-umount", "sigterm"])
def test_unmount_during_large_copy(lab: NetLab, tmp_path: Path, how: str) -> None:
    # A 200 Mbit server link: 192 MiB take ~8 s, long enough to unmount in the middle.
    t = build(lab, tmp_path, server_link=True, server_link_mbit=200)
    size = 192 * MIB
    make_file(t.src("huge.bin"), size)
    dst = t.onsala.export / "tmp" / "huge.bin"
    proc = subprocess.Popen(
        ["cp", str(t.mp("jive") / "tmp" / "huge.bin"), str(t.mp("onsala") / "tmp" / "huge.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def running() -> bool:
            recs = transfers_to(t.mount, "onsala:/tmp/huge.bin")
            return bool(recs) and int(recs[-1]["bytes_done"]) > 0  # type: ignore[call-overload]

        wait_for(running, 30, "the transfer to make progress")
        assert proc.poll() is None, "the copy finished before the unmount: make it larger"
        t0 = time.monotonic()
        if how == "etfs-umount":
            u = subprocess.run(
                [sys.executable, "-m", "etfs.cli", "umount", "-c", str(t.mount.config)],
                capture_output=True,
                text=True,
                timeout=60,
                env=child_env(),
            )
            assert u.returncode == 0, u.stderr
        else:
            assert t.mount.proc is not None
            t.mount.proc.terminate()
        _out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t0
        assert proc.returncode != 0, "cp succeeded although the mount went away"
        assert elapsed < 15, f"cp took {elapsed:.1f}s to fail"
        assert err.strip(), "cp failed silently"
        assert t.mount.proc is not None
        t.mount.proc.wait(30)
        wait_for(lambda: not t.mount.leftovers(), 15, "the mounts to go away")
        assert no_full_file(dst, size)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
