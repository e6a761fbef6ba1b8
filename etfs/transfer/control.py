"""The mount daemon's control socket: how `etfs cp` and `etfs status` talk to the running mount.

A Unix stream socket (mode 0600, so only the mount's owner) carrying JSON lines.
Requests: ``{"op": "status"}`` -> one line ``{"transfers": [...]}``;
``{"op": "copy", "source": "SERVER:PATH", "destination": "SERVER:PATH", ...}`` ->
``{"event": "progress", "transfer": {...}}`` lines while it runs, then one
``{"event": "done", ...}`` or ``{"event": "error", "errno": N, "message": "..."}``.

Running mounts register themselves in `registry_dir()` so the commands find them
without flags.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import msgspec
import trio

from etfs.protocol import messages as m

from .engine import ClientTransfer, TransferEngine

log = logging.getLogger(__name__)
MAX_LINE = 1 << 20


def registry_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/etfs/mounts")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "etfs" / "mounts" if runtime else Path(f"/tmp/etfs-{os.geteuid()}/mounts")


def running_mounts() -> list[dict[str, Any]]:
    """Registered mounts whose daemon is still alive."""
    out = []
    d = registry_dir()
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            info = json.loads(p.read_text())
            os.kill(int(info["pid"]), 0)
        except (OSError, ValueError, KeyError):
            continue
        out.append(info)
    return out


def split_spec(spec: str) -> tuple[str, str]:
    server, sep, path = spec.partition(":")
    if not sep or not server or not path.startswith("/"):
        raise ValueError(f"expected SERVER:/PATH, got {spec!r}")
    return server, path


class ControlServer:
    def __init__(self, engine: TransferEngine, socket_path: Path) -> None:
        self.engine = engine
        self.path = socket_path

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        task_status.started(None)
        try:
            await trio.serve_listeners(self._client, [listener])
        finally:
            self.path.unlink(missing_ok=True)

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
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
                await self._dispatch(stream, request)
            except (ValueError, KeyError, TypeError) as exc:
                await _send(
                    stream, {"event": "error", "errno": errno.EINVAL, "message": f"bad request: {exc}"}
                )
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _dispatch(self, stream: trio.SocketStream, req: dict[str, Any]) -> None:
        op = req.get("op")
        if op == "status":
            await _send(stream, {"transfers": self.engine.status()})
            return
        if op == "server-records":
            # The records a server persisted (they survive its restarts), newest first.
            name = req["server"]
            if name not in self.engine.config.servers:
                raise ValueError(f"unknown server {name!r}")
            try:
                infos = await self.engine.pool[name].call(m.TransferList, list[m.TransferInfo])
            except OSError as exc:
                await _send(stream, {"event": "error", "errno": exc.errno or errno.EIO, "message": str(exc)})
                return
            rows = sorted((msgspec.structs.asdict(i) for i in infos), key=lambda r: -r["started"])
            await _send(stream, {"server": name, "transfers": rows})
            return
        if op != "copy":
            raise ValueError(f"unknown op {op!r}")
        src_server, src_path = split_spec(req["source"])
        dst_server, dst_path = split_spec(req["destination"])
        for name in (src_server, dst_server):
            if name not in self.engine.config.servers:
                await _send(
                    stream, {"event": "error", "errno": errno.ENOENT, "message": f"unknown server {name!r}"}
                )
                return
        result: dict[str, Any] = {}

        async def run(cancel: trio.CancelScope) -> None:
            try:
                t = await self.engine.copy(
                    src_server,
                    src_path,
                    dst_server,
                    dst_path,
                    mode=req.get("mode", "overwrite"),
                    streams=req.get("streams"),
                    direction=req.get("direction"),
                    verify=req.get("verify"),
                    preserve_times=bool(req.get("preserve_times", False)),
                )
                result.update(event="done", transfer=t.as_dict())
            except OSError as exc:
                result.update(event="error", errno=exc.errno or errno.EIO, message=exc.strerror or str(exc))
            cancel.cancel()

        async def watch_client(cancel: trio.CancelScope) -> None:
            # The `etfs cp` process went away (Ctrl-C): cancel its copy.
            try:
                while await stream.receive_some(4096):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            if not result:
                cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, nursery.cancel_scope)
            nursery.start_soon(watch_client, nursery.cancel_scope)
            nursery.start_soon(self._progress, stream, src_server, src_path, dst_server, dst_path)
        if result:
            await _send(stream, result)

    async def _progress(self, stream: trio.SocketStream, *spec: str) -> None:
        source, destination = f"{spec[0]}:{spec[1]}", f"{spec[2]}:{spec[3]}"
        while True:
            with trio.move_on_after(0.5):
                await self.engine.changed.wait()
            mine: list[ClientTransfer] = [
                t
                for t in self.engine.transfers.values()
                if t.source == source and t.destination == destination
            ]
            if mine:
                await _send(stream, {"event": "progress", "transfer": mine[-1].as_dict()})
            await trio.sleep(0.2)


async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\n")
