"""Long fat networks: the path emulator (`bench/lfn/linkemu.c`) and an etfs transfer across it.

* The emulator itself: built with gcc, between two namespaces, a TCP handshake takes about
  the configured RTT and the measured datagram loss matches the configured fraction and
  the emulator's own counter.
* The data-connection TCP settings: `tune` sets TCP_CONGESTION and the buffers on a real socket.
* A ``cp`` between two servers' directories of a real mount, the servers in two namespaces
  joined by the emulated path (1 Gbit/s, 50 ms RTT, 0.01 % loss) and the client in a third:
  the file crosses the path (the emulator counted it), arrives whole, and the source's
  data connections ran the congestion control server.yaml asked for (seen with ``ss``).

Namespaces, the emulator and the servers belong to a `NetLab` removed in the fixture's
finalizer (also when a test fails); the session guard checks nothing is left.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.linkemu import EmulatedLink, EmulatorUnavailable, PathSpec, build, tcp_rtt, udp_loss
from harness.netlab import NetLab, ServerEntry, make_mount, netns_unavailable, start_server, write_key
from harness.transfers import make_file, sha256
from test_netns_mount import transfers_to

from etfs_server.tcptuning import tune

MIB = 1 << 20

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None or shutil.which("ss") is None,
        reason="needs /dev/fuse, fusermount3 and ss",
    ),
]


@pytest.fixture
def lab() -> Iterator[NetLab]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        build()
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    netlab = NetLab()
    try:
        yield netlab
    finally:
        netlab.cleanup()


def test_emulated_path_has_its_delay_and_loss(lab: NetLab, tmp_path: Path) -> None:
    a, b = lab.namespace("a"), lab.namespace("b")
    link = EmulatedLink(lab, a, b, PathSpec(rate_mbit=100, rtt_ms=50, loss=0.03, seed=7)).start(tmp_path)
    rtts = sorted(tcp_rtt(lab, a, link.addr_b, 5))
    # A handshake is one round trip (SYN there, RST back): both directions' delay, each once.
    assert 45 <= rtts[len(rtts) // 2] <= 90, rtts
    before = link.stats()
    count = 4000
    lost = udp_loss(lab, a, b, link.addr_b, count)
    assert 0.015 <= lost <= 0.05, f"{lost:.3%} of datagrams lost, 3% configured"
    # The loss is the emulator's doing: its counter saw (nearly) every missing datagram.
    # (Its stats file is rewritten every 200 ms; udp_loss waited longer than that.)
    dropped = link.stats()["a_to_b"]["drop_loss"] - before["a_to_b"]["drop_loss"]
    assert abs(dropped - round(lost * count)) <= 3, (dropped, lost * count)


def test_tune_sets_congestion_control_and_buffers() -> None:
    with socket.socket() as s:
        tune(s, "reno", 8 * MIB)
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == b"reno"
        # The kernel reports twice the size asked for (room for its bookkeeping).
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 8 * MIB
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 8 * MIB
    with socket.socket() as s:
        tune(s, "", 0)  # nothing asked: the kernel's defaults stay
        default = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode() == default


def test_cp_across_a_long_fat_network(lab: NetLab, tmp_path: Path) -> None:
    key = write_key(tmp_path / "tester.key")
    cns, jns, ons = lab.namespace("cli"), lab.namespace("jive"), lab.namespace("ons")
    lab.link(cns, "10.213.61.1", jns, "10.213.61.2")
    lab.link(cns, "10.213.62.1", ons, "10.213.62.2")
    link = EmulatedLink(lab, jns, ons, PathSpec(mtu=9000)).start(tmp_path)
    # reno is nobody's default: seeing it on the data connections proves server.yaml set it.
    transfer = {"congestion_control": "reno"}
    jive = start_server(lab, jns, "jive", tmp_path / "jive", key, transfer=transfer)
    onsala = start_server(lab, ons, "onsala", tmp_path / "onsala", key, transfer=transfer)
    entries = [
        ServerEntry(jive, "10.213.61.2", link.addr_a),
        ServerEntry(onsala, "10.213.62.2", link.addr_b),
    ]
    mount = make_mount(lab, cns, tmp_path / "client", entries, key, third_party="always")
    lab.finalizers.append(mount.stop)
    mount.start()

    size = 24 * MIB
    want = make_file(jive.export / "tmp" / "f.bin", size)
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        # Both ends of the data connections (the source accepted them, the destination opened
        # them), with their congestion control, from the first packet on.
        while not done.is_set():
            for ns, which in ((jns, "sport"), (ons, "dport")):
                flt = f"( {which} = :{jive.data_port} )"
                r = lab.run(ns, ["ss", "-tinH", "state", "all", "exclude", "listening", flt])
                seen.update(f"{ns}:{w}" for w in r.stdout.split() if w in ("reno", "cubic", "bbr"))
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        before = link.stats()["a_to_b"]["bytes_out"]
        src, dst = mount.mountpoints["jive"] / "tmp" / "f.bin", mount.mountpoints["onsala"] / "tmp" / "f.bin"
        r = subprocess.run(["cp", str(src), str(dst)], capture_output=True, text=True, timeout=90)
    finally:
        done.set()
        watcher.join()
    assert r.returncode == 0, r.stderr + mount.logs()
    assert sha256(onsala.export / "tmp" / "f.bin") == want
    [rec] = transfers_to(mount, "onsala:/tmp/f.bin")
    assert rec["kind"] == "third-party" and rec["state"] == "done", rec
    assert seen == {f"{jns}:reno", f"{ons}:reno"}, seen
    # Stats lag by up to 200 ms: wait for the emulator to have counted the file.
    deadline = 50
    while link.stats()["a_to_b"]["bytes_out"] - before < size and deadline:
        deadline -= 1
        threading.Event().wait(0.1)
    assert link.stats()["a_to_b"]["bytes_out"] - before >= size
