#!/usr/bin/env python3
"""etfs server-to-server transfers over an emulated long fat network: streams, congestion
control, socket buffers and block size, measured against the link's capacity.

Two namespaces joined by `bench/lfn/linkemu.c` (built with gcc at run time): the source
server in one, the destination server and the client in the other; every packet between
them crosses the emulated path (default 1 Gbit/s, 50 ms RTT, 0.01 % loss per packet each
way, a bandwidth-delay product of bottleneck buffer).  For every combination of
congestion control (--cc, set with server.yaml ``transfer.congestion_control``), buffers
(--buffers: ``auto`` = kernel autotuning within the namespaces' tcp_rmem/tcp_wmem as the
host has them; ``sysctl`` = those ceilings raised to --raised-mib in both namespaces;
``socket`` = server.yaml ``transfer.socket_buffer_mib: --raised-mib``) and block size, both
servers are started afresh and the client (`TransferEngine`, in the destination's
namespace) pulls one file with each stream count (--streams), --runs times in rotating
order.  Times cover ``engine.copy`` (control round trips over the path, data, fdatasync,
rename).  Before the matrix the path itself is checked: handshake RTT, and plain TCP
(Python sockets, no etfs) with the largest stream count, as a ceiling.

    python bench/lfn_bench.py [--size-mib 1024] [--runs 3]
        [--streams 1,2,4,8,16] [--cc cubic,bbr] [--buffers auto,sysctl] [--block-mib 4]
        [--rate-mbit 1000] [--rtt-ms 50] [--loss 0.0001] [--mtu 9000]

Prints medians with min/max (MB/s = 10^6 bytes/s) and the share of the link rate, the
emulator's CPU use (it shares the machine with both servers: a busy emulator bounds the
result), its drop counters, and one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import trio  # noqa: E402
from harness.linkemu import EmulatedLink, PathSpec, cpu_seconds, set_tcp_buffers, tcp_rate, tcp_rtt  # noqa: E402
from harness.netlab import NetLab, start_server, write_key  # noqa: E402
from harness.server import ServerProcess  # noqa: E402
from transfer_bench import make_source, median, print_record, timed_copies  # noqa: E402

from etfs.config import ClientConfig, ServerEntry, TransferDefaults  # noqa: E402
from etfs.protocol.transfer import BLOCK_SIZE, STREAMS  # noqa: E402

log = logging.getLogger(__name__)

MB = 1_000_000
MIB = 1 << 20
_groups = itertools.count(1)


def client_mode(spec_text: str) -> int:
    """Run in the destination's namespace: the copies of one group, seconds of each as JSON."""
    spec = json.loads(spec_text)
    key = Path(spec["key_file"])
    cfg = ClientConfig(
        file=Path(spec["work"]) / "m.yaml",
        root=Path(spec["work"]) / "mnt",
        servers={n: ServerEntry(n, ((h, p),), "tester", key, n) for n, (h, p) in spec["servers"].items()},
        transfer=TransferDefaults(block_size=spec["block"]),
        request_timeout=600.0,
    )
    print(json.dumps(trio.run(timed_copies, cfg, spec["jobs"], Path(spec["dst_export"]))))
    return 0


def run_group(
    lab: NetLab,
    link: EmulatedLink,
    work: Path,
    key: Path,
    size: int,
    transfer: dict[str, object],
    block: int,
    streams: list[int],
    runs: int,
) -> tuple[dict[int, list[float]], dict[str, float]]:
    """Start both servers with ``transfer`` settings, pull the file with each stream count ``runs`` times."""
    group = work / f"g{next(_groups)}"
    src = start_server(lab, link.ns_a, "src", group / "src", key, transfer=transfer)
    dst = start_server(lab, link.ns_b, "dst", group / "dst", key, transfer=transfer)
    servers: list[ServerProcess] = [src, dst]
    try:
        os.link(work / "source", src.export / "f")
        secs: dict[int, list[float]] = {n: [] for n in streams}
        before = {"emu": link.cpu_seconds(), **{s.name: cpu_seconds(s.pid) for s in servers}}
        drops0 = link.stats()["a_to_b"]
        t0 = time.perf_counter()
        for run in range(runs):
            order = streams[run % len(streams) :] + streams[: run % len(streams)]
            spec = {
                "servers": {"src": [link.addr_a, src.control_port], "dst": ["127.0.0.1", dst.control_port]},
                "key_file": str(key),
                "work": str(group),
                "dst_export": str(dst.export),
                "block": block,
                "jobs": [
                    {
                        "src": "src",
                        "dst": "dst",
                        "kw": {"streams": n, "direction": "pull", "policy": "always"},
                    }
                    for n in order
                ],
            }
            r = lab.run(link.ns_b, [sys.executable, __file__, "--client", json.dumps(spec)], timeout=3600)
            if r.returncode != 0:
                raise RuntimeError(f"client failed:\n{r.stderr[-3000:]}\nsrc log:\n{src.log()[-2000:]}")
            for n, s in zip(order, json.loads(r.stdout.strip().splitlines()[-1]), strict=True):
                secs[n].append(s)
        wall = time.perf_counter() - t0
        after = {"emu": link.cpu_seconds(), **{s.name: cpu_seconds(s.pid) for s in servers}}
        drops1 = link.stats()["a_to_b"]
        use = {k: (after[k] - before[k]) / wall for k in before}
        use["drop_loss"] = drops1["drop_loss"] - drops0["drop_loss"]
        use["drop_queue"] = drops1["drop_queue"] - drops0["drop_queue"]
        use["pkts"] = drops1["pkts_in"] - drops0["pkts_in"]
        return secs, use
    finally:
        for s in servers:
            s.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", default="1,2,4,8,16")
    p.add_argument(
        "--cc", default="cubic,bbr", help="congestion controls (transfer.congestion_control; host: not set)"
    )
    p.add_argument("--buffers", default="auto,sysctl", help="auto, sysctl and/or socket (see above)")
    p.add_argument("--raised-mib", type=int, default=64)
    p.add_argument("--block-mib", default=str(BLOCK_SIZE // MIB), help="block sizes, comma-separated")
    p.add_argument("--rate-mbit", type=float, default=1000)
    p.add_argument("--rtt-ms", type=float, default=50)
    p.add_argument("--loss", type=float, default=0.0001)
    p.add_argument("--mtu", type=int, default=9000)
    p.add_argument("--no-probe", action="store_true", help="skip the plain-TCP ceiling")
    p.add_argument(
        "--workdir", default="/var/tmp", help="where exports live (/dev/shm: take the disk out of it)"
    )
    p.add_argument("--client", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client:
        return client_mode(args.client)
    streams = [int(s) for s in args.streams.split(",")]
    ccs = args.cc.split(",")
    buffers = args.buffers.split(",")
    blocks = [int(b) * MIB for b in args.block_mib.split(",")]
    if bad := set(buffers) - {"auto", "sysctl", "socket"}:
        p.error(f"--buffers: unknown {', '.join(sorted(bad))} (auto, sysctl, socket)")
    spec = PathSpec(args.rate_mbit, args.rtt_ms, args.loss, args.mtu)
    size = args.size_mib * MIB
    record: dict[str, Any] = {
        "workdir": args.workdir,
        "bench": "lfn",
        "path": vars(spec),
        "size_mib": args.size_mib,
        "runs": args.runs,
    }
    started = time.perf_counter()
    # The lab (the emulator writes its counters into tmp until it is stopped) closes first.
    with tempfile.TemporaryDirectory(prefix="etfs-lfn-", dir=args.workdir) as tmp, NetLab() as lab:
        work = Path(tmp)
        key = write_key(work / "key")
        a, b = lab.namespace("src"), lab.namespace("dst")
        link = EmulatedLink(lab, a, b, spec).start(work)
        rtts = tcp_rtt(lab, b, link.addr_a, 5)
        sysctls = {k: lab.run(a, ["cat", f"/proc/sys/net/ipv4/{k}"]).stdout.strip()
                   for k in ("tcp_rmem", "tcp_wmem", "tcp_congestion_control")}  # fmt: skip
        print(
            f"path: {spec.rate_mbit:.0f} Mbit/s ({spec.bytes_per_s / MB:.0f} MB/s), RTT {spec.rtt_ms} ms "
            f"(handshakes: {median(rtts):.1f} ms median), loss {spec.loss:g}/packet each way, "
            f"MTU {spec.mtu}, "
            f"BDP {spec.bdp / MB:.2f} MB; {os.cpu_count()} CPUs\nnamespace defaults: {sysctls}",
            flush=True,
        )
        record["rtt_ms"] = rtts
        record["sysctl"] = sysctls
        make_source(work / "source", size)
        if not args.no_probe:
            raw = {}
            for cc in ccs:
                c0, t0 = link.cpu_seconds(), time.perf_counter()
                raw[cc] = tcp_rate(lab, a, b, link.addr_b, size, max(streams), None if cc == "host" else cc)
                emu = (link.cpu_seconds() - c0) / (time.perf_counter() - t0)
                print(
                    f"plain TCP x{max(streams)} {cc} (host buffers): {raw[cc] / MB:.1f} MB/s "
                    f"({raw[cc] / spec.bytes_per_s:.0%} of the link), emulator CPU {emu:.0%}",
                    flush=True,
                )
            record["plain_tcp"] = raw
        rows = []
        for buf, cc, block in itertools.product(buffers, ccs, blocks):
            # "host": no congestion_control in server.yaml, the namespace's default applies.
            transfer: dict[str, object] = {"congestion_control": cc} if cc != "host" else {}
            if buf == "sysctl":
                for ns in (a, b):
                    set_tcp_buffers(lab, ns, args.raised_mib * MIB)
            if buf == "socket":
                transfer["socket_buffer_mib"] = args.raised_mib
            secs, use = run_group(lab, link, work, key, size, transfer, block, streams, args.runs)
            if buf == "sysctl":  # back to the namespace defaults for the next group
                for ns in (a, b):
                    for k in ("tcp_rmem", "tcp_wmem"):
                        lab.run(ns, ["sysctl", "-qw", f"net.ipv4.{k}={sysctls[k]}"])
            for n in streams:
                rates = [size / s / MB for s in secs[n]]
                print(f"  x{n}: " + " ".join(f"{x:.1f}" for x in rates) + " MB/s", flush=True)
                row = {"buffers": buf, "cc": cc, "block_mib": block // MIB, "streams": n,
                       "median": round(median(rates), 1), "min": round(min(rates), 1),
                       "max": round(max(rates), 1),
                       "link": round(median(rates) * MB / spec.bytes_per_s, 3)}  # fmt: skip
                rows.append(row)
            print(
                f"group buffers={buf} cc={cc} block={block // MIB} MiB done: CPU emulator "
                f"{use['emu']:.0%}, src {use['src']:.0%}, dst {use['dst']:.0%} (of one core); "
                f"drops: random {use['drop_loss']:.0f}, queue {use['drop_queue']:.0f} "
                f"of {use['pkts']:.0f} packets",
                flush=True,
            )
            record.setdefault("cpu", []).append({"buffers": buf, "cc": cc, "block_mib": block // MIB, **use})
        record["rows"] = rows
    print()
    print(f"{args.size_mib} MiB pulls, {args.runs} runs each; default streams {STREAMS}")
    hdr = f"{'buffers':8} {'cc':6} {'block':>5} {'streams':>7} {'median MB/s':>11} {'min':>6} {'max':>6}"
    hdr += f" {'of link':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['buffers']:8} {r['cc']:6} {r['block_mib']:>5} {r['streams']:>7} {r['median']:>11.1f} "
            f"{r['min']:>6.1f} {r['max']:>6.1f} {r['link']:>7.0%}"
        )
    print_record(record, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
