"""What the C side of the mount (copy_file_range hook, getxattr fast path) costs or buys ordinary I/O.

One command: ``python bench/copyrange_cost.py [--size-mib 512] [--files 2000] [--runs 5]``.
Starts one loopback `etfs-server` and mounts it three ways in turn: the default (hook and
getxattr fast path), ``ETFS_FAST_XATTR=0`` (hook only: every request goes through trio) and
``ETFS_COPYRANGE=0`` (neither: plain pyfuse3).  Through each it times sequential `dd`
writes and reads, `cp -r` of --files small files and `ls -lR` of them, alternating the
order, and prints medians and ratios against plain pyfuse3 (>1 is better for MiB/s, <1 is
better for seconds).  Everything it starts is stopped and unmounted at exit.
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
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="etfs-crcost-"))
    export = base / "export"
    (export / "tmp").mkdir(parents=True)
    key = base / "key"
    key.write_text("etfs-bench-key-NOT-A-SECRET-0123456789\n")
    key.chmod(0o600)
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
                "--run-as",
                "root",
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
        # name -> (ETFS_COPYRANGE, ETFS_FAST_XATTR)
        variants = {"default": ("1", "1"), "hook only": ("1", "0"), "plain pyfuse3": ("0", "0")}
        size = a.size_mib
        ops = ("write", "read", "cp -r", "ls -lR")
        results: dict[str, dict[str, list[float]]] = {v: {op: [] for op in ops} for v in variants}
        tree = base / "tree"
        for i in range(a.files):
            d = tree / f"d{i % 20}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i}").write_bytes(os.urandom(1000 + i % 3000))

        def timed(*cmd: str) -> float:
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - t0

        def one_mount(variant: str) -> dict[str, float]:
            # One mount at a time: two live mounts of one server disturbed each other.
            slug = variant.replace(" ", "-")
            root = base / slug / ".root"
            cfg = base / f"{slug}.yaml"
            cfg.write_text(
                f"root: {root}\nservers:\n  b:\n    address: 127.0.0.1:{port}\n    user: u\n"
                f"    key_file: {key}\n"
            )
            hook, fast = variants[variant]
            env = dict(os.environ, ETFS_COPYRANGE=hook, ETFS_FAST_XATTR=fast)
            p = subprocess.Popen(
                [PY, "-m", "etfs.cli", "mount", "-c", str(cfg), "-f"], env=env, stderr=subprocess.DEVNULL
            )
            roots[variant] = root
            try:
                wait_for(lambda: (root / "b" / "tmp").is_dir())
                f = root / "b" / "tmp" / f"f-{slug}"
                dd(["if=/dev/zero", f"of={f}", "bs=1M", "count=64"])  # warm up the daemon
                w = dd(["if=/dev/zero", f"of={f}", "bs=1M", f"count={size}", "conv=fsync"])
                subprocess.run(
                    ["cat", str(export / "tmp" / f"f-{slug}")], stdout=subprocess.DEVNULL, check=True
                )
                r = dd([f"if={f}", "of=/dev/null", "bs=1M"])
                os.unlink(f)
                dst = root / "b" / "tmp" / f"tree-{slug}"
                c = timed("cp", "-r", str(tree), str(dst))
                ls = timed("ls", "-lR", str(dst))
                subprocess.run(["rm", "-rf", str(export / "tmp" / f"tree-{slug}")], check=True)
                return {"write": size / w, "read": size / r, "cp -r": c, "ls -lR": ls}
            finally:
                subprocess.run(["fusermount3", "-u", "-z", str(root)], capture_output=True)
                p.terminate()
                p.wait(15)

        for run in range(a.runs):
            for variant in list(variants) if run % 2 else list(reversed(variants)):
                for op, v in one_mount(variant).items():
                    results[variant][op].append(v)
        out: dict[str, dict[str, float]] = {}
        print(
            f"through the mount, median of {a.runs} runs: dd {size} MiB (MiB/s), "
            f"cp -r / ls -lR of {a.files} files (s)"
        )
        print(f"  {'':8}" + "".join(f"{v:>16}" for v in variants) + "   ratios vs plain pyfuse3")
        for op in ops:
            med = {v: statistics.median(results[v][op]) for v in variants}
            ref = med["plain pyfuse3"]
            out[op] = {v: round(x, 3) for v, x in med.items()}
            ratios = "  ".join(f"{med[v] / ref:.3f}" for v in variants if v != "plain pyfuse3")
            print(f"  {op:8}" + "".join(f"{med[v]:16.2f}" for v in variants) + f"   {ratios}")
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
