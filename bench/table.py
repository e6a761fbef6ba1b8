#!/usr/bin/env python3
"""Every row of the speed table (issue 13) in one command, each against its reference measured
in the same run.

    python bench/table.py [--runs 3] [--quick] [--only transfer,mount,tree,lfn]

Runs, one after the other (never side by side: this machine has two cores):

* ``transfer``: `bench/transfer_bench.py` on /dev/shm: verified server-to-server copies with
  1, 4 and 8 streams vs the raw sendfile/read+send -> splice pair of the same stream count
* ``mount``: `bench/mount_bench.py` on /var/tmp (this machine's disk): sequential write and
  cold read vs libfuse's C ``passthrough_ll`` and sshfs; ``cp -r`` of 10,000 small files and
  ``ls -lR`` of them vs sshfs (see `bench/references.py` for how the references are built)
* ``tree``: `bench/tree_bench.py`: ``cp -r`` of 1,000 x 1 MiB files between two mounted servers
  vs the same tree through the client
* ``lfn``: `bench/lfn_bench.py`: 1 GiB over an emulated 1 Gbit/s, 50 ms, 0.01 % loss path with
  the default streams (and 1 stream beside it) vs the link's rate (root, network namespaces)

Each part prints its own detailed table (kept in the output); this script then prints one line
per row: etfs, the reference, the ratio, the goal, and the spread (min-max) of the runs behind
the etfs figure.  Medians of --runs runs.  --quick shrinks every size (a smoke run, not figures
to report).  Ends with one JSON line of all rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


@dataclass
class Row:
    what: str
    etfs: str
    reference: str
    ratio: float | None  # > 1: etfs better than the reference
    goal: str
    met: bool | None
    spread: str = ""


def run_part(script: str, args: list[str]) -> dict[str, Any]:
    """Run one benchmark, show its output as it comes, and return its last JSON line."""
    cmd = [sys.executable, str(BENCH / script), *args]
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    last: dict[str, Any] = {}
    for line in proc.stdout:
        print(line, end="", flush=True)
        if line.startswith("{"):
            try:
                last = json.loads(line)
            except ValueError:
                pass
    if proc.wait() != 0:
        raise SystemExit(f"{script} failed (exit {proc.returncode})")
    print(f"({script}: {time.monotonic() - t0:.0f} s)", flush=True)
    return last


def rated(
    what: str, etfs: str, reference: str, ratio: float, goal: float, spread: str, above: bool = False
) -> Row:
    """A row whose goal is ``ratio >= goal`` (``ratio > goal`` with ``above``)."""
    text = f"> {goal:g}x" if above else f">= {goal:g}"
    return Row(what, etfs, reference, ratio, text, ratio > goal if above else ratio >= goal, spread)


def transfer_rows(rec: dict[str, Any]) -> list[Row]:
    loop = rec["loopback"]
    raw = {(c["config"][0], c["config"][2]): c["median"] for c in loop["raw"]}
    rows = []
    for e in loop["etfs"]:
        ref = raw.get((e["sender"], e["streams"]))
        if e["verify"] and ref:
            what = f"verified copy, {e['sender']} x{e['streams']} (MB/s)"
            spread = f"{min(e['runs']):.0f}-{max(e['runs']):.0f}"
            rows.append(
                rated(what, f"{e['median']:.0f}", f"raw pair {ref:.0f}", e["median"] / ref, 0.9, spread)
            )
    return rows


def mount_rows(rec: dict[str, Any], files: int) -> list[Row]:
    by = {(r["test"], r["target"]): r for r in rec["mount_bench"]}
    rows = []

    def against(test: str, what: str, target: str, goal: float, above: bool = False) -> None:
        """etfs vs ``target`` in one test of mount_bench (``target`` "": vs the goal's number)."""
        e = by.get((test, "etfs"))
        r = by.get((test, target)) if target else None
        if e is None or (target and r is None):
            return
        seconds = e["unit"] == "s"
        fmt = "{:.2f}" if seconds else "{:.0f}"
        spread = f"{fmt.format(e['low'])}-{fmt.format(e['high'])}"
        if r is None:
            reference, ratio = f"goal {goal:,.0f} {e['unit']}", e["median"] / goal
            rows.append(
                Row(what, fmt.format(e["median"]), reference, ratio, f">= {goal:,.0f}", ratio >= 1, spread)
            )
            return
        # A ratio > 1 always means etfs is better (for times: reference time / etfs time).
        ratio = r["median"] / e["median"] if seconds else e["median"] / r["median"]
        reference = f"{target} {fmt.format(r['median'])}"
        rows.append(rated(what, fmt.format(e["median"]), reference, ratio, goal, spread, above))

    against("seq write", "sequential write (MiB/s)", "passthrough_ll", 0.70)
    against("seq write", "sequential write (MiB/s)", "sshfs", 3)
    against("seq read, cold", "sequential cold read (MiB/s)", "passthrough_ll", 0.80)
    small = f"cp -r {files} small files in (files/s)"
    against(f"cp -r {files} files", small, "", 2500)
    against(f"cp -r {files} files", small, "sshfs", 3)
    for which in ("first", "again"):
        against(
            f"ls -lR {files} files, {which}", f"ls -lR {files} files, {which} (s)", "sshfs", 1, above=True
        )
    return rows


def tree_rows(rec: dict[str, Any]) -> list[Row]:
    t = rec["tree_bench"]
    rate = t["files_per_s"]
    med = {k: statistics.median(v) for k, v in rate.items()}
    through = med["through client"]
    rows = []
    for name in ("cp -r", "etfs cp -r"):
        sp = f"{min(rate[name]):.0f}-{max(rate[name]):.0f}"
        what = f"{name} {t['files']} x {t['size_kib']} KiB between mounts (files/s)"
        value = f"{med[name]:.0f}"
        rows.append(Row(what, value, "goal 200 files/s", med[name] / 200, ">= 200", med[name] >= 200, sp))
        rows.append(
            rated(what, value, f"through the client {through:.0f}", med[name] / through, 1, sp, above=True)
        )
    return rows


def lfn_rows(rec: dict[str, Any], default_streams: int) -> list[Row]:
    rows = []
    for r in rec.get("rows", []):
        what = f"{rec['size_mib']} MiB over 1 Gbit/s, 50 ms, 0.01 % loss, x{r['streams']} (MB/s)"
        spread = f"{r['min']:.1f}-{r['max']:.1f}"
        if r["streams"] == default_streams:
            rows.append(rated(what, f"{r['median']:.1f}", "link 125.0", r["link"], 0.9, spread))
        else:
            rows.append(Row(what, f"{r['median']:.1f}", "link 125.0", r["link"], "(beside it)", None, spread))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the whole table")
    p.add_argument("--only", default="transfer,mount,tree,lfn")
    args = p.parse_args()
    parts = set(args.only.split(","))
    runs = ["--runs", str(args.runs)]
    q = args.quick
    rows: list[Row] = []
    t0 = time.monotonic()
    if "transfer" in parts:
        size = "64" if q else "1024"
        rec = run_part(
            "transfer_bench.py",
            ["--size-mib", size, *runs, "--streams", "1,4,8", "--no-shaped", "--workdir", "/dev/shm"],
        )
        rows += transfer_rows(rec)
    if "mount" in parts:
        files = 500 if q else 10_000
        size = "64" if q else "1024"
        rec = run_part(
            "mount_bench.py", ["--size-mib", size, "--files", str(files), *runs, "--workdir", "/var/tmp"]
        )
        rows += mount_rows(rec, files)
    if "tree" in parts:
        tree_files = "50" if q else "1000"
        rec = run_part(
            "tree_bench.py", ["--files", tree_files, "--size-kib", "1024", *runs, "--workdir", "/dev/shm"]
        )
        rows += tree_rows(rec)
    if "lfn" in parts:
        size = "128" if q else "1024"
        rec = run_part(
            "lfn_bench.py",
            [
                "--size-mib",
                size,
                *runs,
                "--streams",
                "1,4",
                "--cc",
                "host",
                "--buffers",
                "auto",
                "--no-probe",
                "--workdir",
                "/dev/shm",
            ],
        )
        rows += lfn_rows(rec, 4)
    print(
        f"\nissue 13 table: medians of {args.runs} runs{' (QUICK: smoke sizes)' if q else ''}, "
        f"{(time.monotonic() - t0) / 60:.0f} min"
    )
    hdr = f"{'row':<58}{'etfs':>9}  {'reference':<28}{'ratio':>7}  {'goal':<14}{'met':<5}{'etfs spread':>14}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        print(f"{r.what:<58}{r.etfs:>9}  {r.reference:<28}{ratio:>7}  {r.goal:<14}{met:<5}{r.spread:>14}")
    print(json.dumps({"table": [asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
