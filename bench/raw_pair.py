#!/usr/bin/env python3
"""Raw data-path benchmark for etfs._sendfile_cffi over loopback TCP.

Moves one file between two local paths over N loopback TCP connections with every
sender x receiver combination:

    senders:   sendfile   (sendfile(2), zero-copy)   | read_send  (pread + send via a buffer)
    receivers: recv_write (recv + pwrite via a buffer) | splice_recv (socket -> pipe -> file)

Blocks of --block-mib are dealt round-robin over the N connections; each connection has
one sender thread and one receiver thread which handle that connection's blocks in order
(so no headers are needed), the receiver writing each block at its own offset.  Timing
covers the transfer only: connections, threads, buffers and pipes are set up before the
clock starts; it stops when every receiver has written its last block (to the page
cache: no fsync, this measures the data path, not the disk).

Method (docs/architecture.md section 3): one untimed warm-up run of every configuration (which
also verifies the destination's xxh3 digest against the source), then --runs timed runs
interleaved across configurations (rotating order); the source is re-read before every
run and the destination is deleted (not truncated) after every run.  Reports medians in
MB/s (10^6 bytes/s) and ratios to read_send->recv_write with 1 stream measured in the
same invocation, then one JSON line.

    python bench/raw_pair.py [--size-mib 1024] [--runs 5] [--block-mib 4] [--streams 1,4]

Build the extension first if needed: python etfs/_sendfile_cffi/build.py
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

MB = 1_000_000
MIB = 1 << 20
SENDERS = ("sendfile", "read_send")
RECEIVERS = ("recv_write", "splice_recv")
BASELINE = ("read_send", "recv_write", 1)
REPORTED_KIB = "/sys/module/page_reporting/parameters/reported_kib"


def load_native() -> ModuleType:
    """Import etfs._sendfile_cffi, adding the repo root to sys.path when run as a script."""
    try:
        return importlib.import_module("etfs._sendfile_cffi")
    except ModuleNotFoundError as e:
        if e.name not in ("etfs", "etfs._sendfile_cffi"):
            raise
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        return importlib.import_module("etfs._sendfile_cffi")
    except ModuleNotFoundError as e:
        if e.name == "etfs._sendfile_cffi._native":
            sys.exit("etfs._sendfile_cffi is not built: run `python etfs/_sendfile_cffi/build.py`")
        raise


native = load_native()


@dataclass(frozen=True)
class Config:
    sender: str
    receiver: str
    streams: int

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.sender, self.receiver, self.streams)

    def __str__(self) -> str:
        return f"{self.sender}->{self.receiver} x{self.streams}"


@dataclass
class Result:
    config: Config
    mbps: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.mbps)


def read_reported_kib() -> int | None:
    try:
        with open(REPORTED_KIB) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def make_source(path: str, size: int, block: int) -> None:
    """Random-ish content; every block starts with its own index so misplaced blocks show."""
    seed = os.urandom(16 * MIB)
    with open(path, "wb") as f:
        pos = 0
        while pos < size:
            n = min(len(seed), size - pos)
            chunk = bytearray(seed[:n])
            for b in range((pos + block - 1) // block * block, pos + n, block):
                tag = b"BLK%013d" % (b // block)
                chunk[b - pos : b - pos + len(tag)] = tag[: pos + n - b]
            f.write(chunk)
            pos += n


def reread(path: str) -> None:
    """Read the whole file so it is in the page cache (pages idle ~60 s get evicted here)."""
    buf = bytearray(16 * MIB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def digest(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    buf = bytearray(16 * MIB)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(mv[:n])
    return str(h.hexdigest())


def connect_pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    """n loopback TCP connections as (sending end, receiving end), blocking."""
    pairs = []
    with socket.create_server(("127.0.0.1", 0), backlog=n) as srv:
        for _ in range(n):
            a = socket.create_connection(srv.getsockname())
            b, _ = srv.accept()
            pairs.append((a, b))
    return pairs


def blocks_for(stream: int, streams: int, size: int, block: int) -> list[tuple[int, int]]:
    nblocks = (size + block - 1) // block
    return [(i * block, min(block, size - i * block)) for i in range(stream, nblocks, streams)]


def run_once(cfg: Config, src: str, dst: str, size: int, block: int, durable: bool = False) -> float:
    """One timed transfer; returns seconds.  dst must not exist.  ``durable``: the time includes
    an fdatasync of dst, as an etfs transfer's commit does before its rename."""
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    pairs = connect_pairs(cfg.streams)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2 * cfg.streams + 1)
    pipes: list[Any] = []

    def abort() -> None:
        for a, b in pairs:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                barrier.wait()
                fn()
            except BaseException as e:
                errors.append(e)
                barrier.abort()
                abort()

        return run

    def make_sender(i: int) -> Callable[[], None]:
        sock_fd = pairs[i][0].fileno()
        todo = blocks_for(i, cfg.streams, size, block)
        if cfg.sender == "sendfile":

            def send() -> None:
                for off, cnt in todo:
                    if native.sendfile(sock_fd, src_fd, off, cnt) != cnt:
                        raise RuntimeError(f"short sendfile at {off}")
        else:
            buf = bytearray(block)  # block fits: as in etfs, the buffer is hashable afterwards

            def send() -> None:
                for off, cnt in todo:
                    if native.read_send(src_fd, sock_fd, off, cnt, buf) != cnt:
                        raise RuntimeError(f"short read_send at {off}")

        return send

    def make_receiver(i: int) -> Callable[[], None]:
        sock_fd = pairs[i][1].fileno()
        todo = blocks_for(i, cfg.streams, size, block)
        if cfg.receiver == "recv_write":
            buf = bytearray(block)

            def recv() -> None:
                for off, cnt in todo:
                    native.recv_write(sock_fd, dst_fd, off, cnt, buf)
        else:
            pipe = native.Pipe()
            pipes.append(pipe)

            def recv() -> None:
                for off, cnt in todo:
                    native.splice_recv(sock_fd, dst_fd, off, cnt, pipe)

        return recv

    try:
        os.ftruncate(dst_fd, size)
        senders = [threading.Thread(target=guarded(make_sender(i))) for i in range(cfg.streams)]
        receivers = [threading.Thread(target=guarded(make_receiver(i))) for i in range(cfg.streams)]
        for t in senders + receivers:
            t.start()
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass
        t0 = time.perf_counter()
        for t in receivers:
            t.join()
        if durable and not errors:
            os.fdatasync(dst_fd)
        elapsed = time.perf_counter() - t0
        for t in senders:
            t.join()
        if errors:
            raise RuntimeError(f"{cfg}: transfer failed") from errors[0]
        return elapsed
    finally:
        for a, b in pairs:
            a.close()
            b.close()
        for p in pipes:
            p.close()
        os.close(src_fd)
        os.close(dst_fd)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per configuration (default 5)")
    p.add_argument("--block-mib", type=int, default=4, help="block size dealt to streams (default 4)")
    p.add_argument("--streams", default="1,4", help="comma-separated stream counts (default 1,4)")
    p.add_argument("--dir", default=None, help="working directory (default: a temp dir in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the source file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = args.size_mib * MIB
    block = args.block_mib * MIB
    stream_counts = sorted({int(s) for s in args.streams.split(",") if s.strip()})
    if 1 not in stream_counts:
        stream_counts.insert(0, 1)  # the baseline needs 1 stream
    configs = [Config(s, r, n) for n in stream_counts for s in SENDERS for r in RECEIVERS]
    results = {c.key: Result(c) for c in configs}

    workdir = args.dir or tempfile.mkdtemp(prefix="etfs-raw-pair-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    src = os.path.join(workdir, "src.bin")
    dst = os.path.join(workdir, "dst.bin")
    started = time.perf_counter()
    reported_before = read_reported_kib()
    try:
        if not (os.path.exists(src) and os.path.getsize(src) == size):
            print(f"creating {size / MIB:.0f} MiB source in {workdir} ...", flush=True)
            make_source(src, size, block)
        reread(src)
        src_digest = digest(src)
        if os.path.exists(dst):
            os.unlink(dst)

        print("warm-up + verification (untimed):", flush=True)
        for cfg in configs:
            reread(src)
            secs = run_once(cfg, src, dst, size, block)
            ok = os.path.getsize(dst) == size and digest(dst) == src_digest
            os.unlink(dst)
            print(f"  {cfg!s:32} {size / secs / MB:8.0f} MB/s  {'ok' if ok else 'MISMATCH'}", flush=True)
            if not ok:
                print(f"destination differs from source for {cfg}", file=sys.stderr)
                return 1

        for run in range(args.runs):
            k = run % len(configs)
            for cfg in configs[k:] + configs[:k]:
                reread(src)
                secs = run_once(cfg, src, dst, size, block)
                if os.path.getsize(dst) != size:
                    print(f"{cfg}: wrong destination size", file=sys.stderr)
                    return 1
                os.unlink(dst)
                results[cfg.key].mbps.append(size / secs / MB)
            print(f"run {run + 1}/{args.runs} done", flush=True)
    finally:
        if os.path.exists(dst):
            os.unlink(dst)
        if not args.keep and args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    reported_after = read_reported_kib()
    base = results[BASELINE].median
    print()
    print(
        f"size {args.size_mib} MiB, block {args.block_mib} MiB, {args.runs} runs, "
        f"{os.cpu_count()} CPUs; MB = 10^6 bytes; ratio vs read_send->recv_write x1"
    )
    hdr = (
        f"{'sender':10} {'receiver':12} {'streams':>7} {'median MB/s':>12} {'min':>7} {'max':>7} {'ratio':>6}"
    )
    print(hdr)
    print("-" * len(hdr))
    for cfg in configs:
        r = results[cfg.key]
        print(
            f"{cfg.sender:10} {cfg.receiver:12} {cfg.streams:>7} {r.median:>12.0f} "
            f"{min(r.mbps):>7.0f} {max(r.mbps):>7.0f} {r.median / base:>6.2f}"
        )
    if reported_before is not None and reported_after is not None:
        print(f"page_reporting reported_kib grew by {reported_after - reported_before} KiB during the run")
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    record = {
        "bench": "raw_pair",
        "size_mib": args.size_mib,
        "block_mib": args.block_mib,
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "unit": "MB/s",
        "baseline": "read_send->recv_write x1",
        "baseline_median": round(base, 1),
        "results": [
            {
                "sender": c.sender,
                "receiver": c.receiver,
                "streams": c.streams,
                "median": round(results[c.key].median, 1),
                "runs": [round(x, 1) for x in results[c.key].mbps],
                "ratio": round(results[c.key].median / base, 3),
            }
            for c in configs
        ],
        "total_s": round(total, 1),
    }
    print(json.dumps(record, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
