"""What the copy_file_range hook costs ordinary reads and writes through the mount.

One command: ``python bench/copyrange_cost.py [--size-mib 512] [--runs 5]``.  Starts one
loopback `etfs-server` and two mounts of it, one with the hook (the default) and one
with ``ETFS_COPYRANGE=0``; then alternates sequential `dd` writes and reads of the same
size through each, and prints medians and the ratio hooked/unhooked (1.00 = no cost).
Everything it starts is stopped and unmounted at exit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def wait_for(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.05)


def dd(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="etfs-crcost-"))
    export = base / "export"
    (export / "tmp").mkdir(parents=True)
    key = base / "key"
    key.write_text("etfs-bench-key-NOT-A-SECRET-0123456789\n")
    procs: list[subprocess.Popen[bytes]] = []
    roots: dict[str, Path] = {}
    try:
        pf = base / "ports"
        srv = subprocess.Popen(
            [
                PY,
                "-m",
                "etfs_server.main",
                "--name",
                "b",
                "--export",
                f"b={export}",
                "--user",
                f"u={key}",
                "--listen",
                "127.0.0.1:0",
                "--data-listen",
                "127.0.0.1:0",
                "--port-file",
                str(pf),
                "--state-dir",
                str(base / "state"),
            ],
            stderr=subprocess.DEVNULL,
        )
        procs.append(srv)
        wait_for(pf.exists)
        port = pf.read_text().split()[0]
        variants = {"hooked": "1", "unhooked": os.environ.get("ETFS_BENCH_B", "0")}
        size = a.size_mib
        results: dict[str, dict[str, list[float]]] = {v: {"write": [], "read": []} for v in variants}

        def one_mount(variant: str) -> tuple[float, float]:
            # One mount at a time: two live mounts of one server disturbed each other.
            root = base / variant / ".root"
            cfg = base / f"{variant}.yaml"
            cfg.write_text(
                f"root: {root}\nservers:\n  b:\n    address: 127.0.0.1:{port}\n    user: u\n"
                f"    key_file: {key}\n"
            )
            env = dict(os.environ, ETFS_COPYRANGE=variants[variant])
            p = subprocess.Popen(
                [PY, "-m", "etfs.cli", "mount", "-c", str(cfg), "-f"], env=env, stderr=subprocess.DEVNULL
            )
            roots[variant] = root
            try:
                wait_for(lambda: (root / "b" / "tmp").is_dir())
                f = root / "b" / "tmp" / f"f-{variant}"
                dd(["if=/dev/zero", f"of={f}", "bs=1M", "count=64"])  # warm up the daemon
                w = dd(["if=/dev/zero", f"of={f}", "bs=1M", f"count={size}", "conv=fsync"])
                subprocess.run(
                    ["cat", str(export / "tmp" / f"f-{variant}")], stdout=subprocess.DEVNULL, check=True
                )
                r = dd([f"if={f}", "of=/dev/null", "bs=1M"])
                os.unlink(f)
                return size / w, size / r
            finally:
                subprocess.run(["fusermount3", "-u", "-z", str(root)], capture_output=True)
                p.terminate()
                p.wait(15)

        for run in range(a.runs):
            for variant in list(variants) if run % 2 else list(reversed(variants)):
                w, r = one_mount(variant)
                results[variant]["write"].append(w)
                results[variant]["read"].append(r)
        out = {}
        print(f"sequential I/O through the mount, {size} MiB, median of {a.runs} runs (MiB/s)")
        for op in ("write", "read"):
            h = statistics.median(results["hooked"][op])
            u = statistics.median(results["unhooked"][op])
            out[op] = {"hooked": round(h), "unhooked": round(u), "ratio": round(h / u, 3)}
            print(f"  {op:5}: with hook {h:7.0f}   without {u:7.0f}   ratio {h / u:.3f}")
        print(json.dumps(out))
        return 0
    finally:
        for root in roots.values():
            subprocess.run(["fusermount3", "-u", "-z", str(root)], capture_output=True)
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    sys.exit(main())
