"""Python API for scripts: what `etfs cp` and `etfs status` do, with typed results.

`etfs cp` and `etfs status` are built on this module; a script can do the same::

    from etfs import api

    mount = api.find_mount(paths=["/mnt/jive/tmp/scan.vdif"])   # or api.find_mount(root=...)
    c = api.start_copy("/mnt/jive/tmp/scan.vdif", "onsala:/tmp/scan.vdif", mount=mount, streams=8)
    t = c.progress()                    # a Transfer (bytes_done, bytes_total, rate, eta...) or None
    try:
        result = c.wait(timeout=60)     # a CopyResult; TimeoutError if not over by then
    except TimeoutError:
        c.cancel()                      # stops it on the servers (part file kept for a resume)
        result = c.wait()
    print(result.outcome, result.transfer.bytes_done if result.transfer else 0)
    for t in api.status(mount).transfers: ...

Paths name files under an etfs mountpoint (``/mnt/jive/tmp/x``), ``SERVER:/PATH``, or the
local disk.  Between two servers the mount daemon's engine copies server to server (the
copy shows in `etfs status`); between the local disk and a server the bytes go through this
process and the mount, into a hidden part file renamed at the end.

Every result is a frozen dataclass; every failure to find or reach a mount is `NoMountError`
(an `EtfsError`), with a one-line message.  A copy runs in a thread of its own, so `wait`,
`progress` and `cancel` may be called from any thread.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etfs import _sendfile_cffi as native
from etfs.common.ratelimit import MIN_RATE, Throttle, TokenBucket, parse_rate
from etfs.common.safefile import create_new
from etfs.daemon.control import running_mounts
from etfs.protocol.transfer import CopyMode, local_part_name, noreplace, same_version

log = logging.getLogger(__name__)

AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
# After `Copy.cancel`: how long to wait for the mount daemon to confirm the servers stopped.
CANCEL_WAIT = 20.0
COPY_CHUNK = 8 * 2**20
# What `start_copy` keeps of the source by default (as `cp -a` / `rsync -a`).
PRESERVE_ALL = frozenset({"mode", "timestamps"})

# How a copy ended (`CopyResult.outcome`).
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"


class EtfsError(Exception):
    """A failure with a one-line message meant for humans."""


class NoMountError(EtfsError):
    """No running etfs mount to use: none, several and nothing says which, stale, or unreachable."""


# --- mounts -----------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Mount:
    """A running etfs mount, as its daemon registered it."""

    root: Path
    socket: str
    servers: Mapping[str, str]  # server name -> its mountpoint
    pid: int = 0

    @classmethod
    def from_record(cls, info: Mapping[str, Any]) -> Mount:
        return cls(Path(info["root"]), info["socket"], dict(info["servers"]), int(info.get("pid") or 0))

    def bases(self) -> Iterator[tuple[str, Path]]:
        """(server, directory) pairs under which that server's files are visible."""
        for server, mountpoint in self.servers.items():
            yield server, Path(mountpoint)
            yield server, self.root / server

    def contains(self, path: str | os.PathLike[str]) -> bool:
        """Is ``path`` (absolute, or relative to the working directory) on this mount?"""
        absolute = Path(os.path.abspath(path))
        return (
            absolute == self.root
            or self.root in absolute.parents
            or any(absolute == base or base in absolute.parents for _, base in self.bases())
        )

    def resolve(self, arg: str | os.PathLike[str]) -> Location:
        """A command-line path: ``SERVER:/PATH``, a path under this mount, or a local path."""
        text = os.fspath(arg)
        name, sep, rest = text.partition(":")
        if sep and name in self.servers and "/" not in name:
            path = "/" + rest.strip("/")
            return Location(name, path, self.root / name / path.lstrip("/"))
        absolute = Path(os.path.abspath(text))
        for server, base in self.bases():
            try:
                rel = absolute.relative_to(base)
            except ValueError:
                continue
            # Path(".") is the mountpoint itself; never strip dots from names (".hidden", "x.").
            path = "/" if rel == Path(".") else "/" + rel.as_posix()
            return Location(server, path, self.root / server / path.lstrip("/"))
        return Location(None, str(absolute), absolute)

    def describe(self) -> str:
        where = ", ".join(f"{n} at {mp}" for n, mp in sorted(self.servers.items()))
        return f"{self.root} (pid {self.pid}: {where})"


def _socket_alive(socket_path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(socket_path).st_mode)
    except (OSError, ValueError):
        return False


def mounts() -> list[Mount]:
    """The running mounts this user can use (whose control socket exists)."""
    return [Mount.from_record(m) for m in running_mounts() if _socket_alive(m["socket"])]


def _server_name(arg: str) -> str | None:
    name, sep, _ = arg.partition(":")
    return name if sep and name and "/" not in name else None


def find_mount(
    root: str | os.PathLike[str] | None = None,
    paths: Iterable[str | os.PathLike[str]] = (),
    cwd: str | os.PathLike[str] | None = None,
) -> Mount:
    """The mount to use: the one at ``root`` if given, else the only one running, else the one
    the ``paths`` lie on (a ``SERVER:PATH`` counts when only one mount has that server), else
    the one the working directory (``cwd``, default ours) lies in.

    `NoMountError` when there is none, or several and nothing says which (the message lists them).
    """
    records = running_mounts()
    if root is not None:
        wanted = Path(root)
        records = [
            m for m in records if Path(m["root"]) == wanted.resolve() or str(wanted) in m["servers"].values()
        ]
    # A record whose pid is alive (or reused) but whose control socket is gone is stale.
    live = [Mount.from_record(m) for m in records if _socket_alive(m["socket"])]
    if not live and records:
        stale = records[0]
        raise NoMountError(
            f"the etfs mount registered for pid {stale.get('pid')} (root {stale['root']}) has no control "
            f"socket at {stale['socket']}: the registration is stale (the daemon may have crashed); "
            "restart the mount"
        )
    if not live:
        raise NoMountError("no running etfs mount found (start one with 'etfs mount -c FILE' or 'etfs demo')")
    if len(live) == 1:
        return live[0]
    chosen: dict[Path, Mount] = {}
    for p in paths:
        text = os.fspath(p)
        server = _server_name(text)
        if server is not None:
            having = [m for m in live if server in m.servers]
            if len(having) == 1:
                chosen[having[0].root] = having[0]
            continue  # a server name several mounts have says nothing
        chosen.update((m.root, m) for m in live if m.contains(text))
    if len(chosen) > 1:
        raise NoMountError(
            "the paths lie on different etfs mounts ("
            + ", ".join(str(r) for r in sorted(chosen))
            + "); copy within one mount, or through a local file"
        )
    if chosen:
        return next(iter(chosen.values()))
    here = os.getcwd() if cwd is None else os.fspath(cwd)
    inside = [m for m in live if m.contains(here)]
    if len(inside) == 1:
        return inside[0]
    raise NoMountError(
        f"{len(live)} etfs mounts are running and neither the paths nor the working directory say "
        "which to use; choose one with --mount ROOT: " + "; ".join(m.describe() for m in live)
    )


# --- talking to the daemon ------------------------------------------------------------------------
def request(socket_path: str, req: Mapping[str, Any]) -> socket.socket:
    """Connect to a mount daemon's control socket and send one request line."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(socket_path)
        s.sendall(json.dumps(req).encode() + b"\n")
    except OSError as exc:
        s.close()
        hint = (
            " (stale registration? the daemon may have exited; restart the mount)"
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED)
            else ""
        )
        raise NoMountError(
            f"cannot reach the mount daemon at {socket_path}: {exc.strerror or exc}{hint}"
        ) from None
    return s


def lines(s: socket.socket, keep_going: Callable[[], bool] | None = None) -> Iterator[dict[str, Any]]:
    """The reply lines of a request.  With ``keep_going``, the socket is polled every 0.5 s and
    `EtfsError` is raised once ``keep_going()`` says False."""
    buf = b""
    if keep_going is not None:
        s.settimeout(0.5)
    while True:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            assert keep_going is not None
            if not keep_going():
                raise EtfsError(
                    f"the mount daemon did not confirm the cancel within {CANCEL_WAIT:.0f} s"
                ) from None
            continue
        except OSError as exc:
            raise EtfsError(f"lost the connection to the mount daemon: {exc.strerror or exc}") from None
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            try:
                reply = json.loads(line)
            except ValueError:
                raise EtfsError("the mount daemon sent a malformed reply") from None
            if not isinstance(reply, dict):
                raise EtfsError("the mount daemon sent a malformed reply")
            yield reply


def _ask(mount: Mount, req: Mapping[str, Any]) -> dict[str, Any]:
    with request(mount.socket, req) as s:
        reply = next(lines(s), None)
    if reply is None:
        raise EtfsError("the mount daemon gave no answer")
    if reply.get("event") == "error":
        raise EtfsError(str(reply.get("message") or os.strerror(int(reply.get("errno") or errno.EIO))))
    return reply


# --- status -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Transfer:
    """One copy, as `etfs status` shows it (the mount daemon's record, or a server's)."""

    id: str
    source: str
    destination: str
    state: str
    kind: str = ""  # third-party | relay | local (one server) | client (local disk <-> server)
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_via_client: int = 0
    bytes_resent: int = 0
    resumed_from: int = 0  # bytes already at the destination when it started (a resume)
    streams: int = 0
    direction: str = ""
    mode: str = ""
    digest: str = ""
    reason: str = ""
    started: float = 0.0
    finished: float = 0.0
    uid: int | None = None  # on a root mount, root sees every uid's transfers
    cancel_confirmed: bool | None = None
    errno: int = 0
    code: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Transfer:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def running(self) -> bool:
        return self.state not in ("done", "failed", "skipped", "cancelled")

    def elapsed(self, now: float | None = None) -> float:
        if not self.started:
            return 0.0
        end = self.finished or (time.time() if now is None else now)
        return max(0.0, end - self.started)

    def rate(self, now: float | None = None) -> float:
        """Bytes per second moved by this run (bytes found at the destination on a resume do not count)."""
        elapsed = self.elapsed(now)
        moved = max(0, self.bytes_done - self.resumed_from)
        return moved / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the current rate (None when not running or nothing moved yet)."""
        rate = self.rate(now)
        if not self.running or rate <= 0 or not self.bytes_total:
            return None
        return max(0, self.bytes_total - self.bytes_done) / rate

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


@dataclass(frozen=True)
class ServerIO:
    """Bytes programs read and wrote through the mount (plain read/write: rsync, gio copy,
    a cp the kernel does not hand over) for one server: they all passed through the client."""

    server: str
    read: int
    written: int


@dataclass(frozen=True)
class Status:
    transfers: tuple[Transfer, ...]
    mount_io: tuple[ServerIO, ...] = ()  # empty when the daemon does not say (another uid's view)
    at: float = field(default_factory=time.time)


def status(mount: Mount | None = None) -> Status:
    """The transfers of a running mount (on a root mount: the caller's own; root sees all)."""
    mount = mount or find_mount()
    reply = _ask(mount, {"op": "status"})
    if not isinstance(reply.get("transfers"), list):
        raise EtfsError("the mount daemon gave no status")
    io = reply.get("mount_io") or {}
    return Status(
        tuple(Transfer.from_dict(t) for t in reply["transfers"]),
        tuple(
            ServerIO(name, int(c.get("read", 0)), int(c.get("written", 0))) for name, c in sorted(io.items())
        ),
    )


def server_records(server: str, mount: Mount | None = None) -> tuple[Transfer, ...]:
    """The transfer records ``server`` keeps (they survive its restarts), newest first."""
    mount = mount or find_mount()
    reply = _ask(mount, {"op": "server-records", "server": server})
    return tuple(Transfer.from_dict(t) for t in reply.get("transfers") or ())


# --- copies -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CopyResult:
    """How one file's copy ended: ``outcome`` is "done", "failed" or "cancelled"."""

    source: str
    destination: str
    outcome: str
    transfer: Transfer | None = None
    message: str = ""
    errno: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == DONE


EventHandler = Callable[["Copy", dict[str, Any]], None]


class BandwidthLimit:
    """A bandwidth cap shared by every copy given the same object, as rsync's ``--bwlimit`` is
    per command: server-to-server copies from one source share it on that server (its
    ``group``), copies between the local disk and a server share one bucket here."""

    def __init__(self, rate: int) -> None:
        if rate < MIN_RATE:
            raise ValueError(f"a bandwidth limit is at least {MIN_RATE} bytes/s")
        self.rate = rate
        self.group = secrets.token_hex(8)
        self.throttle = Throttle([TokenBucket(rate)])

    @classmethod
    def parse(cls, text: str) -> BandwidthLimit | None:
        """``50M``, ``1.5G``, ``500k``, ``100Mbit`` (`etfs.common.ratelimit.parse_rate`); None: 0, off."""
        rate = parse_rate(text)
        return cls(rate) if rate else None


class Copy:
    """One file's copy, running in a thread of its own (`start_copy` makes them)."""

    def __init__(
        self,
        mount: Mount,
        src: Location,
        dst: Location,
        *,
        mode: str,
        streams: int | None,
        direction: str | None,
        verify: bool | None,
        preserve: frozenset[str],
        on_event: EventHandler | None,
        bwlimit: BandwidthLimit | None = None,
    ) -> None:
        self.mount, self.source, self.destination = mount, src, dst
        self._bwlimit = bwlimit
        self._opts = (mode, streams, direction, verify)
        self._preserve = preserve
        self._on_event = on_event
        self._lock = threading.Lock()
        self._latest: Transfer | None = None
        self._result: CopyResult | None = None
        self._over = threading.Event()
        self._cancel = threading.Event()
        self._cancelled_at = 0.0
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"etfs-copy {dst}", daemon=True)

    def _start(self) -> Copy:
        self._thread.start()
        return self

    def __repr__(self) -> str:
        return f"<Copy {self.source} -> {self.destination}>"

    # --- what callers use ----------------------------------------------------------------------
    def progress(self) -> Transfer | None:
        """The latest record of this copy (None until the daemon reported one)."""
        with self._lock:
            return self._latest

    def done(self) -> bool:
        return self._over.is_set()

    def wait(self, timeout: float | None = None) -> CopyResult:
        """Wait until the copy is over; `TimeoutError` if it is not within ``timeout`` seconds."""
        if not self._over.wait(timeout):
            raise TimeoutError(f"copy {self.source} -> {self.destination} still running after {timeout} s")
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Ask the copy to stop: a server-to-server copy is cancelled on both servers (its part
        file kept for a resume); `wait` returns once they confirmed it stopped."""
        with self._lock:
            if self._cancel.is_set():
                return
            self._cancelled_at = time.monotonic()
            self._cancel.set()
            if self._sock is not None:
                _half_close(self._sock)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # --- the thread ----------------------------------------------------------------------------
    def _event(self, ev: dict[str, Any]) -> None:
        if isinstance(ev.get("transfer"), dict):
            with self._lock:
                self._latest = Transfer.from_dict(ev["transfer"])
        if self._on_event is not None:
            try:
                self._on_event(self, ev)
            except Exception:  # a caller's callback must not end the copy
                log.exception("copy %s: event handler failed", self)

    def _finish(self, outcome: str, message: str = "", err: int = 0) -> None:
        self._result = CopyResult(
            str(self.source), str(self.destination), outcome, self.progress(), message, err
        )
        self._over.set()

    def _run(self) -> None:
        try:
            if self._cancel.is_set():
                self._finish(CANCELLED, "cancelled before it started", errno.EINTR)
            elif self.source.server and self.destination.server:
                self._run_remote()
            else:
                self._run_local()
        except EtfsError as exc:
            self._finish(FAILED, str(exc), errno.EIO)
        except Exception as exc:  # never leave a waiter hanging
            log.exception("copy %s failed", self)
            self._finish(FAILED, f"internal error: {exc!r}", errno.EIO)

    def _run_remote(self) -> None:
        mode, streams, direction, verify = self._opts
        req = {
            "op": "copy",
            "source": str(self.source),
            "destination": str(self.destination),
            "mode": mode,
            "streams": streams,
            "direction": direction,
            "verify": verify,
            "preserve_times": "timestamps" in self._preserve,
            "preserve_mode": "mode" in self._preserve,
        }
        if self._bwlimit is not None:
            req["bwlimit"], req["bwlimit_group"] = self._bwlimit.rate, self._bwlimit.group
        s = request(self.mount.socket, req)
        with self._lock:
            self._sock = s
            if self._cancel.is_set():
                _half_close(s)

        def keep_going() -> bool:
            return not self._cancel.is_set() or time.monotonic() - self._cancelled_at <= CANCEL_WAIT

        try:
            for ev in lines(s, keep_going):
                kind = ev.get("event")
                self._event(ev)
                if kind == "done":
                    self._finish(DONE)
                    return
                if kind in ("cancelled", "error"):
                    err = int(ev.get("errno") or errno.EIO)
                    self._finish(
                        CANCELLED if kind == "cancelled" else FAILED,
                        ev.get("message") or os.strerror(err),
                        err,
                    )
                    return
        finally:
            with self._lock:
                self._sock = None
            s.close()
        self._finish(FAILED, "the mount daemon closed the connection", errno.EIO)

    def _run_local(self) -> None:
        """Local <-> server: an ordinary copy through the mount, into a part file renamed at the end."""
        mode = self._opts[0]
        src, dst = self.source, self.destination
        started = time.time()
        try:
            sst = src.fs_path.stat()
            if dst.fs_path.exists():
                if noreplace(mode):
                    raise FileExistsError(errno.EEXIST, "destination exists (mode new)")
                dstat = dst.fs_path.stat()
                if mode == CopyMode.SKIP_EXISTING and same_version(
                    dstat.st_size, dstat.st_mtime_ns, sst.st_size, sst.st_mtime_ns
                ):
                    t = self._local_record("skipped", sst.st_size, 0, started)
                    self._event({"event": "done", "skipped": True, "transfer": t.as_dict()})
                    self._finish(DONE)
                    return
            # A name of its own: a server transfer into the same file uses ".NAME.etfs-part".
            part = dst.fs_path.with_name(local_part_name(dst.fs_path.name))
            try:
                self._copy_bytes(src.fs_path, part, sst.st_size, started)
                if "timestamps" in self._preserve and "mode" in self._preserve:
                    shutil.copystat(src.fs_path, part)
                elif "mode" in self._preserve:
                    shutil.copymode(src.fs_path, part)
                elif "timestamps" in self._preserve:
                    os.utime(part, ns=(sst.st_atime_ns, sst.st_mtime_ns))
                # mode new: a file that appeared meanwhile is not overwritten (EEXIST)
                flags = native.RENAME_NOREPLACE if noreplace(mode) else 0
                native.renameat2(AT_FDCWD, str(part), AT_FDCWD, str(dst.fs_path), flags)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        except _Stopped:
            self._finish(CANCELLED, "cancelled", errno.EINTR)
            return
        except OSError as exc:
            self._finish(FAILED, exc.strerror or str(exc), exc.errno or errno.EIO)
            return
        t = self._local_record("done", sst.st_size, sst.st_size, started, finished=time.time())
        self._event({"event": "done", "transfer": t.as_dict()})
        self._finish(DONE)

    def _local_record(
        self, state: str, total: int, done: int, started: float, finished: float = 0.0
    ) -> Transfer:
        return Transfer(
            id="",
            source=str(self.source),
            destination=str(self.destination),
            state=state,
            kind="client",
            bytes_total=total,
            bytes_done=done,
            bytes_via_client=done,
            started=started,
            finished=finished or (time.time() if state != "running" else 0.0),
        )

    def _copy_bytes(self, src: Path, dst: Path, size: int, started: float) -> None:
        """shutil.copyfile in chunks, stopping at the next chunk after `cancel`."""
        # never through a planted symlink or FIFO; 0o666 & umask as open() would
        throttle = self._bwlimit.throttle if self._bwlimit is not None else None
        chunk = throttle.piece if throttle is not None else COPY_CHUNK
        with open(src, "rb") as fin, create_new(dst, 0o666) as fout:
            pos = 0
            while True:
                if self._cancel.is_set():
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
                t = self._local_record("running", size, pos, started)
                self._event({"event": "progress", "transfer": t.as_dict()})
            if pos < size:
                raise OSError(errno.EIO, f"{src} shrank while copying")


class _Stopped(Exception):
    """A local copy stopped by `Copy.cancel`."""


def _half_close(s: socket.socket) -> None:
    # The daemon reads the end of our request stream as "cancel this copy".
    try:
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def start_copy(
    source: str | os.PathLike[str] | Location,
    destination: str | os.PathLike[str] | Location,
    *,
    mount: Mount | None = None,
    mode: str = "overwrite",
    streams: int | None = None,
    direction: str | None = None,
    verify: bool | None = None,
    preserve: Iterable[str] = PRESERVE_ALL,
    on_event: EventHandler | None = None,
    bwlimit: BandwidthLimit | None = None,
) -> Copy:
    """Start copying one file; returns at once with a `Copy` to follow, wait for or cancel.

    ``mode``: overwrite | new | resume | skip-existing.  ``streams``, ``direction`` (pull or
    push) and ``verify`` override the pair's configuration (None: as configured).  ``preserve``:
    what to keep of the source besides the bytes ("mode", "timestamps").  ``on_event`` is
    called (in the copy's thread) with every event line of the daemon, or of a local copy.
    ``bwlimit``: a `BandwidthLimit` shared with the other copies given the same one.
    ``destination`` names the file itself, not the directory it goes into.
    """
    if mode not in set(CopyMode):
        raise ValueError(f"mode must be one of {', '.join(sorted(CopyMode))}")
    if streams is not None and not 1 <= streams <= 64:
        raise ValueError("streams must be between 1 and 64")
    if direction not in (None, "pull", "push"):
        raise ValueError("direction must be 'pull', 'push' or None")
    keep = frozenset(preserve)
    if keep - PRESERVE_ALL:
        raise ValueError(f"preserve takes {', '.join(sorted(PRESERVE_ALL))}")
    if mount is None:
        mount = find_mount(paths=[str(p) for p in (source, destination) if not isinstance(p, Location)])
    src = source if isinstance(source, Location) else mount.resolve(source)
    dst = destination if isinstance(destination, Location) else mount.resolve(destination)
    if src.server is None and dst.server is None:
        raise EtfsError(f"neither '{src}' nor '{dst}' is on the etfs mount {mount.root}")
    return Copy(
        mount,
        src,
        dst,
        mode=mode,
        streams=streams,
        direction=direction,
        verify=verify,
        preserve=keep,
        on_event=on_event,
        bwlimit=bwlimit,
    )._start()


def copy(
    source: str | os.PathLike[str] | Location,
    destination: str | os.PathLike[str] | Location,
    *,
    timeout: float | None = None,
    **kw: Any,
) -> CopyResult:
    """`start_copy` and `Copy.wait`; a copy still running after ``timeout`` is cancelled, then
    `TimeoutError` is raised."""
    c = start_copy(source, destination, **kw)
    try:
        return c.wait(timeout)
    except TimeoutError:
        c.cancel()
        c.wait(CANCEL_WAIT + 5)
        raise
