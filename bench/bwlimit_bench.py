#!/usr/bin/env python3
"""Bandwidth limits: how closely a limit holds, and what the limit code costs when no limit is set.

(a) Accuracy.  One source and one destination server of this tree on loopback; the client
(`TransferEngine`, in this process) copies a file worth about --seconds at each rate with
``bwlimit`` (what `etfs cp --bwlimit` sends), and once with the source's server.yaml cap
(``transfer.bwlimit_out``) instead.  Achieved rate = bytes / seconds of the whole copy
(capability, data, fdatasync, rename).

(b) Cost when off.  The same unlimited copy (--size-mib, 4 streams, verified) through
servers of this tree and through servers of a baseline revision (--baseline, default the
merge-base with main: the code before the limits), interleaved; also with a limit far above
what loopback moves (the paced path's own cost), and the raw loopback pair
(`bench/raw_pair.py`: sendfile -> splice over 4 sockets) as the ceiling.

    flock -o /tmp/etfs-heavy.lock python bench/bwlimit_bench.py [--runs 3] [--rates 4M,16M,64M,256M]
        [--seconds 2.5] [--size-mib 512] [--baseline REV]

Prints medians of --runs (MiB/s for limits, MB/s = 10^6 B/s for throughput) and one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trio  # noqa: E402

from etfs.common.ratelimit import format_rate, parse_rate  # noqa: E402
from etfs.protocol import auth  # noqa: E402


def load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


tb = load("transfer_bench")
MIB, MB = tb.MIB, tb.MB


def baseline_tree(rev: str, work: Path) -> Path:
    """The tree of ``rev`` under ``work``, with this tree's built native modules (unchanged C)."""
    out = work / "baseline"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    for so in (REPO / "etfs").rglob("*.so"):
        shutil.copy2(so, out / so.relative_to(REPO))
    return out


def copy_seconds(cfg: Any, src: str, dst: Any, **kw: Any) -> float:
    job = {"src": src, "dst": dst.name, "kw": {"streams": 4, "direction": "pull", "policy": "always", **kw}}
    [secs] = trio.run(tb.timed_copies, cfg, [job], dst.export)
    return float(secs)


def accuracy(args: argparse.Namespace, work: Path, key_file: Path) -> list[dict[str, Any]]:
    rates = [parse_rate(r) for r in args.rates.split(",")]
    cap_rate = rates[len(rates) // 2]
    src = tb.Server(work, "acc-src", key_file, "sendfile").start()
    # "NB": bytes (a bare number in server.yaml is KiB/s, as rsync reads it)
    capped = tb.Server(work, "acc-capped", key_file, "sendfile", transfer={"bwlimit_out": f"{cap_rate}B"})
    capped.start()
    dst = tb.Server(work, "acc-dst", key_file, "sendfile").start()
    rows: list[dict[str, Any]] = []
    try:
        cfg = tb.client_config(work, key_file, {s.name: ("127.0.0.1", s.port) for s in (src, capped, dst)})
        cases = [("cp --bwlimit", r, "acc-src") for r in rates] + [
            ("server bwlimit_out", cap_rate, "acc-capped")
        ]
        for what, rate, source in cases:
            size = max(16 * MIB, int(rate * args.seconds))
            tb.make_source(work / source / "export" / "f", size)
            kw = {"bwlimit": rate} if source == "acc-src" else {}
            got = []
            for _ in range(args.runs):
                got.append(size / copy_seconds(cfg, source, dst, **kw))
            med = tb.median(got)
            rows.append({"what": what, "limit": rate, "size": size, "median": med, "runs": got})
            print(
                f"{what:<19} {format_rate(rate):>10}: median {med / MIB:8.2f} MiB/s "
                f"({100 * (med / rate - 1):+5.1f}%), runs {', '.join(f'{g / MIB:.2f}' for g in got)}",
                flush=True,
            )
            os.unlink(work / source / "export" / "f")
    finally:
        for s in (src, capped, dst):
            s.stop()
    return rows


def cost_when_off(args: argparse.Namespace, work: Path, key_file: Path) -> dict[str, Any]:
    base = baseline_tree(args.baseline, work)
    size = args.size_mib * MIB
    raw = tb.load_raw_pair()
    servers = {
        "new": (
            tb.Server(work, "new-src", key_file, "sendfile"),
            tb.Server(work, "new-dst", key_file, "sendfile"),
        ),
        "old": (
            tb.Server(work, "old-src", key_file, "sendfile", root=base),
            tb.Server(work, "old-dst", key_file, "sendfile", root=base),
        ),
    }
    for pair in servers.values():
        for s in pair:
            s.start()
    results: dict[str, list[float]] = {
        "new, no limit": [],
        "baseline": [],
        "new, limit 100G": [],
        "raw pair": [],
    }
    try:
        all_servers = [s for pair in servers.values() for s in pair]
        cfg = tb.client_config(work, key_file, {s.name: ("127.0.0.1", s.port) for s in all_servers})
        print(f"creating {args.size_mib} MiB source ...", flush=True)
        tb.make_source(servers["new"][0].export / "f", size)
        os.link(servers["new"][0].export / "f", servers["old"][0].export / "f")
        cases: dict[str, Callable[[], float]] = {
            "new, no limit": lambda: copy_seconds(cfg, "new-src", servers["new"][1]),
            "baseline": lambda: copy_seconds(cfg, "old-src", servers["old"][1]),
            "new, limit 100G": lambda: copy_seconds(cfg, "new-src", servers["new"][1], bwlimit=100 << 30),
        }
        for run_case in cases.values():  # warm-up, untimed
            run_case()
        names = list(cases)
        for run in range(args.runs):
            order = names[run % len(names) :] + names[: run % len(names)]
            for name in order:
                results[name].append(size / cases[name]() / MB)
            raw_dst = str(work / "raw.out")
            s = raw.run_once(
                raw.Config("sendfile", "splice_recv", 4),
                str(servers["new"][0].export / "f"),
                raw_dst,
                size,
                4 * MIB,
            )
            os.unlink(raw_dst)
            results["raw pair"].append(size / s / MB)
            print(f"run {run + 1}/{args.runs} done", flush=True)
    finally:
        for pair in servers.values():
            for s in pair:
                s.stop()
    print()
    print(f"unlimited copies, {args.size_mib} MiB, 4 streams, verified; baseline {args.baseline}")
    ref = tb.median(results["baseline"])
    for name, xs in results.items():
        print(
            f"{name:<16} median {tb.median(xs):8.1f} MB/s  min {min(xs):7.1f}  max {max(xs):7.1f}  "
            f"vs baseline {tb.median(xs) / ref:5.2f}"
        )
    return {
        name: {"median": round(tb.median(xs), 1), "runs": [round(x, 1) for x in xs]}
        for name, xs in results.items()
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rates", default="4M,16M,64M,256M")
    p.add_argument("--seconds", type=float, default=2.5, help="how long each limited copy should take")
    p.add_argument("--size-mib", type=int, default=512, help="file size of the unlimited copies")
    p.add_argument("--baseline", help="git revision without the limits (default: merge-base with main)")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-cost", action="store_true")
    args = p.parse_args(argv)
    if args.baseline is None:
        args.baseline = subprocess.run(
            ["git", "-C", str(REPO), "merge-base", "HEAD", "main"], check=True, capture_output=True, text=True
        ).stdout.strip()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="etfs-bwlimit-bench-", dir="/var/tmp"))
    record: dict[str, Any] = {"bench": "bwlimit", "runs": args.runs, "cpus": os.cpu_count()}
    try:
        key_file = work / "u.key"
        key_file.write_text(auth.generate_key_text())
        if not args.no_accuracy:
            record["accuracy"] = [
                {"what": r["what"], "limit": r["limit"], "median_bps": round(r["median"])}
                for r in accuracy(args, work, key_file)
            ]
        if not args.no_cost:
            record["cost"] = cost_when_off(args, work, key_file)
            record["baseline"] = args.baseline
    finally:
        shutil.rmtree(work, ignore_errors=True)
    record["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(record, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
