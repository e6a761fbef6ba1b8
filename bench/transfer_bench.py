#!/usr/bin/env python3
"""Server-to-server copy benchmark: etfs transfers vs the raw data path, and per-flow-capped links.

Part 1 (loopback): three real etfs servers (source with ``sender: read_send``, source with
``sender: sendfile``, one destination); the client (`TransferEngine`, in this process)
copies one file with 1/4/8 streams, with and without verification, from each source.
In the same run, `bench/raw_pair.py`'s `run_once` moves the same file over N loopback
sockets (read_send->splice_recv and sendfile->splice_recv, the ends etfs uses), the ceiling.
Timing covers ``engine.copy`` (capability, start, data, fdatasync, rename): etfs copies
include an fdatasync, the raw pair does not.  Server peak RSS (VmHWM) is read at the end.

Part 2 (shaped, needs root and ``ip netns``): the source and destination servers in two
namespaces joined by a veth pair whose source-side egress has one htb class per
destination port (the destination's ephemeral port range is narrowed to match), each
capped at --flow-mbit: every TCP flow is capped, so N streams should go ~N times faster.
The client runs with ``ip netns exec`` in the destination's namespace.

    python bench/transfer_bench.py [--size-mib 512] [--runs 3] [--streams 1,4,8] [--block-mib 8]
                                   [--flow-mbit 100] [--shaped-size-mib 48] [--no-shaped]

Prints medians (MB/s, 10^6 bytes/s), ratios to the raw pair with the same stream count,
and one JSON line.  The machine may be shared: look at min/max before trusting a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402
import yaml  # noqa: E402

from etfs.client import Pool  # noqa: E402
from etfs.config import ClientConfig, ServerEntry, TransferDefaults  # noqa: E402
from etfs.protocol import auth  # noqa: E402
from etfs.transfer.engine import TransferEngine  # noqa: E402

MB = 1_000_000
MIB = 1 << 20
BLOCK = 8 * MIB
PORT_BASE = 40000
PORTS = 64


def load_raw_pair() -> Any:
    spec = importlib.util.spec_from_file_location("raw_pair", REPO / "bench" / "raw_pair.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["raw_pair"] = mod
    spec.loader.exec_module(mod)
    return mod


# --- servers -------------------------------------------------------------------------------------------
class Server:
    def __init__(
        self,
        base: Path,
        name: str,
        key_file: Path,
        sender: str,
        prefix: tuple[str, ...] = (),
        transfer: dict[str, Any] | None = None,
        root: Path = REPO,
    ):
        """``transfer``: more server.yaml `transfer:` keys; ``root``: the source tree to run."""
        self.name = name
        self.root = root
        self.dir = base / name
        self.export = self.dir / "export"
        self.export.mkdir(parents=True)
        self.config = self.dir / "server.yaml"
        doc = {
            "name": name,
            "listen": "127.0.0.1:0",
            "state_dir": str(self.dir / "state"),
            "run_as": "root",
            "users": {"u": {"key_file": str(key_file)}},
            "exports": {"d": {"path": str(self.export), "acl": [{"who": "u", "path": "/", "rights": "all"}]}},
            "transfer": {"sender": sender, **(transfer or {})},
        }
        self.config.write_text(yaml.safe_dump(doc))
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = self.data_port = 0

    def start(self, listen: str = "127.0.0.1:0", data_listen: str = "127.0.0.1:0") -> Server:
        pf = self.dir / "ports"
        env = dict(os.environ, PYTHONPATH=str(self.root))
        cmd = [*self.prefix, sys.executable, "-m", "etfs_server.main", "-c", str(self.config)]
        cmd += ["--listen", listen, "--data-listen", data_listen, "--port-file", str(pf)]
        with (self.dir / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        deadline = time.monotonic() + 15
        while not pf.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"server {self.name} did not start: {(self.dir / 'server.log').read_text()}"
                )
            time.sleep(0.02)
        self.port, self.data_port = map(int, pf.read_text().split())
        return self

    def hwm_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def client_config(
    base: Path, key_file: Path, servers: dict[str, tuple[str, int]], block: int = BLOCK
) -> ClientConfig:
    return ClientConfig(
        file=base / "m.yaml",
        root=base / "mnt",
        servers={n: ServerEntry(n, (addr,), "u", key_file, "d") for n, addr in servers.items()},
        transfer=TransferDefaults(block_size=block),
        request_timeout=120.0,
    )


async def timed_copies(cfg: ClientConfig, jobs: list[dict[str, Any]], dst_export: Path) -> list[float]:
    """Run copies one after the other; seconds for each; the destination file is removed after each."""
    out = []
    async with trio.open_nursery() as nursery:
        pool = Pool(cfg, nursery)
        engine = TransferEngine(pool, cfg)
        for job in jobs:
            t0 = time.perf_counter()
            t = await engine.copy(job["src"], "/f", job["dst"], "/out", **job["kw"])
            secs = time.perf_counter() - t0
            if t.state != "done" or t.kind != "third-party":
                raise RuntimeError(f"copy {job}: {t}")
            os.unlink(dst_export / "out")
            out.append(secs)
        await pool.aclose()
        nursery.cancel_scope.cancel()
    return out


def make_source(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("wb") as f:
        for i in range(0, size, MIB):
            chunk = hashlib.shake_256(str(i).encode()).digest(min(MIB, size - i))
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def print_record(record: dict[str, Any], started: float) -> None:
    """The run's total time, then the whole record as one JSON line (the benchmarks' last lines)."""
    record["total_s"] = round(time.perf_counter() - started, 1)
    print(f"\ntotal {record['total_s']:.0f} s")
    print(json.dumps(record, separators=(",", ":")))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --- part 1: loopback ----------------------------------------------------------------------------------
def loopback(args: argparse.Namespace, work: Path, key_file: Path) -> dict[str, Any]:
    size = args.size_mib * MIB
    streams = [int(s) for s in args.streams.split(",")]
    raw = load_raw_pair()
    src_rs = Server(work, "src-rs", key_file, "read_send").start()
    src_sf = Server(work, "src-sf", key_file, "sendfile").start()
    dst = Server(work, "dst", key_file, "read_send").start()
    servers = [src_rs, src_sf, dst]
    try:
        print(f"creating {args.size_mib} MiB source ...", flush=True)
        make_source(src_rs.export / "f", size)
        os.link(src_rs.export / "f", src_sf.export / "f")
        cfg = client_config(
            work, key_file, {s.name: ("127.0.0.1", s.port) for s in servers}, args.block_mib * MIB
        )
        configs = [
            (sender, n, verify)
            for sender in ("read_send", "sendfile")
            for n in streams
            for verify in (True, False)
        ]
        results: dict[tuple[str, int, bool], list[float]] = {c: [] for c in configs}
        # The same ends as the etfs copies: the destination server receives with splice (its
        # default), the source sends with the configuration's sender.
        raw_cfgs = [(s, "splice_recv", n) for n in streams for s in ("read_send", "sendfile")]
        raw_results: dict[tuple[str, str, int], list[float]] = {c: [] for c in raw_cfgs}
        src_path = str(src_rs.export / "f")
        raw_dst = str(work / "raw.out")

        def job(c: tuple[str, int, bool]) -> dict[str, Any]:
            sender, n, verify = c
            return {
                "src": "src-rs" if sender == "read_send" else "src-sf",
                "dst": "dst",
                "kw": {"streams": n, "verify": verify, "direction": "pull", "policy": "always"},
            }

        print("warm-up (untimed) ...", flush=True)
        trio.run(timed_copies, cfg, [job(configs[0])], dst.export)
        for run in range(args.runs):
            k = run % len(configs)
            order = configs[k:] + configs[:k]
            secs = trio.run(timed_copies, cfg, [job(c) for c in order], dst.export)
            for c, sec in zip(order, secs, strict=True):
                results[c].append(size / sec / MB)
            for rc in raw_cfgs:
                # durable: etfs commits with fdatasync before its rename; so does the reference
                took = raw.run_once(
                    raw.Config(*rc), src_path, raw_dst, size, args.block_mib * MIB, durable=True
                )
                os.unlink(raw_dst)
                raw_results[rc].append(size / took / MB)
            print(f"run {run + 1}/{args.runs} done", flush=True)
        hwm = {s.name: s.hwm_kib() for s in servers}
    finally:
        for s in servers:
            s.stop()
    print()
    print(
        f"loopback: {args.size_mib} MiB, {args.runs} runs, block {args.block_mib} MiB, {os.cpu_count()} CPUs"
    )
    hdr = f"{'config':44} {'median MB/s':>11} {'min':>6} {'max':>6} {'vs raw':>7}"
    print(hdr)
    print("-" * len(hdr))
    for rc in raw_cfgs:
        r = raw_results[rc]
        print(
            f"{'raw ' + rc[0] + '->' + rc[1] + ' x' + str(rc[2]):44} "
            f"{median(r):>11.0f} {min(r):>6.0f} {max(r):>6.0f}"
        )
    for c in configs:
        sender, n, verify = c
        r = results[c]
        base = median(raw_results[(sender, "splice_recv", n)])
        name = f"etfs {sender} x{n} {'verify' if verify else 'no-verify'}"
        print(f"{name:44} {median(r):>11.0f} {min(r):>6.0f} {max(r):>6.0f} {median(r) / base:>7.2f}")
    one = median(results[("read_send", streams[0], True)])
    for n in streams[1:]:
        print(
            f"streams x{n} / x{streams[0]} (read_send, verify): "
            f"{median(results[('read_send', n, True)]) / one:.2f}"
        )
    print("server peak RSS (VmHWM): " + ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in hwm.items()))
    return {
        "etfs": [
            {
                "sender": c[0],
                "streams": c[1],
                "verify": c[2],
                "median": round(median(v), 1),
                "runs": [round(x) for x in v],
            }
            for c, v in results.items()
        ],
        "raw": [{"config": list(c), "median": round(median(v), 1)} for c, v in raw_results.items()],
        "vm_hwm_kib": hwm,
    }


# --- part 2: per-flow-capped link between namespaces -----------------------------------------------
def ip(*a: str) -> None:
    subprocess.run(["ip", *a], check=True, capture_output=True)


@contextlib.contextmanager
def namespaces(tag: str) -> Iterator[tuple[str, str, str]]:
    a, b = f"etfsb-{tag}-a", f"etfsb-{tag}-b"
    va, vb = f"vb{tag}a", f"vb{tag}b"
    made: list[str] = []
    try:
        for ns in (a, b):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", va, "type", "veth", "peer", "name", vb)
        ip("link", "set", va, "netns", a)
        ip("link", "set", vb, "netns", b)
        ip("-n", a, "addr", "add", "10.202.0.1/24", "dev", va)
        ip("-n", b, "addr", "add", "10.202.0.2/24", "dev", vb)
        ip("-n", a, "link", "set", va, "up")
        ip("-n", b, "link", "set", vb, "up")
        yield a, b, va
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def shape(ns: str, dev: str, mbit: int) -> None:
    """One htb class per destination port PORT_BASE..+PORTS on the source's egress, each ``mbit``."""
    lines = [f"qdisc add dev {dev} root handle 1: htb default 999 r2q 1000"]
    lines.append(f"class add dev {dev} parent 1: classid 1:999 htb rate 10gbit")
    for i in range(PORTS):
        lines.append(f"class add dev {dev} parent 1: classid 1:{i + 1} htb rate {mbit}mbit ceil {mbit}mbit")
        lines.append(
            f"filter add dev {dev} parent 1: protocol ip prio 1 u32 match ip dport {PORT_BASE + i} 0xffff "
            f"flowid 1:{i + 1}"
        )
    subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "-batch", "-"],
        input="\n".join(lines) + "\n",
        text=True,
        check=True,
        capture_output=True,
    )


def shaped(args: argparse.Namespace, work: Path, key_file: Path) -> dict[str, Any] | None:
    probe = subprocess.run(["ip", "netns", "add", f"etfsb-probe-{os.getpid()}"], capture_output=True)
    if probe.returncode != 0:
        print("shaped part skipped: 'ip netns add' not permitted")
        return None
    subprocess.run(["ip", "netns", "del", f"etfsb-probe-{os.getpid()}"], capture_output=True)
    size = args.shaped_size_mib * MIB
    streams = [int(s) for s in args.streams.split(",")]
    results: dict[int, list[float]] = {n: [] for n in streams}
    with namespaces(secrets.token_hex(2)) as (a, b, va):
        shape(a, va, args.flow_mbit)
        # The destination's data connections (and the client's) get ports inside the shaped range.
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                b,
                "sysctl",
                "-q",
                "-w",
                f"net.ipv4.ip_local_port_range={PORT_BASE} {PORT_BASE + PORTS - 1}",
            ],
            check=True,
            capture_output=True,
        )
        sdir = work / "shaped"
        src = Server(sdir, "src", key_file, "read_send", ("ip", "netns", "exec", a)).start(
            "0.0.0.0:7070", "0.0.0.0:7071"
        )
        dst = Server(sdir, "dst", key_file, "read_send", ("ip", "netns", "exec", b)).start(
            "0.0.0.0:7070", "0.0.0.0:7071"
        )
        try:
            make_source(src.export / "f", size)
            spec = {
                "servers": {"src": ["10.202.0.1", 7070], "dst": ["127.0.0.1", 7070]},
                "key_file": str(key_file),
                "work": str(sdir),
                "dst_export": str(dst.export),
                "jobs": [],
                "block": MIB,  # small blocks: every stream gets work even in a small file
            }
            for run in range(args.runs):
                order = streams[run % len(streams) :] + streams[: run % len(streams)]
                spec["jobs"] = [
                    {
                        "src": "src",
                        "dst": "dst",
                        "kw": {"streams": n, "direction": "pull", "policy": "always"},
                    }
                    for n in order
                ]
                out = subprocess.run(
                    ["ip", "netns", "exec", b, sys.executable, __file__, "--client", json.dumps(spec)],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=600,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"shaped client failed: {out.stderr[-3000:]}")
                secs = json.loads(out.stdout.strip().splitlines()[-1])
                for n, s in zip(order, secs, strict=True):
                    results[n].append(size / s / MB)
                print(f"shaped run {run + 1}/{args.runs} done", flush=True)
        finally:
            src.stop()
            dst.stop()
    cap = args.flow_mbit * 1e6 / 8 / MB
    print()
    print(
        f"shaped: veth between namespaces, htb cap {args.flow_mbit} mbit ({cap:.1f} MB/s) per flow, "
        f"{args.shaped_size_mib} MiB, {args.runs} runs"
    )
    hdr = (
        f"{'streams':>7} {'median MB/s':>11} {'min':>6} {'max':>6} {'x one flow cap':>14} {'vs 1 stream':>11}"
    )
    print(hdr)
    print("-" * len(hdr))
    one = median(results[streams[0]])
    for n in streams:
        r = results[n]
        print(
            f"{n:>7} {median(r):>11.1f} {min(r):>6.1f} {max(r):>6.1f} "
            f"{median(r) / cap:>14.2f} {median(r) / one:>11.2f}"
        )
    return {"flow_mbit": args.flow_mbit, "results": {n: round(median(v), 2) for n, v in results.items()}}


def client_mode(spec_text: str) -> int:
    spec = json.loads(spec_text)
    cfg = client_config(
        Path(spec["work"]),
        Path(spec["key_file"]),
        {n: (h, p) for n, (h, p) in spec["servers"].items()},
        spec["block"],
    )
    secs = trio.run(timed_copies, cfg, spec["jobs"], Path(spec["dst_export"]))
    print(json.dumps(secs))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", default="1,4,8")
    p.add_argument("--block-mib", type=int, default=BLOCK // MIB, help="loopback part (servers default to 4)")
    p.add_argument("--flow-mbit", type=int, default=100)
    p.add_argument("--shaped-size-mib", type=int, default=48)
    p.add_argument("--no-shaped", action="store_true")
    p.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where source and destination files live (/dev/shm: memory, no disk in the way)",
    )
    p.add_argument("--client", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client_mode(args.client)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="etfs-transfer-bench-", dir=args.workdir))
    try:
        key_file = work / "u.key"
        key_file.write_text(auth.generate_key_text())
        key_file.chmod(0o600)
        record: dict[str, Any] = {
            "bench": "transfer",
            "size_mib": args.size_mib,
            "block_mib": args.block_mib,
            "runs": args.runs,
            "cpus": os.cpu_count(),
            "unit": "MB/s",
        }
        record["loopback"] = loopback(args, work, key_file)
        if not args.no_shaped:
            record["shaped"] = shaped(args, work, key_file)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_record(record, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
