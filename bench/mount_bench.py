"""Benchmark the etfs mount against the export itself and against sshfs (one command).

    python bench/mount_bench.py [--size-mib 1024] [--files 10000] [--runs 3] [--no-sshfs]

Starts its own etfs-server, etfs mount and (unless --no-sshfs) an OpenSSH sshd on a free
loopback port with a temporary host key and authorized key plus an sshfs mount of the same
export; all stopped by pid at the end.  Reports medians of --runs runs:

* sequential write and read of --size-mib through etfs, directly on the export, through sshfs
* ``cp -r`` of --files small files into the mount and ``ls -lR`` of that tree (etfs vs sshfs)
* the etfs daemon's RSS

Reads are from the server's page cache (the source is read once before each timed run);
destinations are deleted (not truncated) before each run.  The machines are shared and noisy:
compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.mount import Mount, force_unmount, mount_servers, start_export_server  # noqa: E402
from harness.process import stop_pid, wait_for  # noqa: E402
from harness.server import KEY, ServerProcess  # noqa: E402


def run(*cmd: str | Path, quiet: bool = True) -> None:
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL if quiet else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(fn: Callable[[], None], prepare: Callable[[], None] | None, runs: int) -> float:
    times = []
    for _ in range(runs):
        if prepare:
            prepare()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = Path(tempfile.mkdtemp(prefix="etfs-bench-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []
        self.server: ServerProcess | None = None
        self.mount: Mount | None = None
        self.results: list[tuple[str, str, float]] = []
        self.notes: list[str] = []

    # --- setup ------------------------------------------------------------------------------
    def start_etfs(self) -> None:
        key = self.dir / "bench.key"
        key.write_text(KEY)
        key.chmod(0o600)
        self.server = start_export_server(self.dir / "srv", "bench", key)
        self.export = self.server.export
        self.mount = mount_servers(self.dir, [self.server], key, mountpoints=False)
        self.root = self.mount.root
        self.etfs = self.root / "bench"

    def start_sshfs(self) -> bool:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not (os.path.exists(sshd) and shutil.which("sshfs") and shutil.which("ssh-keygen")):
            self.notes.append("sshfs comparison skipped: sshd, sshfs or ssh-keygen missing")
            return False
        d = self.dir / "ssh"
        d.mkdir(mode=0o700)
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host_key")
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "user_key")
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        os.chmod(d / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        port = free_port()
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile none\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nUsePAM no\nSubsystem sftp internal-sftp\n"
        )
        sshd_proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)], stderr=open(d / "sshd.log", "wb"))
        self.procs.append(sshd_proc)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10, "sshd")
        self.sshfs = self.dir / "sshfs"
        self.sshfs.mkdir()
        user = os.environ.get("USER") or "root"
        r = subprocess.run(
            [
                "sshfs",
                f"{user}@127.0.0.1:{self.export}",
                str(self.sshfs),
                "-o",
                f"port={port},IdentityFile={d / 'user_key'},StrictHostKeyChecking=no,"
                "UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR",
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            self.notes.append(f"sshfs comparison skipped: sshfs failed: {r.stderr.strip()}")
            return False
        self.mounts.append(self.sshfs)
        return True

    def stop(self) -> None:
        for m in reversed(self.mounts):
            force_unmount(m)
        for p in reversed(self.procs):
            stop_pid(p, 15)
        if self.mount is not None:
            self.mount.stop()
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- measurements -------------------------------------------------------------------------
    def seq(self, label: str, base: Path) -> None:
        size = self.args.size_mib
        runs = self.args.runs
        dst = base / "seq.bin"

        def rm() -> None:
            # Through the mount under test: deleting behind its back would leave the kernel's
            # cached entry (entry_ttl) pointing at a file that is gone.
            dst.unlink(missing_ok=True)

        def write() -> None:
            run("dd", "if=/dev/zero", f"of={dst}", "bs=1M", f"count={size}", "conv=fsync", "status=none")

        t = timed(write, rm, runs)
        self.results.append(("seq write", label, size / t))
        src = self.export / "seq.bin"
        if not src.exists():
            write()

        def warm() -> None:
            run("dd", f"if={src}", "of=/dev/null", "bs=1M", "status=none")  # server's page cache

        def read() -> None:
            run("dd", f"if={base / 'seq.bin'}", "of=/dev/null", "bs=1M", "status=none")

        t = timed(read, warm, runs)
        self.results.append(("seq read", label, size / t))
        rm()

    def small(self, label: str, base: Path, tree: Path) -> None:
        dst = base / "tree"

        def rm() -> None:
            shutil.rmtree(dst, ignore_errors=True)

        t = timed(lambda: run("cp", "-r", tree, dst), rm, self.args.runs)
        self.results.append((f"cp -r {self.args.files} files", label, t))
        if not (self.export / "tree").exists():
            run("cp", "-r", tree, self.export / "tree")
        t = timed(lambda: run("ls", "-lR", dst), None, self.args.runs)
        self.results.append((f"ls -lR {self.args.files} files", label, t))
        rm()

    def make_tree(self) -> Path:
        tree = self.dir / "local-tree"
        for i in range(self.args.files):
            d = tree / f"d{i % 100}"
            if i < 100:
                d.mkdir(parents=True)
            (d / f"f{i}").write_bytes(os.urandom(1000 + i % 3000))
        return tree

    def report(self) -> None:
        by = {(what, who): v for what, who, v in self.results}
        print(f"\netfs mount benchmark ({self.args.runs} runs, medians; {self.args.size_mib} MiB sequential)")
        print(f"{'test':<26}{'etfs':>12}{'direct':>12}{'sshfs':>12}{'etfs/direct':>13}{'etfs/sshfs':>12}")
        for what in dict.fromkeys(w for w, _, _ in self.results):
            e, d, s = by.get((what, "etfs")), by.get((what, "direct")), by.get((what, "sshfs"))
            unit = "MiB/s" if what.startswith("seq") else "s"

            def fmt(v: float | None, unit: str = unit) -> str:
                return "-" if v is None else (f"{v:.0f}" if unit == "MiB/s" else f"{v:.2f}")

            def ratio(a: float | None, b: float | None) -> str:
                if a is None or b is None:
                    return "-"
                return f"{a / b:.2f}x"

            print(
                f"{what + ' (' + unit + ')':<26}{fmt(e):>12}{fmt(d):>12}{fmt(s):>12}"
                f"{ratio(e, d):>13}{ratio(e, s) if unit == 'MiB/s' else ratio(s, e):>12}"
            )
        print("(etfs/sshfs for the timed rows is sshfs time / etfs time: > 1 means etfs is faster)")
        rss = 0
        try:
            assert self.mount is not None and self.mount.proc is not None
            for line in Path(f"/proc/{self.mount.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        except OSError:
            pass
        print(f"etfs daemon RSS: {rss / 1024:.1f} MiB")
        for n in self.notes:
            print("note:", n)
        print(json.dumps({"results": self.results, "daemon_rss_kib": rss}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-sshfs", action="store_true")
    args = p.parse_args()
    b = Bench(args)
    try:
        b.start_etfs()
        have_sshfs = not args.no_sshfs and b.start_sshfs()
        targets = [("etfs", b.etfs), ("direct", b.export)] + ([("sshfs", b.sshfs)] if have_sshfs else [])
        for label, base in targets:
            b.seq(label, base)
        tree = b.make_tree()
        for label, base in targets:
            if label != "direct":
                b.small(label, base, tree)
        b.report()
    finally:
        b.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
