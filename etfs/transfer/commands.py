"""`etfs cp` and `etfs status`: thin clients of the running mount's control socket.

Paths name files under an etfs mountpoint (``/mnt/jive/tmp/x``), as ``SERVER:PATH``,
or on the local disk.  Server-to-server copies are done by the mount daemon's engine
(so they show in `etfs status`); copies between the local disk and a server go
through the mount like any file copy, into a hidden part file renamed at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etfs import _sendfile_cffi as native
from etfs.protocol.transfer import WORK_FILE, CopyMode, local_part_name, noreplace, same_version
from etfs.ratelimit import RateError, Throttle, TokenBucket, parse_rate

from .control import running_mounts

AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory

PARALLEL_FILES = 4


# After Ctrl-C: how long to wait for the mount daemon to confirm the servers stopped.
CANCEL_WAIT = 20.0
COPY_CHUNK = 8 * 2**20


class CommandError(Exception):
    pass


class Interrupt:
    """Ctrl-C on `etfs cp`: asks every running copy to stop and remembers that it did.

    The first SIGINT half-closes the control socket of each server-to-server copy (the daemon
    then cancels the transfer on both servers and answers once they stopped) and makes local
    copies stop at their next chunk; the command exits 130 after that.  A second SIGINT exits
    at once.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.since = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def add(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)
            if self.event.is_set():
                _half_close(s)

    def discard(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)

    def fire(self, *_: object) -> None:
        if self.event.is_set():
            os._exit(130)  # second Ctrl-C: do not wait any longer
        print("etfs: cancelling (Ctrl-C again to quit without waiting)", file=sys.stderr, flush=True)
        with self._lock:
            self.since = time.monotonic()
            self.event.set()
            for s in self._sockets:
                _half_close(s)


def _half_close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@dataclass(frozen=True)
class Location:
    """A file named on the command line: on a server (``server`` set) or local."""

    server: str | None
    path: str  # export-relative for a server, absolute local path otherwise
    fs_path: Path  # where the file is visible on this machine (through the mount for servers)

    def __str__(self) -> str:
        return f"{self.server}:{self.path}" if self.server else self.path

    def child(self, name: str) -> Location:
        return Location(self.server, self.path.rstrip("/") + "/" + name, self.fs_path / name)


def _socket_alive(info: dict[str, Any]) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(info["socket"]).st_mode)
    except (OSError, ValueError):
        return False


def find_mount(root: Path | None) -> dict[str, Any]:
    mounts = running_mounts()
    if root is not None:
        mounts = [
            m for m in mounts if Path(m["root"]) == root.resolve() or str(root) in m["servers"].values()
        ]
    # A record whose pid is alive (or reused) but whose control socket is gone is stale.
    live = [m for m in mounts if _socket_alive(m)]
    if not live and mounts:
        stale = mounts[0]
        raise CommandError(
            f"the etfs mount registered for pid {stale.get('pid')} (root {stale['root']}) has no control "
            f"socket at {stale['socket']}: the registration is stale (the daemon may have crashed); "
            "restart the mount"
        )
    if not live:
        raise CommandError("no running etfs mount found (start one with 'etfs mount -c FILE' or 'etfs demo')")
    if len(live) > 1:
        raise CommandError("several etfs mounts are running; choose one with --mount ROOT")
    return live[0]


def resolve(arg: str, mount: dict[str, Any]) -> Location:
    servers: dict[str, str] = mount["servers"]
    root = Path(mount["root"])
    name, sep, rest = arg.partition(":")
    if sep and name in servers and "/" not in name:
        path = "/" + rest.strip("/")
        return Location(name, path, root / name / path.lstrip("/"))
    absolute = Path(os.path.abspath(arg))
    for server, mountpoint in servers.items():
        for base in (Path(mountpoint), root / server):
            try:
                rel = absolute.relative_to(base)
            except ValueError:
                continue
            # Path(".") is the mountpoint itself; never strip dots from names (".hidden", "x.").
            path = "/" if rel == Path(".") else "/" + rel.as_posix()
            return Location(server, path, root / server / path.lstrip("/"))
    return Location(None, str(absolute), absolute)


def _request(sock_path: str, request: dict[str, Any]) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        s.sendall(json.dumps(request).encode() + b"\n")
    except OSError as exc:
        s.close()
        hint = (
            " (stale registration? the daemon may have exited; restart the mount)"
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
            else ""
        )
        raise CommandError(
            f"cannot reach the mount daemon at {sock_path}: {exc.strerror or exc}{hint}"
        ) from None
    return s


def _lines(s: socket.socket, interrupt: Interrupt | None = None) -> Any:
    buf = b""
    if interrupt is not None:
        s.settimeout(0.5)
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            assert interrupt is not None
            if interrupt and time.monotonic() - interrupt.since > CANCEL_WAIT:
                raise CommandError(
                    f"the mount daemon did not confirm the cancel within {CANCEL_WAIT:.0f} s"
                ) from None
            continue
        except OSError as exc:
            raise CommandError(f"lost the connection to the mount daemon: {exc.strerror or exc}") from None
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                yield json.loads(line)
            except ValueError:
                raise CommandError("the mount daemon sent a malformed reply") from None


class Reporter:
    """Progress for humans (rich, on a TTY), JSON lines (--json), or nothing."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self.lock = threading.Lock()
        self.progress: Any = None
        if not as_json and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.progress.start()
        self.tasks: dict[str, Any] = {}

    def event(self, src: Location, dst: Location, ev: dict[str, Any]) -> None:
        with self.lock:
            if self.json:
                print(json.dumps({"source": str(src), "destination": str(dst), **ev}), flush=True)
            elif self.progress is not None and "transfer" in ev:
                t = ev["transfer"]
                key = str(dst)
                if key not in self.tasks:
                    self.tasks[key] = self.progress.add_task(
                        Path(dst.path).name, total=t["bytes_total"] or None
                    )
                self.progress.update(
                    self.tasks[key], completed=t["bytes_done"], total=t["bytes_total"] or None
                )

    def error(self, src: Location, dst: Location, message: str) -> None:
        with self.lock:
            if self.json:
                print(
                    json.dumps(
                        {"source": str(src), "destination": str(dst), "event": "error", "message": message}
                    )
                )
            print(f"etfs: cannot copy '{src}' to '{dst}': {message}", file=sys.stderr)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# How one file's copy ended.
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"


def _copy_remote(
    mount: dict[str, Any],
    src: Location,
    dst: Location,
    args: argparse.Namespace,
    rep: Reporter,
    interrupt: Interrupt,
) -> str:
    req = {
        "op": "copy",
        "source": str(src),
        "destination": str(dst),
        "mode": args.mode,
        "streams": args.streams,
        "direction": args.direction,
        "verify": False if args.no_verify else None,
        "preserve_times": True,
        # All files of one `etfs cp` share its --bwlimit, as rsync's does.
        "bwlimit": args.bwlimit_rate,
        "bwlimit_group": args.bwlimit_group,
    }
    s = _request(mount["socket"], req)
    interrupt.add(s)
    last = 0.0
    try:
        for ev in _lines(s, interrupt):
            kind = ev.get("event")
            if kind == "progress":
                now = time.monotonic()
                if now - last >= (1.0 if rep.json else 0.1):
                    rep.event(src, dst, ev)
                    last = now
            elif kind == "done":
                rep.event(src, dst, ev)
                return DONE
            elif kind == "cancelled":
                rep.error(src, dst, ev.get("message") or "cancelled")
                return CANCELLED
            elif kind == "error":
                rep.error(src, dst, ev.get("message") or os.strerror(ev.get("errno", errno.EIO)))
                return FAILED
    finally:
        interrupt.discard(s)
        s.close()
    rep.error(src, dst, "the mount daemon closed the connection")
    return FAILED


class _Stopped(Exception):
    """A local copy stopped by Ctrl-C."""


def _copy_bytes(src: Path, dst: Path, interrupt: Interrupt, throttle: Throttle | None = None) -> None:
    """shutil.copyfile in chunks, stopping at the next chunk after Ctrl-C; ``throttle``: --bwlimit."""
    chunk = throttle.piece if throttle is not None else COPY_CHUNK
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while True:
            if interrupt:
                raise _Stopped
            if throttle is not None:
                throttle.take(min(chunk, max(size - pos, 1)))
            try:
                n = os.sendfile(fout.fileno(), fin.fileno(), pos, chunk)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS) or pos:
                    raise
                shutil.copyfileobj(fin, fout, COPY_CHUNK)  # a file sendfile cannot read
                return
            if n == 0:
                break
            pos += n
        if pos < size:
            raise OSError(errno.EIO, f"{src} shrank while copying")


def _copy_through_client(
    src: Location, dst: Location, args: argparse.Namespace, rep: Reporter, interrupt: Interrupt
) -> str:
    """Local <-> server: an ordinary copy through the mount, into a part file renamed at the end."""
    try:
        sst = src.fs_path.stat()
        if dst.fs_path.exists():
            if noreplace(args.mode):
                raise FileExistsError(errno.EEXIST, "destination exists (mode new)")
            dstat = dst.fs_path.stat()
            if args.mode == CopyMode.SKIP_EXISTING and same_version(
                dstat.st_size, dstat.st_mtime_ns, sst.st_size, sst.st_mtime_ns
            ):
                rep.event(src, dst, {"event": "done", "skipped": True})
                return DONE
        # A name of its own: a server transfer into the same file uses ".NAME.etfs-part".
        part = dst.fs_path.with_name(local_part_name(dst.fs_path.name))
        try:
            _copy_bytes(src.fs_path, part, interrupt, args.bwlimit_throttle)
            shutil.copystat(src.fs_path, part)
            # mode new: a file that appeared meanwhile is not overwritten (EEXIST)
            flags = native.RENAME_NOREPLACE if noreplace(args.mode) else 0
            native.renameat2(AT_FDCWD, str(part), AT_FDCWD, str(dst.fs_path), flags)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        done = {"bytes_total": sst.st_size, "bytes_done": sst.st_size, "bytes_via_client": sst.st_size}
        rep.event(src, dst, {"event": "done", "transfer": done})
        return DONE
    except _Stopped:
        return CANCELLED
    except OSError as exc:
        rep.error(src, dst, exc.strerror or str(exc))
        return FAILED


def _plan(sources: list[Location], dest: Location, recursive: bool) -> list[tuple[Location, Location]]:
    """Expand the command line into (source file, destination file) pairs, creating directories."""
    pairs: list[tuple[Location, Location]] = []
    dest_is_dir = dest.fs_path.is_dir()
    if len(sources) > 1 and not dest_is_dir:
        raise CommandError(f"target '{dest}' is not a directory")
    for src in sources:
        try:
            src.fs_path.stat()
        except OSError as exc:
            raise CommandError(f"cannot stat '{src}': {exc.strerror}") from None
        target = dest.child(Path(src.path).name) if dest_is_dir else dest
        if not os.path.isdir(src.fs_path):
            pairs.append((src, target))
            continue
        if not recursive:
            raise CommandError(f"-r not specified; omitting directory '{src}'")
        for dirpath, dirnames, filenames in os.walk(src.fs_path):
            rel = Path(dirpath).relative_to(src.fs_path)
            tdir = target
            for part in rel.parts:
                tdir = tdir.child(part)
            try:
                tdir.fs_path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CommandError(f"cannot create directory '{tdir}': {exc.strerror}") from None
            here = src
            for part in rel.parts:
                here = here.child(part)
            dirnames.sort()
            for name in sorted(filenames):
                if not WORK_FILE.search(name):  # copies in progress are never copied
                    pairs.append((here.child(name), tdir.child(name)))
    return pairs


def cmd_cp(args: argparse.Namespace) -> int:
    if args.streams is not None and not 1 <= args.streams <= 64:
        print("etfs: --streams must be between 1 and 64", file=sys.stderr)
        return 2
    try:
        args.bwlimit_rate = parse_rate(args.bwlimit) if args.bwlimit is not None else 0
    except RateError as exc:
        print(f"etfs: --bwlimit: {exc}", file=sys.stderr)
        return 2
    args.bwlimit_group = secrets.token_hex(8) if args.bwlimit_rate else ""
    # Copies between the local disk and a server pass through here: they share one bucket.
    args.bwlimit_throttle = Throttle([TokenBucket(args.bwlimit_rate)]) if args.bwlimit_rate else None
    try:
        mount = find_mount(args.mount)
        sources = [resolve(s, mount) for s in args.sources]
        dest = resolve(args.destination, mount)
        pairs = _plan(sources, dest, args.recursive)
    except CommandError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return 1
    rep = Reporter(args.json)
    interrupt = Interrupt()

    def one(pair: tuple[Location, Location]) -> str:
        src, dst = pair
        if interrupt:
            return CANCELLED  # not started before Ctrl-C
        if src.server and dst.server:
            return _copy_remote(mount, src, dst, args, rep, interrupt)
        return _copy_through_client(src, dst, args, rep, interrupt)

    previous = signal.signal(signal.SIGINT, interrupt.fire)
    try:
        with concurrent.futures.ThreadPoolExecutor(PARALLEL_FILES) as pool:
            futures = [pool.submit(one, pair) for pair in pairs]
            # (a bare wait: Ctrl-C runs `interrupt.fire` in this thread meanwhile)
            concurrent.futures.wait(futures)
            results = [f.result() for f in futures]
    except CommandError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return 130 if interrupt else 1
    finally:
        signal.signal(signal.SIGINT, previous)
        rep.close()
    if interrupt and any(r != DONE for r in results):
        # Every copy is over on the servers now (finished, failed or stopped with its part file).
        return 130
    return 0 if all(r == DONE for r in results) else 1


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        mount = find_mount(args.mount)
    except CommandError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return 1
    request: dict[str, Any] = {"op": "status"}
    if args.server:
        request = {"op": "server-records", "server": args.server}
    while True:
        try:
            s = _request(mount["socket"], request)
            with s:
                reply = next(iter(_lines(s)), None)
        except CommandError as exc:
            print(f"etfs: {exc}", file=sys.stderr)
            return 1
        if reply is None or "transfers" not in reply:
            message = reply.get("message") if reply else None
            print(f"etfs: {message or 'the mount daemon gave no status'}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(reply), flush=True)
        else:
            if args.watch:
                print("\033[H\033[2J", end="")
            rows = reply["transfers"]
            if not rows:
                print("no transfers")
            for t in rows:
                pct = 100.0 * t["bytes_done"] / t["bytes_total"] if t["bytes_total"] else 100.0
                print(
                    f"{t['id']:>12} {t['state']:<10} {pct:5.1f}% {_fmt_bytes(t['bytes_done']):>10} "
                    f"{t.get('kind', t.get('direction', '')):<11} streams={t['streams']} "
                    f"via-client={_fmt_bytes(t.get('bytes_via_client', 0))} "
                    f"{t['source']} -> {t['destination']}" + (f"  ({t['reason']})" if t["reason"] else "")
                )
        if not args.watch:
            return 0
        time.sleep(1.0)
