"""An emulated long fat network between two namespaces, for tests and benchmarks.

netem is not available here (no sch_netem), so `bench/lfn/linkemu.c` plays the path: one
TUN device in each namespace, every packet carried from one to the other through a
bottleneck queue drained at the link rate, a propagation delay and Bernoulli loss (see the
C file).  `EmulatedLink` builds it with gcc (once per source version, into a cache
directory outside the repository), starts it for a `NetLab`'s two namespaces, addresses
the point-to-point devices, and reads its counters and CPU time.  The emulator is one of
the lab's processes, so `NetLab.cleanup` stops it (by pid); its devices vanish with it.

Probes of the path itself (no ping here): `tcp_rtt` times TCP handshakes, `udp_loss` sends
numbered datagrams one way and counts what arrives, `tcp_rate` pushes bytes through one or
more plain TCP connections (the ceiling an etfs transfer is compared with).

Nothing here imports pytest, so `bench/` can use it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netlab import NetLab
from .process import REPO, wait_for

log = logging.getLogger(__name__)


SOURCE = REPO / "bench" / "lfn" / "linkemu.c"


class EmulatorUnavailable(RuntimeError):
    """No compiler or no /dev/net/tun: callers skip, not fail."""


def build() -> Path:
    """The emulator binary, compiled from `SOURCE` unless this version was built before."""
    text = SOURCE.read_bytes()
    digest = hashlib.sha256(text).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"etfs-linkemu-{digest}" / "linkemu"
    if out.exists():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise EmulatorUnavailable("no C compiler (gcc/cc) to build bench/lfn/linkemu.c")
    if not os.path.exists("/dev/net/tun"):
        raise EmulatorUnavailable("/dev/net/tun is missing")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}")  # concurrent builders each rename a whole file
    r = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building {SOURCE.name} failed:\n{r.stderr}")
    tmp.rename(out)
    return out


@dataclass(frozen=True)
class PathSpec:
    """What the emulated path looks like (both directions alike)."""

    rate_mbit: float = 1000.0
    rtt_ms: float = 50.0
    loss: float = 0.0001  # per packet, each direction
    mtu: int = 1500
    queue_bytes: int = 0  # bottleneck buffer; 0: one bandwidth-delay product
    seed: int = 1

    @property
    def bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8

    @property
    def bdp(self) -> int:
        return int(self.bytes_per_s * self.rtt_ms / 1000)


@dataclass
class EmulatedLink:
    """The emulator between ``ns_a`` (address ``addr_a``) and ``ns_b`` (``addr_b``)."""

    lab: NetLab
    ns_a: str
    ns_b: str
    spec: PathSpec = field(default_factory=PathSpec)
    addr_a: str = "10.213.50.1"
    addr_b: str = "10.213.50.2"
    stats_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self, workdir: Path, timeout: float = 10) -> EmulatedLink:
        binary = build()
        n = len(self.lab.procs)
        dev_a, dev_b = f"t{self.lab.tag}l{n}a", f"t{self.lab.tag}l{n}b"
        self.stats_file = workdir / f"linkemu-{n}.json"
        s = self.spec
        cmd = [
            str(binary),
            "--ns-a", f"/run/netns/{self.ns_a}", "--dev-a", dev_a,
            "--ns-b", f"/run/netns/{self.ns_b}", "--dev-b", dev_b,
            "--rate-mbit", str(s.rate_mbit), "--delay-ms", str(s.rtt_ms / 2),
            "--loss", repr(s.loss), "--queue-bytes", str(s.queue_bytes),
            "--seed", str(s.seed), "--mtu", str(s.mtu), "--stats", str(self.stats_file),
        ]  # fmt: skip
        # Started from the root namespace: it enters each namespace itself to make its devices.
        errors = workdir / f"linkemu-{n}.log"
        with errors.open("wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        self.lab.procs.append(proc)
        self.proc = proc
        assert proc.stdout is not None
        with proc.stdout:
            line = proc.stdout.readline()  # "ready" once both devices exist, EOF if it failed
        if line.strip() != b"ready":
            proc.wait(5)
            raise RuntimeError(f"linkemu did not start: {errors.read_text().strip() or line!r}")
        for ns, dev, here, there in ((self.ns_a, dev_a, self.addr_a, self.addr_b),
                                     (self.ns_b, dev_b, self.addr_b, self.addr_a)):  # fmt: skip
            ip = ["ip", "-n", ns]
            for args in (["addr", "add", here, "peer", there, "dev", dev],
                         ["link", "set", dev, "mtu", str(s.mtu), "txqueuelen", "10000", "up"]):  # fmt: skip
                subprocess.run([*ip, *args], check=True, capture_output=True)
        wait_for(lambda: self.stats_file is not None and self.stats_file.exists(), timeout, "linkemu stats")
        return self

    def stats(self) -> dict[str, Any]:
        """The emulator's counters (rewritten every 200 ms, so up to that old)."""
        assert self.stats_file is not None
        result: dict[str, Any] = json.loads(self.stats_file.read_text())
        return result

    def cpu_seconds(self) -> float:
        """User + system CPU time the emulator has used so far."""
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- probes, run inside a namespace as small Python programs ---------------------------------------
_RTT = """
import socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(n):
    t = time.perf_counter()
    try:
        socket.create_connection((host, 9), timeout=5).close()
    except ConnectionRefusedError:
        pass  # the RST came back: one round trip
    out.append((time.perf_counter() - t) * 1000)
print(" ".join(f"{x:.3f}" for x in out))
"""

_UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
seen = set()
try:
    while True:
        seen.add(int(s.recv(64)))
except TimeoutError:
    pass
print(len(seen))
"""

_UDP_SOURCE = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(str(i).encode(), (sys.argv[1], int(sys.argv[2])))
    if i % 200 == 199:
        time.sleep(0.002)  # stay far below the link rate: only random loss should drop
"""


def tcp_rtt(lab: NetLab, ns: str, host: str, count: int = 5) -> list[float]:
    """Milliseconds of ``count`` TCP handshakes (to a closed port: SYN out, RST back) from ``ns``."""
    r = lab.run(ns, [sys.executable, "-c", _RTT, host, str(count)])
    if r.returncode != 0:
        raise RuntimeError(f"rtt probe failed: {r.stderr.strip()}")
    return [float(x) for x in r.stdout.split()]


def _sink_and_source(
    lab: NetLab, ns_to: str, sink: list[str], ns_from: str, source: list[str], timeout: float
) -> tuple[str, str]:
    """Run the program ``sink`` in ``ns_to`` until it says "listening", then ``source`` in
    ``ns_from``; the output of each (the sink's once it ended)."""
    proc = subprocess.Popen(
        [*lab.prefix(ns_to), sys.executable, "-c", *sink], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "listening":
            raise RuntimeError("probe sink did not start")
        r = lab.run(ns_from, [sys.executable, "-c", *source], timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"probe source failed: {r.stderr.strip()}")
        return r.stdout, proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def udp_loss(lab: NetLab, ns_from: str, ns_to: str, host: str, count: int, port: int = 5999) -> float:
    """Fraction of ``count`` datagrams from ``ns_from`` to ``host`` in ``ns_to`` that never arrived."""
    sink = [_UDP_SINK, host, str(port), "1.5"]
    _, got = _sink_and_source(lab, ns_to, sink, ns_from, [_UDP_SOURCE, host, str(port), str(count)], 60)
    return 1 - int(got.split()[-1]) / count


_TCP_SINK = """
import socket, sys, threading
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ls = socket.create_server((host, port))
print("listening", flush=True)
def drain(c):
    buf = bytearray(1 << 20)
    while c.recv_into(buf):
        pass
    c.close()
threads = [threading.Thread(target=drain, args=(ls.accept()[0],)) for _ in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""

_TCP_SOURCE = """
import socket, sys, threading, time
host, port, n, total, cc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
socks = []
for _ in range(n):
    s = socket.socket()
    if cc != "-":
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    s.connect((host, port))
    socks.append(s)
buf = b"x" * (1 << 20)
def push(s, nbytes):
    while nbytes > 0:
        nbytes -= s.send(buf[: min(len(buf), nbytes)])
    s.shutdown(socket.SHUT_WR)
    s.recv(1)  # the sink closes once it has everything
t = time.perf_counter()
threads = [threading.Thread(target=push, args=(s, total // n)) for s in socks]
for th in threads:
    th.start()
for th in threads:
    th.join()
print(time.perf_counter() - t)
"""


def tcp_rate(
    lab: NetLab, ns_from: str, ns_to: str, host: str, total: int, streams: int = 1,
    cc: str | None = None, port: int = 5998,
) -> float:  # fmt: skip
    """Bytes/s of ``total`` bytes pushed over ``streams`` plain TCP connections from ``ns_from``."""
    sink = [_TCP_SINK, host, str(port), str(streams)]
    source = [_TCP_SOURCE, host, str(port), str(streams), str(total), cc or "-"]
    secs, _ = _sink_and_source(lab, ns_to, sink, ns_from, source, 600)
    return (total // streams * streams) / float(secs.split()[-1])


def set_tcp_buffers(lab: NetLab, ns: str, max_bytes: int) -> None:
    """Raise the autotuning ceilings ``net.ipv4.tcp_rmem/wmem`` inside ``ns`` (per namespace)."""
    for key in ("tcp_rmem", "tcp_wmem"):
        current = lab.run(ns, ["cat", f"/proc/sys/net/ipv4/{key}"]).stdout.split()
        value = f"{current[0]} {current[1]} {max_bytes}"
        r = lab.run(ns, ["sysctl", "-qw", f"net.ipv4.{key}={value}"])
        if r.returncode != 0:
            raise RuntimeError(f"sysctl net.ipv4.{key} in {ns}: {r.stderr.strip()}")
