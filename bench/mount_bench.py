"""Benchmark the etfs mount against the export itself, libfuse's C `passthrough_ll` and sshfs.

    python bench/mount_bench.py [--size-mib 1024] [--files 10000] [--runs 3] [--workdir /var/tmp]
                                [--tests seq,small] [--no-sshfs] [--no-passthrough]

Starts its own etfs-server and etfs mount, and (see `bench/references.py`) a `passthrough_ll`
mount and an sshfs mount (over a loopback sshd) of the same export; all unmounted and stopped
by pid at the end.  Measures, --runs times each, and reports the median with min-max:

* sequential write of --size-mib (``dd bs=1M conv=fsync``: the time includes getting the data
  onto the server's disk)
* sequential read, warm (the source is in the server's page cache) and cold (``drop_caches``
  before each run; root only)
* ``cp -r`` of --files small files (1,000-4,000 bytes, 100 directories) into the mount, in
  files/s, and ``ls -lR`` of that tree (the first ``ls`` after the copy is timed, then the
  repeats: entry and attribute caches are warm for those, as they are for a user)
* the etfs daemon's RSS

Ratios compare etfs with each reference measured in the same run.  The machine may be shared
and noisy: look at the spread before trusting a ratio.  Ends with one JSON line.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from harness.mount import Mount, mount_servers, start_export_server  # noqa: E402
from harness.server import KEY, ServerProcess  # noqa: E402
from references import References  # noqa: E402


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@dataclass
class Result:
    test: str
    target: str
    unit: str  # "MiB/s", "files/s" (higher is better) or "s" (lower is better)
    median: float
    low: float
    high: float


def timed(fn: Callable[[], None], prepare: Callable[[], None] | None, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        if prepare:
            prepare()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="etfs-bench-", dir=args.workdir))
        self.server: ServerProcess | None = None
        self.mount: Mount | None = None
        self.refs: References | None = None
        self.results: list[Result] = []
        self.notes: list[str] = []

    def start(self) -> list[tuple[str, Path]]:
        key = self.dir / "bench.key"
        key.write_text(KEY)
        key.chmod(0o600)
        self.server = start_export_server(self.dir / "srv", "bench", key)
        self.export = self.server.export
        self.mount = mount_servers(self.dir, [self.server], key, mountpoints=False)
        targets = [("etfs", self.mount.root / "bench"), ("direct", self.export)]
        self.refs = References(self.dir, self.export)
        if not self.args.no_passthrough and (p := self.refs.passthrough_ll()):
            targets.append(("passthrough_ll", p))
        if not self.args.no_sshfs and (s := self.refs.sshfs()):
            targets.append(("sshfs", s))
        return targets

    def stop(self) -> None:
        if self.refs is not None:
            self.refs.stop()
        if self.mount is not None:
            self.mount.stop()
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def add(self, test: str, target: str, unit: str, times: list[float], amount: float = 1.0) -> None:
        values = [amount / t for t in times] if unit != "s" else times
        self.results.append(Result(test, target, unit, statistics.median(values), min(values), max(values)))

    # --- measurements -------------------------------------------------------------------------
    def seq(self, label: str, base: Path) -> None:
        size, runs = self.args.size_mib, self.args.runs
        dst = base / "seq.bin"

        def rm() -> None:
            # Through the mount under test: deleting behind its back would leave the kernel's
            # cached entry (entry_ttl) pointing at a file that is gone.
            dst.unlink(missing_ok=True)

        def write() -> None:
            run("dd", "if=/dev/zero", f"of={dst}", "bs=1M", f"count={size}", "conv=fsync", "status=none")

        self.add("seq write", label, "MiB/s", timed(write, rm, runs), size)
        src = self.export / "seq.bin"
        if not src.exists():
            write()

        def warm() -> None:
            run("dd", f"if={src}", "of=/dev/null", "bs=1M", "status=none")  # server's page cache

        def read() -> None:
            run("dd", f"if={dst}", "of=/dev/null", "bs=1M", "status=none")

        self.add("seq read, warm", label, "MiB/s", timed(read, warm, runs), size)
        if os.geteuid() == 0:
            self.add("seq read, cold", label, "MiB/s", timed(read, drop_caches, runs), size)
        rm()

    def small(self, label: str, base: Path, tree: Path) -> None:
        dst = base / "tree"
        files = self.args.files

        def rm() -> None:
            shutil.rmtree(dst, ignore_errors=True)

        def copy_and_list() -> tuple[float, float]:
            rm()
            t0 = time.perf_counter()
            run("cp", "-r", tree, dst)
            t1 = time.perf_counter()
            run("ls", "-lR", dst)
            return t1 - t0, time.perf_counter() - t1

        pairs = [copy_and_list() for _ in range(self.args.runs)]
        self.add(f"cp -r {files} files", label, "files/s", [c for c, _ in pairs], files)
        self.add(f"ls -lR {files} files, first", label, "s", [ls for _, ls in pairs])
        self.add(
            f"ls -lR {files} files, again",
            label,
            "s",
            timed(lambda: run("ls", "-lR", dst), None, self.args.runs),
        )
        rm()

    def make_tree(self) -> Path:
        tree = self.dir / "local-tree"
        for i in range(self.args.files):
            d = tree / f"d{i % 100}"
            if i < 100:
                d.mkdir(parents=True)
            (d / f"f{i}").write_bytes(os.urandom(1000 + i % 3000))
        return tree

    def daemon_rss_mib(self) -> float:
        try:
            assert self.mount is not None and self.mount.proc is not None
            for line in Path(f"/proc/{self.mount.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def report(self, targets: list[str]) -> None:
        by = {(r.test, r.target): r for r in self.results}
        refs = [t for t in targets if t != "etfs"]
        print(
            f"\netfs mount benchmark: median (min-max) of {self.args.runs} runs; "
            f"{self.args.size_mib} MiB sequential"
        )
        print(
            f"{'test':<32}"
            + "".join(f"{t:>24}" for t in targets)
            + "".join(f"{'etfs/' + t:>20}" for t in refs)
        )
        for test in dict.fromkeys(r.test for r in self.results):
            row = [by.get((test, t)) for t in targets]
            unit = next(r.unit for r in row if r)
            line = f"{test + ' (' + unit + ')':<32}"
            for r in row:
                cell = (
                    "-"
                    if r is None
                    else f"{r.median:.2f} ({r.low:.2f}-{r.high:.2f})"
                    if unit == "s"
                    else f"{r.median:.0f} ({r.low:.0f}-{r.high:.0f})"
                )
                line += f"{cell:>24}"
            e = by.get((test, "etfs"))
            for t in refs:
                r = by.get((test, t))
                # A ratio > 1 always means etfs is better (for times: reference time / etfs time).
                ratio = (
                    "-"
                    if e is None or r is None
                    else f"{(r.median / e.median if unit == 's' else e.median / r.median):.2f}x"
                )
                line += f"{ratio:>20}"
            print(line)
        print("(etfs/X > 1 means etfs is faster than X)")
        print(f"etfs daemon RSS: {self.daemon_rss_mib():.1f} MiB")
        notes = self.notes + (self.refs.notes if self.refs else [])
        for n in notes:
            print("note:", n)
        print(
            json.dumps(
                {
                    "mount_bench": [asdict(r) for r in self.results],
                    "notes": notes,
                    "daemon_rss_mib": self.daemon_rss_mib(),
                }
            )
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-sshfs", action="store_true")
    p.add_argument("--no-passthrough", action="store_true")
    p.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where the export lives (default: /var/tmp, on disk; /dev/shm: memory)",
    )
    p.add_argument(
        "--tests", default="seq,small", help="which parts: seq (sequential I/O), small (many files)"
    )
    args = p.parse_args()
    b = Bench(args)
    try:
        targets = b.start()
        parts = args.tests.split(",")
        if "seq" in parts:
            for label, base in targets:
                b.seq(label, base)
        if "small" in parts:
            tree = b.make_tree()
            for label, base in targets:
                if label != "direct":
                    b.small(label, base, tree)
        b.report([t for t, _ in targets])
    finally:
        b.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
