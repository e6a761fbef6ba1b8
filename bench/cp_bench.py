#!/usr/bin/env python3
"""`cp` between two etfs mountpoints vs the same bytes through a 100 Mbit client link.

One command, as root (network namespaces, FUSE):

    python bench/cp_bench.py [--size-mib 1024] [--runs 3] [--streams 4] [--through-mib 128]

Topology (namespaces and veths named after this process's pid, 10.213.x.y addresses only
inside them, all removed at exit, also on failure or Ctrl-C):

    client ns  --100 Mbit (htb, both ends)--  jive ns
    client ns  --100 Mbit (htb, both ends)--  onsala ns
    jive ns    --------- full speed ---------  onsala ns   (the servers' peer_address)

The mount daemon runs in the client namespace with nsenter (network only), so its FUSE mount
is visible here and GNU `cp` reaches it as copy_file_range.

Measured (the source is re-read on the server before every run; the destination is deleted
through the mount between runs; plain cp and etfs cp runs alternate):

  (a) plain `cp SRC_MP/f DST_MP/` : median wall time of --runs runs
  (b) `cat SRC_MP/f | cat > DST_MP/f`: read + write through the daemon, so every byte crosses
      the client's 100 Mbit links (not `cat SRC > DST`: GNU cat >= 9.1 uses copy_file_range,
      which the mount turns into a third-party copy); one run of --through-mib MiB (default
      128), scaled linearly to --size-mib (the links are the bottleneck; the output says so)
  (c) `etfs cp --streams N`       : median wall time (includes the Python start of the command;
      the daemon's own time for each transfer, from `etfs status`, is printed too)
  (d) client bytes per file       : rx+tx of the client's two interfaces during each run of (a)

and the ratios: cp speedup over through-client (target >= 20x), client bytes per file (target
<= 64 KiB), plain cp vs etfs cp (target: plain cp within 10%).  Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from harness.mount import Mount  # noqa: E402
from harness.netlab import NetLab, ServerEntry, make_mount, netns_unavailable, start_server, write_key  # noqa: E402
from harness.process import child_env  # noqa: E402

MIB = 1 << 20
MB = 1e6
CLIENT_MBIT = 100


def make_file(path: Path, size: int, seed: int) -> None:
    """``size`` bytes that no layer can compress or deduplicate (a counter per MiB)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (MIB // 32)
    with open(path, "wb") as f:
        left, i = size, 0
        while left > 0:
            chunk = (i.to_bytes(8, "big") + block[8:])[: min(left, MIB)]
            f.write(chunk)
            left -= len(chunk)
            i += 1


def reread(path: Path) -> None:
    """Read a file on the server side so every run starts from a warm page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(4 * MIB)
        while f.readinto(buf):
            pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bench:
    lab: NetLab
    mount: Mount
    client_ns: str
    client_ifs: list[str]
    jive_export: Path
    onsala_export: Path

    def client_bytes(self) -> int:
        return self.lab.total_bytes(self.client_ns, self.client_ifs)

    def mp(self, server: str) -> Path:
        return self.mount.mountpoints[server]

    def remove(self, name: str) -> None:
        """Delete the destination through the mount (so the mount's caches agree)."""
        p = self.mp("onsala") / "tmp" / name
        p.unlink(missing_ok=True)

    def transfer(self, destination: str) -> dict[str, object]:
        out = subprocess.run(
            [sys.executable, "-m", "etfs.cli", "status", "--json", "--mount", str(self.mount.root)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
            check=True,
        )
        recs = [t for t in json.loads(out.stdout)["transfers"] if t["destination"] == destination]
        rec: dict[str, object] = recs[-1]
        return rec


def setup(lab: NetLab, base: Path, streams: int) -> Bench:
    key = write_key(base / "tester.key")
    cns, jns, ons = lab.namespace("cli"), lab.namespace("jive"), lab.namespace("ons")
    c1, j1 = lab.link(cns, "10.213.1.1", jns, "10.213.1.2")
    c2, o2 = lab.link(cns, "10.213.2.1", ons, "10.213.2.2")
    lab.link(jns, "10.213.3.1", ons, "10.213.3.2")  # the servers' own link, full speed
    for ns, dev in ((cns, c1), (jns, j1), (cns, c2), (ons, o2)):
        lab.shape(ns, dev, CLIENT_MBIT, "htb")
    jive = start_server(lab, jns, "jive", base / "jive", key)
    onsala = start_server(lab, ons, "onsala", base / "onsala", key)
    entries = [ServerEntry(jive, "10.213.1.2", "10.213.3.1"), ServerEntry(onsala, "10.213.2.2", "10.213.3.2")]
    mount = make_mount(lab, cns, base / "client", entries, key, third_party="auto", streams=streams)
    mount.start()
    return Bench(lab, mount, cns, [c1, c2], jive.export, onsala.export)


def timed(cmd: list[str], timeout: float = 900, **kw: object) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return secs


def run_cp(b: Bench, src: Path, name: str) -> tuple[float, int, float]:
    """One plain cp: (seconds, client bytes during it, engine seconds)."""
    reread(src)
    b.remove(name)
    before = b.client_bytes()
    secs = timed(["cp", str(b.mp("jive") / "tmp" / src.name), str(b.mp("onsala") / "tmp" / name)])
    used = b.client_bytes() - before
    rec = b.transfer(f"onsala:/tmp/{name}")
    if rec["kind"] != "third-party" or rec["bytes_via_client"] != 0 or rec["state"] != "done":
        raise RuntimeError(f"plain cp was not a clean third-party transfer: {rec}")
    return secs, used, engine_secs(rec)


def run_etfs_cp(b: Bench, src: Path, name: str, streams: int) -> tuple[float, float]:
    """One `etfs cp`: (seconds, engine seconds)."""
    reread(src)
    b.remove(name)
    cmd = [sys.executable, "-m", "etfs.cli", "cp", "--streams", str(streams), "--mount", str(b.mount.root)]
    cmd += [str(b.mp("jive") / "tmp" / src.name), f"onsala:/tmp/{name}"]
    secs = timed(cmd, env=child_env())
    rec = b.transfer(f"onsala:/tmp/{name}")
    if rec["kind"] != "third-party" or rec["state"] != "done":
        raise RuntimeError(f"etfs cp was not a third-party transfer: {rec}")
    return secs, engine_secs(rec)


def run_through_client(b: Bench, src: Path, name: str) -> tuple[float, int]:
    """`cat SRC | cat > DST` through the mount: (seconds, client bytes during it).

    Not `cat SRC > DST`: GNU cat >= 9.1 copies regular files with copy_file_range, which the
    mount turns into a third-party transfer.  Through a pipe both cats read and write.
    """
    reread(src)
    b.remove(name)
    s, d = b.mp("jive") / "tmp" / src.name, b.mp("onsala") / "tmp" / name
    before = b.client_bytes()
    secs = timed(["sh", "-c", 'cat "$1" | cat > "$2"', "sh", str(s), str(d)])
    used = b.client_bytes() - before
    if (b.onsala_export / "tmp" / name).stat().st_size != src.stat().st_size:
        raise RuntimeError("the through-client copy has the wrong size")
    if used < 2 * src.stat().st_size:
        raise RuntimeError(f"the through-client copy moved only {used} bytes over the client's links")
    return secs, used


def engine_secs(rec: dict[str, object]) -> float:
    """How long the daemon's engine worked on a transfer (status: finished - started)."""
    return float(rec["finished"]) - float(rec["started"])  # type: ignore[arg-type]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024, help="file size for cp and etfs cp (default 1024)")
    p.add_argument("--runs", type=int, default=3, help="timed runs of cp and of etfs cp (median; default 3)")
    p.add_argument("--streams", type=int, default=4, help="streams for cp (mount config) and etfs cp")
    p.add_argument(
        "--through-mib",
        type=int,
        default=128,
        help="size of the one through-client run, scaled to --size-mib (default 128; 0 = full size)",
    )
    p.add_argument("--workdir", type=Path, default=None, help="where exports live (default: a temp dir)")
    return p.parse_args(argv)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = netns_unavailable()
    if reason:
        print(f"cp_bench: needs network namespaces (run as root): {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _sigterm)
    size = args.size_mib * MIB
    through = min(size, args.through_mib * MIB) if args.through_mib > 0 else size
    started = time.monotonic()
    lab = NetLab()
    with tempfile.TemporaryDirectory(prefix="etfs-cp-bench-", dir=args.workdir) as tmp:
        try:
            base = Path(tmp)
            print(
                f"topology: client --{CLIENT_MBIT} Mbit htb-- jive, "
                f"client --{CLIENT_MBIT} Mbit htb-- onsala, jive --full speed-- onsala "
                f"(veth, namespaces etfs-{lab.tag}-*)",
                flush=True,
            )
            b = setup(lab, base, args.streams)
            src = b.jive_export / "tmp" / "src.bin"
            print(f"creating {args.size_mib} MiB source on jive ...", flush=True)
            make_file(src, size, seed=1)
            small = src
            if through < size:
                small = b.jive_export / "tmp" / "through-src.bin"
                make_file(small, through, seed=2)

            # Warm-up (untimed): one cp, verified byte for byte.
            run_cp(b, src, "warm.bin")
            if sha256(b.onsala_export / "tmp" / "warm.bin") != sha256(src):
                raise RuntimeError("the warm-up copy differs from the source")
            b.remove("warm.bin")
            print("warm-up cp verified (sha256 equal)", flush=True)

            cp_secs: list[float] = []
            cp_client: list[int] = []
            cp_engine: list[float] = []
            etfs_secs: list[float] = []
            etfs_engine: list[float] = []
            for run in range(args.runs):
                secs, used, eng = run_cp(b, src, "dst.bin")
                cp_secs.append(secs)
                cp_client.append(used)
                cp_engine.append(eng)
                b.remove("dst.bin")
                esecs, eeng = run_etfs_cp(b, src, "dst-etfs.bin", args.streams)
                etfs_secs.append(esecs)
                etfs_engine.append(eeng)
                b.remove("dst-etfs.bin")
                print(
                    f"run {run + 1}/{args.runs}: cp {secs:6.2f} s ({size / secs / MB:6.0f} MB/s, "
                    f"client {used} B)   etfs cp {esecs:6.2f} s ({size / esecs / MB:6.0f} MB/s)",
                    flush=True,
                )

            print(f"through the client: {through // MIB} MiB at {CLIENT_MBIT} Mbit ...", flush=True)
            tc_secs_measured, tc_client = run_through_client(b, small, "through.bin")
            b.remove("through.bin")
            tc_secs = tc_secs_measured * size / through
            client_rate = through / tc_secs_measured

            cp_med, etfs_med = statistics.median(cp_secs), statistics.median(etfs_secs)
            cp_eng, etfs_eng = statistics.median(cp_engine), statistics.median(etfs_engine)
            client_med, client_max = int(statistics.median(cp_client)), max(cp_client)
            speedup = tc_secs / cp_med
            vs_etfs = cp_med / etfs_med - 1
            scaled = (
                f"measured {tc_secs_measured:.2f} s for {through // MIB} MiB, scaled x{size / through:g}"
                if through < size
                else f"one run of {through // MIB} MiB"
            )

            def line(label: str, secs: float, note: str = "") -> str:
                return f"{label:<36}: {secs:7.2f} s {size / secs / MB:8.1f} MB/s  {note}".rstrip()

            print()
            print(f"file: {args.size_mib} MiB, streams {args.streams}, medians of {args.runs} runs")
            print(line("(a) plain cp between mountpoints", cp_med, f"(daemon engine {cp_eng:.2f} s)"))
            print(
                line(
                    "(b) cat src | cat > dst (via client)",
                    tc_secs,
                    f"({scaled}; client links moved {tc_client / through:.2f} B per file byte)",
                )
            )
            print(
                line(
                    f"(c) etfs cp --streams {args.streams}",
                    etfs_med,
                    f"(daemon engine {etfs_eng:.2f} s; wall time includes Python start-up)",
                )
            )
            print(f"{'(d) client bytes per file in (a)':<36}: median {client_med} B, max {client_max} B")
            print()
            ok = {
                "speedup": speedup >= 20,
                "client_bytes": client_max <= 64 * 1024,
                "cp_vs_etfs_cp": vs_etfs <= 0.10,
            }
            mark = {True: "ok  ", False: "MISS"}
            print(f"{mark[ok['speedup']]} cp speedup vs through-client : {speedup:7.1f}x  (target >= 20x)")
            print(
                f"{mark[ok['client_bytes']]} client bytes per file        : {client_max / 1024:7.1f} KiB "
                "(max of runs; target <= 64 KiB)"
            )
            print(
                f"{mark[ok['cp_vs_etfs_cp']]} plain cp vs etfs cp           : {vs_etfs * 100:+7.1f} %  "
                f"(wall time; target <= +10 %; engine times {cp_eng / etfs_eng * 100 - 100:+.1f} %)"
            )
            print(f"total {time.monotonic() - started:.0f} s")
            record = {
                "bench": "cp_bench",
                "size_mib": args.size_mib,
                "runs": args.runs,
                "streams": args.streams,
                "client_mbit": CLIENT_MBIT,
                "cp_s": cp_secs,
                "etfs_cp_s": etfs_secs,
                "cp_client_bytes": cp_client,
                "cp_engine_s": cp_engine,
                "etfs_cp_engine_s": etfs_engine,
                "through_client_bytes_on_client_links": tc_client,
                "through_client_mib": through // MIB,
                "through_client_s_measured": tc_secs_measured,
                "through_client_s_scaled": tc_secs,
                "through_client_mb_s": client_rate / MB,
                "speedup": speedup,
                "cp_vs_etfs_cp": vs_etfs,
                "targets_met": ok,
            }
            print(json.dumps(record, separators=(",", ":")))
            return 0 if all(ok.values()) else 1
        finally:
            lab.cleanup()


if __name__ == "__main__":
    sys.exit(main())
