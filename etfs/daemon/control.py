"""The mount daemon's control socket: how `etfs cp` and `etfs status` talk to the running mount.

A Unix stream socket carrying JSON lines: mode 0600 (only the mount's owner) on a user's
mount; on a root mount (``shared``) 0666 in a 0755 directory, and every request is served
for the uid the kernel names (``SO_PEERCRED``, never a uid in the message): root sees every
transfer, any other uid only its own (`etfs.identities`).
Every request gets an answer line or a clean close: a malformed one is answered with
``{"event": "error", "errno": EINVAL, ...}``, and no client, however broken, can take
the mount daemon down.
Requests: ``{"op": "status"}`` -> one line ``{"transfers": [...], "mount_io": {SERVER: {"read": N,
"written": N}}}`` (``mount_io``: bytes programs read and wrote through the mount, `etfs.fs.traffic`;
only for the mount's owner and root);
``{"op": "login", "servers": {NAME: {"user": U, "key": HEX}}}`` and ``{"op": "logout"}``
(`etfs login` / `etfs logout`) -> one ``{"event": "done", ...}`` or error line;
``{"op": "copy", "source": "SERVER:PATH", "destination": "SERVER:PATH", ...}`` ->
``{"event": "progress", "transfer": {...}}`` lines while it runs, then one
``{"event": "done", ...}`` or ``{"event": "error", "errno": N, "message": "..."}``.
A client that half-closes its socket (``shutdown(SHUT_WR)``, what `etfs cp` does on
Ctrl-C) cancels its copy; once the servers have stopped it, the answer is
``{"event": "cancelled", "confirmed": true, ...}`` (or ``"done"`` if it finished first).

Running mounts register themselves in `registry_dir()` so the commands find them
without flags.  `ensure_registry_dir()` creates it (mode 0700) and refuses one that is a
symlink, owned by someone else or writable by group/others: the fallback under ``/tmp``
is a predictable name another user could have planted.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from etfs.common import excgroups
from etfs.common.ratelimit import MIN_RATE
from etfs.daemon.procs import pid_alive
from etfs.protocol import messages as m
from etfs.protocol.transfer import DATA_DIRECTIONS, CopyMode
from etfs.transfer.engine import ClientTransfer, TransferEngine

if TYPE_CHECKING:
    from etfs.identities import Identities

log = logging.getLogger(__name__)
MAX_LINE = 1 << 20


COPY_MODES = frozenset(CopyMode)
DIRECTIONS = frozenset(DATA_DIRECTIONS)
MAX_STREAMS = 64
# A root mount's registry: other local users look here too (`etfs login`, `etfs cp`).
SYSTEM_REGISTRY = Path("/run/etfs/mounts")


class UnsafeRegistryDir(OSError):
    """The registry directory is a symlink, not ours, or writable by others."""


def _registry_base() -> tuple[Path, Path]:
    """(base we do not own, registry directory below it)."""
    if os.geteuid() == 0:
        return Path("/run"), Path("/run/etfs/mounts")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime), Path(runtime) / "etfs" / "mounts"
    return Path("/tmp"), Path(f"/tmp/etfs-{os.geteuid()}/mounts")


def registry_dir() -> Path:
    return _registry_base()[1]


def check_private_dir(path: Path, owner: int | None = None) -> None:
    """Raise `UnsafeRegistryDir` unless ``path`` is a real directory owned by ``owner`` (default:
    us), not group/other-writable."""
    owner = os.geteuid() if owner is None else owner
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeRegistryDir(errno.ELOOP, f"{path} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRegistryDir(errno.ENOTDIR, f"{path} is not a directory")
    if st.st_uid != owner:
        raise UnsafeRegistryDir(errno.EPERM, f"{path} is owned by uid {st.st_uid}, not by {owner}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeRegistryDir(
            errno.EPERM, f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        )


def ensure_registry_dir(path: Path | None = None, base: Path | None = None, shared: bool = False) -> Path:
    """Create the registry directory (every level below ``base`` with mode 0700, 0755 if
    ``shared``: a root mount's local users find it) and check it.

    Each level we own is refused with `UnsafeRegistryDir` if it is a symlink, owned by
    another user, or writable by group/others.  Defaults to `registry_dir()`.
    """
    mode = 0o755 if shared else 0o700
    if path is None:
        base, path = _registry_base()
    elif base is None:
        base = path.parent
    levels = [path, *path.parents]
    for level in reversed(levels[: levels.index(base)] if base in levels else [path]):
        try:
            os.mkdir(level, mode)
        except FileExistsError:
            pass
        else:
            os.chmod(level, mode, follow_symlinks=False)  # whatever the umask was
        check_private_dir(level)
        if shared and stat.S_IMODE(os.lstat(level).st_mode) != mode:
            os.chmod(level, mode, follow_symlinks=False)  # an older private one: open it
    return path


def running_mounts() -> list[dict[str, Any]]:
    """Registered mounts whose daemon is still alive (never raises; skips anything odd)."""
    out: list[dict[str, Any]] = []
    dirs: list[tuple[Path, int | None]] = [(registry_dir(), None)]
    if os.geteuid() != 0:
        dirs.append((SYSTEM_REGISTRY, 0))  # root mounts, shared with every local user
    entries: list[Path] = []
    for d, owner in dirs:
        try:
            check_private_dir(d, owner)
        except UnsafeRegistryDir as exc:
            log.warning("ignoring the mount registry: %s", exc.strerror)
            continue
        except OSError:
            continue
        try:
            entries += sorted(d.glob("*.json"))
        except OSError:
            continue
    for p in entries:
        try:
            info = json.loads(p.read_text())
            if not isinstance(info, dict):
                continue
            if not isinstance(info.get("socket"), str) or not isinstance(info.get("root"), str):
                continue
            if not isinstance(info.get("servers"), dict):
                continue
            if not pid_alive(int(info["pid"])):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.append(info)
    return out


def forget_dead_daemons(reg: Path | None = None) -> list[Path]:
    """Remove the registry entries (``PID.json``, ``PID.sock``) of daemons that are dead.

    Dead means `pid_alive` says so: gone, or a zombie nobody reaped yet (after kill -9).
    Used when a daemon starts and by `etfs umount`; returns what was removed.
    """
    d = registry_dir() if reg is None else reg
    try:
        check_private_dir(d)
        entries = list(d.glob("*.json")) + list(d.glob("*.sock"))
    except OSError:
        return []
    removed = []
    for entry in entries:
        try:
            pid = int(entry.stem)
        except ValueError:
            continue
        if not pid_alive(pid):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@dataclass(frozen=True)
class CopyRequest:
    source: str
    destination: str
    mode: str
    streams: int | None
    direction: str | None
    verify: bool | None
    preserve_times: bool
    preserve_mode: bool = False
    bwlimit: int = 0  # bytes/s for every copy of the same ``bwlimit_group`` together
    bwlimit_group: str = ""


def parse_copy_request(req: dict[str, Any]) -> CopyRequest:
    """Check a ``copy`` request's fields; `ValueError` naming the first bad one."""
    for key in ("source", "destination"):
        if not isinstance(req.get(key), str):
            raise ValueError(f"{key!r} must be a string SERVER:/PATH")
    mode = req.get("mode", "overwrite")
    if not isinstance(mode, str) or mode not in COPY_MODES:
        raise ValueError(f"'mode' must be one of {', '.join(sorted(COPY_MODES))}")
    streams = req.get("streams")
    if streams is not None and (
        isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= MAX_STREAMS
    ):
        raise ValueError(f"'streams' must be an integer 1..{MAX_STREAMS} or null")
    direction = req.get("direction")
    if direction is not None and (not isinstance(direction, str) or direction not in DIRECTIONS):
        raise ValueError("'direction' must be 'pull', 'push' or null")
    verify = req.get("verify")
    if verify is not None and not isinstance(verify, bool):
        raise ValueError("'verify' must be true, false or null")
    preserve_times = req.get("preserve_times", False)
    preserve_mode = req.get("preserve_mode", False)
    if not isinstance(preserve_times, bool) or not isinstance(preserve_mode, bool):
        raise ValueError("'preserve_times' and 'preserve_mode' must be true or false")
    bwlimit = req.get("bwlimit", 0)
    if isinstance(bwlimit, bool) or not isinstance(bwlimit, int) or not (bwlimit == 0 or bwlimit >= MIN_RATE):
        raise ValueError(f"'bwlimit' must be 0 (no limit) or an integer >= {MIN_RATE} (bytes/s)")
    group = req.get("bwlimit_group", "")
    if not isinstance(group, str) or len(group) > 64:
        raise ValueError("'bwlimit_group' must be a string of at most 64 characters")
    return CopyRequest(
        req["source"],
        req["destination"],
        mode,
        streams,
        direction,
        verify,
        preserve_times,
        preserve_mode,
        bwlimit,
        group,
    )


def _only_broken_connection(exc: BaseException) -> bool:
    """True if ``exc`` is (a group made only of) errors meaning the client went away."""
    return excgroups.only(
        exc, (trio.BrokenResourceError, trio.ClosedResourceError, BrokenPipeError, ConnectionResetError)
    )


def split_spec(spec: str) -> tuple[str, str]:
    server, sep, path = spec.partition(":")
    if not sep or not server or not path.startswith("/"):
        raise ValueError(f"expected SERVER:/PATH, got {spec!r}")
    return server, path


def peer_uid(stream: trio.SocketStream) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel says."""
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    """The control socket; with ``identities`` each request is served for its peer's uid."""

    def __init__(
        self,
        engine: TransferEngine,
        socket_path: Path,
        identities: Identities | None = None,
        *,
        shared: bool = False,
    ) -> None:
        self.engine = engine
        self.path = socket_path
        self.identities = identities
        self.shared = shared

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bind synchronously under a umask that makes the socket 0600 from the start
            # (no window where others may connect); nothing else runs in between.  A shared
            # (root) mount's socket is for every local user: each request is served for its
            # peer's uid.
            mode = 0o666 if self.shared else 0o600
            old_umask = os.umask(0o777 & ~mode)
            try:
                raw.bind(str(self.path))
            finally:
                os.umask(old_umask)
            os.chmod(self.path, mode)
            raw.listen(64)
        except BaseException:
            raw.close()
            raise
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
        task_status.started(None)
        try:
            await trio.serve_listeners(self._client, [listener])
        finally:
            self.path.unlink(missing_ok=True)

    async def _client(self, stream: trio.SocketStream) -> None:
        """One client connection.  Never raises (except cancellation): one bad client must
        not take the daemon down."""
        async with stream:
            try:
                await self._handle(stream)
            except Exception as exc:
                if _only_broken_connection(exc):
                    return
                log.exception("control socket: request failed")
                await _send_quietly(
                    stream, {"event": "error", "errno": errno.EIO, "message": f"internal error: {exc!r}"}
                )

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_LINE:
                    raise ValueError("request too long")
            request = json.loads(buf.split(b"\n", 1)[0])
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            uid = peer_uid(stream) if self.identities is not None else 0
            await self._dispatch(stream, request, uid)
        except (ValueError, KeyError, TypeError) as exc:
            await _send_quietly(
                stream, {"event": "error", "errno": errno.EINVAL, "message": f"bad request: {exc}"}
            )

    def _engine(self, uid: int) -> TransferEngine | None:
        """The engine whose transfers ``uid`` may start and see (None: none)."""
        if self.identities is None:
            return self.engine
        return self.identities.engine_for(uid)

    def _status(self, uid: int) -> list[dict[str, Any]]:
        """Transfers ``uid`` may see: root every uid's (each row with its ``uid``), others their own."""
        if self.identities is None:
            return self.engine.status()
        if self.identities.privileged(uid):
            rows = []
            for owner, engine in self.identities.engines().items():
                rows += [{**row, "uid": owner} for row in engine.status()]
            return rows
        own = self.identities.engine_for(uid)
        return [] if own is None else [{**row, "uid": uid} for row in own.status()]

    async def _dispatch(self, stream: trio.SocketStream, req: dict[str, Any], uid: int) -> None:
        op = req.get("op")
        if op == "status":
            reply: dict[str, Any] = {"transfers": self._status(uid)}
            if self.identities is None or self.identities.privileged(uid):
                # Every uid's reads and writes through the mount: for the mount's owner (and root) only.
                from etfs.fs.traffic import MOUNT_IO

                reply["mount_io"] = MOUNT_IO.as_dict(list(self.engine.config.servers))
            await _send(stream, reply)
            return
        if op in ("login", "logout"):
            await self._login(stream, req, uid)
            return
        maybe_engine = self._engine(uid)
        if maybe_engine is None:
            await _send(
                stream,
                {
                    "event": "error",
                    "errno": errno.EACCES,
                    "message": f"uid {uid} has no etfs identity on this mount: run 'etfs login' first",
                },
            )
            return
        engine = maybe_engine
        if op == "server-records":
            # The records a server persisted (they survive its restarts), newest first.
            name = req.get("server")
            if not isinstance(name, str):
                raise ValueError("'server' must be a string")
            if name not in engine.config.servers:
                raise ValueError(f"unknown server {name!r}")
            try:
                if name not in engine.pool.clients:
                    raise OSError(errno.EACCES, f"uid {uid} did not log in to {name}")
                infos = await engine.pool[name].call(m.TransferList())
            except OSError as exc:
                await _send(stream, {"event": "error", "errno": exc.errno or errno.EIO, "message": str(exc)})
                return
            rows = sorted((msgspec.structs.asdict(i) for i in infos), key=lambda r: -r["started"])
            await _send(stream, {"server": name, "transfers": rows})
            return
        if op != "copy":
            raise ValueError(f"unknown op {op!r}")
        creq = parse_copy_request(req)
        src_server, src_path = split_spec(creq.source)
        dst_server, dst_path = split_spec(creq.destination)
        for name in (src_server, dst_server):
            if name not in engine.config.servers:
                await _send(
                    stream, {"event": "error", "errno": errno.ENOENT, "message": f"unknown server {name!r}"}
                )
                return
        result: dict[str, Any] = {}
        records: list[ClientTransfer] = []
        copy_scope = trio.CancelScope()
        client_gone = False

        async def run(done: trio.CancelScope) -> None:
            with copy_scope:
                try:
                    if src_server not in engine.pool.clients or dst_server not in engine.pool.clients:
                        raise OSError(errno.EACCES, f"uid {uid} did not log in to both servers")
                    t = await engine.copy(
                        src_server,
                        src_path,
                        dst_server,
                        dst_path,
                        mode=creq.mode,
                        streams=creq.streams,
                        direction=creq.direction,
                        verify=creq.verify,
                        preserve_times=creq.preserve_times,
                        on_record=records.append,
                        bwlimit=creq.bwlimit,
                        # One user's groups only: another user's cp cannot share (or spend) a limit.
                        bwlimit_group=f"cp:{uid}:{creq.bwlimit_group}" if creq.bwlimit_group else "",
                    )
                    if creq.preserve_mode and t.state == "done":
                        await _keep_mode(engine, src_server, src_path, dst_server, dst_path)
                    result.update(event="done", transfer=t.as_dict())
                except OSError as exc:
                    result.update(
                        event="error", errno=exc.errno or errno.EIO, message=exc.strerror or str(exc)
                    )
            done.cancel()

        async def watch_client() -> None:
            # End of the request stream: `etfs cp` asks to cancel (Ctrl-C half-closes its
            # socket) or went away.  Cancel the copy; `run` then ends it on the servers.
            nonlocal client_gone
            try:
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            if not result:
                client_gone = True
                copy_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, nursery.cancel_scope)
            nursery.start_soon(watch_client)
            nursery.start_soon(self._progress, stream, engine, src_server, src_path, dst_server, dst_path)
        if not result and client_gone and records:
            # Cancelled: say how it ended (only now: the servers have answered the cancel).
            t = records[-1]
            if t.state == "done":
                result.update(event="done", transfer=t.as_dict())
            else:
                result.update(
                    event="cancelled",
                    errno=errno.EINTR,
                    message=t.reason or "cancelled",
                    confirmed=bool(t.cancel_confirmed),
                    transfer=t.as_dict(),
                )
        if result:
            await _send_quietly(stream, result)

    async def _progress(self, stream: trio.SocketStream, engine: TransferEngine, *spec: str) -> None:
        source, destination = f"{spec[0]}:{spec[1]}", f"{spec[2]}:{spec[3]}"
        while True:
            with trio.move_on_after(0.5):
                await engine.changed.wait()
            mine: list[ClientTransfer] = [
                t for t in engine.transfers.values() if t.source == source and t.destination == destination
            ]
            if mine:
                await _send(stream, {"event": "progress", "transfer": mine[-1].as_dict()})
            await trio.sleep(0.2)

    async def _login(self, stream: trio.SocketStream, req: dict[str, Any], uid: int) -> None:
        """`etfs login` / `etfs logout` of the peer's uid."""
        if self.identities is None:
            raise ValueError(f"{req['op']!r} is not served by this mount")
        if req["op"] == "logout":
            had = self.identities.logout(uid)
            await _send(stream, {"event": "done", "uid": uid, "logged_out": had})
            return
        servers = req.get("servers")
        if not isinstance(servers, dict) or not servers:
            raise ValueError("'servers' must be a mapping NAME -> {user, key}")
        credentials: dict[str, tuple[str, bytes]] = {}
        for name, cred in servers.items():
            if not isinstance(cred, dict) or not isinstance(cred.get("user"), str):
                raise ValueError(f"server {name!r}: 'user' must be a string")
            if not isinstance(cred.get("key"), str):
                raise ValueError(f"server {name!r}: 'key' must be a hex string")
            credentials[name] = (cred["user"], bytes.fromhex(cred["key"]))
        try:
            users = await self.identities.login(uid, credentials)
        except OSError as exc:
            await _send(
                stream,
                {"event": "error", "errno": exc.errno or errno.EIO, "message": exc.strerror or str(exc)},
            )
            return
        await _send(stream, {"event": "done", "uid": uid, "servers": users})


async def _keep_mode(engine: TransferEngine, src_server: str, src: str, dst_server: str, dst: str) -> None:
    """The destination server creates a transfer's file with a mode of its own: give it the
    source's (`cp -p`).  Asked of the servers, not through the mount, whose kernel may still
    cache the destination as absent."""
    try:
        want = stat.S_IMODE((await engine.pool[src_server].call(m.Stat(path=src))).mode)
        have = stat.S_IMODE((await engine.pool[dst_server].call(m.Stat(path=dst))).mode)
        if want != have:
            await engine.pool[dst_server].call(m.SetAttr(path=dst, mode=want))
    except OSError as exc:
        raise OSError(
            exc.errno or errno.EIO, f"copied, but cannot keep the mode: {exc.strerror or exc}"
        ) from None


async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")


async def _send_quietly(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    """`_send`, ignoring a client that already went away."""
    try:
        await _send(stream, obj)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
