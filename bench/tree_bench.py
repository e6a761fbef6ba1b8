#!/usr/bin/env python3
"""Trees of many files between two mounted servers: `cp -r` and `etfs cp -r` vs the same tree
through the client.

    python bench/tree_bench.py [--files 1000] [--size-kib 1024] [--runs 3] [--workdir DIR]

Two etfs-servers (jive, onsala) on loopback and one etfs mount of both (`tests/harness`).  A tree
of --files files of --size-kib each (10 directories) lies on jive.  Timed, --runs times each
(the destination tree is removed through the mount between runs; the source stays in jive's
page cache):

* ``cp -r /mnt/jive/tree /mnt/onsala/tree``: every file is one copy_file_range, which the mount
  turns into a server-to-server copy (no data byte through the client)
* ``etfs cp -r`` of the same tree (includes the command's Python start)
* through the client: ``tar -C SRC -cf - . | tar -C DST -xf -`` (every byte read from jive
  through the mount and written to onsala through it: what a filesystem without third-party
  copies does)

Prints files/s as median (min-max) and the ratios, and one JSON line.  Loopback: the client's
link is as fast as the servers', so "through the client" is the hardest reference there is; on
a real client link it is far slower.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.mount import make_env  # noqa: E402
from harness.process import PY, child_env  # noqa: E402
from harness.server import KEY  # noqa: E402


def make_tree(root: Path, files: int, size: int) -> None:
    for i in range(files):
        d = root / f"d{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i:05d}", "wb") as f:
            f.write(i.to_bytes(8, "big") + os.urandom(size - 8))


def read_all(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1000)
    p.add_argument("--size-kib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where exports live (default: $TMPDIR)")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="etfs-tree-bench-", dir=args.workdir))
    key = base / "bench.key"
    key.write_text(KEY)
    key.chmod(0o600)
    results: dict[str, list[float]] = {"cp -r": [], "etfs cp -r": [], "through client": []}
    try:
        with make_env(base, key) as env:
            src_export = env.export("jive") / "tmp" / "tree"
            make_tree(src_export, args.files, args.size_kib * 1024)
            src = env.dir("jive") / "tmp" / "tree"
            dst = env.dir("onsala") / "tmp" / "tree"

            def through_client() -> None:
                dst.mkdir()
                subprocess.run(
                    f"tar -C {src} -cf - . | tar -C {dst} -xf -",
                    shell=True,
                    check=True,
                    executable="/bin/bash",
                )

            commands = {
                "cp -r": lambda: subprocess.run(["cp", "-r", str(src), str(dst)], check=True),
                "etfs cp -r": lambda: subprocess.run(
                    [PY, "-m", "etfs.cli", "cp", "-q", "-r", str(src), str(dst)], check=True, env=child_env()
                ),
                "through client": through_client,
            }
            for _ in range(args.runs):
                for name, fn in commands.items():
                    shutil.rmtree(dst, ignore_errors=True)  # through the mount: its caches agree
                    read_all(src_export)  # jive's page cache, as for every run
                    t0 = time.perf_counter()
                    fn()
                    results[name].append(time.perf_counter() - t0)
                    n = sum(1 for q in (env.export("onsala") / "tmp" / "tree").rglob("*") if q.is_file())
                    if n != args.files:
                        raise SystemExit(f"{name}: {n} files arrived, expected {args.files}")
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rate = {k: [args.files / t for t in v] for k, v in results.items()}
    med = {k: statistics.median(v) for k, v in rate.items()}
    print(f"\n{args.files} files of {args.size_kib} KiB between two mounted servers, {args.runs} runs")
    for k, v in rate.items():
        print(f"  {k:<16} {med[k]:8.0f} files/s  ({min(v):.0f}-{max(v):.0f})")
    print(f"  cp -r / through client: {med['cp -r'] / med['through client']:.2f}x")
    print(f"  etfs cp -r / through client: {med['etfs cp -r'] / med['through client']:.2f}x")
    print(json.dumps({"tree_bench": {"files": args.files, "size_kib": args.size_kib, "files_per_s": rate}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
