"""Helpers for server-to-server transfer tests: real servers, a client engine, a TCP proxy, netns.

* `Cluster` (fixture ``cluster``): two or more real ``etfs_server`` processes (each with its
  own export, state dir and log, started through `server_helpers.ServerProcess`) and a
  `ClientConfig` for them; `open_engine()` gives a `Pool` + `TransferEngine` in this process.
  `Node.kill()` SIGKILLs a server by pid; `Node.restart()` starts it again on the same ports.
* `Proxy`: a threaded userspace TCP proxy that understands the data-connection wire format
  (`etfs.protocol.data`) in the source -> destination direction: it counts payload bytes,
  can limit their rate, corrupt one byte of the Nth block, stall, or cut a connection after
  N bytes.  To put it on a pull path, the source's data port is proxied from another
  loopback address (127.0.0.2:PORT -> 127.0.0.1:PORT) and the client config names that
  address as the source's ``peer_address`` (the engine's ``_data_host`` uses it, the port
  always comes from the capability).
* `NetnsLab` (fixture ``netns_lab``): network namespaces and veth pairs with per-run unique
  names, servers run with ``ip netns exec``; everything (processes by pid, namespaces) is
  removed in a finalizer.
* `client_main`: a copy run in a subprocess (``python tests/transfer_helpers.py JSON``), for
  "the client process was killed" and for a client inside a namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from server_helpers import REPO, ServerProcess, make_key, write_server_yaml

from etfs.client import Pool
from etfs.config import ClientConfig, ServerEntry, TransferDefaults
from etfs.protocol import data as d
from etfs.transfer.engine import ClientTransfer, TransferEngine

MIB = 1 << 20
USER = "u"
EXPORT = "d"
HELPER = Path(__file__).resolve()


# --- small utilities ---------------------------------------------------------------------------------
async def wait_until(cond: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` (another process's state can only be polled) until true, or fail."""
    deadline = trio.current_time() + timeout
    while not cond():
        if trio.current_time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await trio.sleep(0.02)


async def wait_until_async(
    cond: Callable[[], Awaitable[object]], timeout: float = 20.0, what: str = "condition"
) -> None:
    deadline = trio.current_time() + timeout
    while not await cond():
        if trio.current_time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await trio.sleep(0.02)


def make_file(path: Path, size: int, seed: int = 0) -> str:
    """A file of pseudo-random (incompressible, block-distinct) bytes; returns its sha256."""
    h = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        counter = 0
        left = size
        while left > 0:
            chunk = hashlib.shake_256(f"{seed}:{counter}".encode()).digest(min(left, MIB))
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            counter += 1
    return h.hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def leftovers(directory: Path) -> list[str]:
    """Part files, restart records and journals left in a directory tree."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*.etfs-part*"))


# --- servers -------------------------------------------------------------------------------------------
@dataclass
class Node:
    name: str
    base: Path
    export: Path
    key_file: Path
    config: Path
    proc: ServerProcess
    peer_address: tuple[str, int] | None = None

    @property
    def state_dir(self) -> Path:
        return self.base / f"state-{self.name}"

    @property
    def control_port(self) -> int:
        return self.proc.control_port

    @property
    def data_port(self) -> int:
        return self.proc.data_port

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid

    def records(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in sorted((self.state_dir / "transfers").glob("*.json")):
            rec = json.loads(p.read_text())
            out[rec["id"]] = rec
        return out

    def record(self, transfer_id: str) -> dict[str, Any]:
        return self.records()[transfer_id]

    def kill(self) -> None:
        """SIGKILL by pid (no graceful shutdown: records stay 'running' on disk)."""
        popen = self.proc.proc
        assert popen is not None
        os.kill(popen.pid, signal.SIGKILL)
        popen.wait(10)
        self.proc.proc = None

    def restart(self) -> None:
        """Start again on the same control and data ports (the proxy and the client keep them)."""
        cport, dport = self.control_port, self.data_port
        self.proc.start("--listen", f"127.0.0.1:{cport}", "--data-listen", f"127.0.0.1:{dport}")
        assert (self.control_port, self.data_port) == (cport, dport)


@dataclass
class Cluster:
    base: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    key_file: Path | None = None

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def add(
        self,
        name: str,
        transfer: dict[str, Any] | None = None,
        pre_start: Callable[[Path], None] | None = None,
        **extra: Any,
    ) -> Node:
        """Start server ``name``; ``pre_start(export)`` runs first (e.g. to mount a filesystem there)."""
        assert self.key_file is not None
        base = self.base / name
        export = base / "export"
        export.mkdir(parents=True)
        if pre_start is not None:
            pre_start(export)
        doc_extra: dict[str, Any] = dict(extra)
        if transfer:
            doc_extra["transfer"] = transfer
        config = write_server_yaml(
            base / "server.yaml",
            exports={EXPORT: {"path": str(export), "acl": [{"who": USER, "path": "/", "rights": "all"}]}},
            users={USER: {"key_file": str(self.key_file)}},
            name=name,
            extra=doc_extra,
        )
        proc = ServerProcess(config, base)
        node = Node(name, base, export, self.key_file, config, proc)
        self.nodes[name] = node
        proc.start()
        return node

    def client_config(
        self,
        *,
        block_size: int = 8 * MIB,
        streams: int = 4,
        direction: str = "pull",
        third_party: str = "auto",
        request_timeout: float = 20.0,
    ) -> ClientConfig:
        defaults = TransferDefaults(
            streams=streams,
            direction=direction,
            third_party=third_party,
            verify=True,
            block_size=block_size,
        )
        assert self.key_file is not None
        servers = {
            n.name: ServerEntry(
                name=n.name,
                addresses=(("127.0.0.1", n.control_port),),
                user=USER,
                key_file=self.key_file,
                export=EXPORT,
                peer_address=n.peer_address,
            )
            for n in self.nodes.values()
        }
        return ClientConfig(
            file=self.base / "mountpoints.yaml",
            root=self.base / "mnt",
            servers=servers,
            transfer=defaults,
            connect_timeout=5.0,
            request_timeout=request_timeout,
        )

    def stop(self) -> None:
        for n in self.nodes.values():
            n.proc.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """An empty `Cluster`; ``cluster.add(name)`` starts servers, all killed by pid at teardown."""
    c = Cluster(tmp_path)
    c.key_file = tmp_path / "u.key"
    make_key(c.key_file)
    try:
        yield c
    finally:
        c.stop()


@contextlib.asynccontextmanager
async def open_engine(config: ClientConfig) -> AsyncIterator[TransferEngine]:
    """A `Pool` + `TransferEngine` living in this trio run; connections closed on exit."""
    async with trio.open_nursery() as nursery:
        pool = Pool(config, nursery)
        try:
            yield TransferEngine(pool, config)
        finally:
            with trio.CancelScope(shield=True):
                await pool.aclose()
            nursery.cancel_scope.cancel()


def running_transfer(engine: TransferEngine) -> ClientTransfer | None:
    for t in engine.transfers.values():
        if t.state not in ("done", "failed", "skipped", "cancelled"):
            return t
    return None


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    """``tmpfs(path, "20m")`` mounts a small tmpfs on ``path``; unmounted (lazily) at teardown."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> None:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(path)

    try:
        yield mount
    finally:
        for p in reversed(mounted):
            subprocess.run(["umount", "-l", str(p)], capture_output=True, check=False)


# --- a data-port client of its own ----------------------------------------------------------------------
# Written from the wire format (struct, hmac, plain msgpack maps), not with etfs.protocol.data,
# so that a bug there cannot hide one in the server.
RAW_MAGIC = b"ETFSDAT2"


def _recv_n(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("peer closed")
        buf += chunk
    return buf


def _hm(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def raw_data_open(port: int, secret: bytes, hello: dict[str, Any]) -> socket.socket | None:
    """Open a data connection the way a server does, with ``secret``; sends ``hello`` (a dict of
    DataHello fields) with the proof.  None when the port does not know the secret."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    kid = _hm(secret, b"etfs-data-key-id")[:16]
    nc = os.urandom(16)
    sock.sendall(RAW_MAGIC + kid + nc)
    greeting = _recv_n(sock, 57)
    magic, status, nl, mac = greeting[:8], greeting[8], greeting[9:25], greeting[25:]
    assert magic == RAW_MAGIC, greeting
    if status == 1:
        sock.close()
        return None
    assert mac == _hm(secret, b"etfs-data\0listener" + kid + nc + nl), "listener did not prove the secret"
    proof = _hm(secret, b"etfs-data\0connector" + kid + nc + nl)
    body = msgspec.msgpack.encode({"t": "hello", "proof": proof, **hello})  # a test may forge the proof
    sock.sendall(struct.pack(">I", len(body)) + body)
    return sock


def raw_pull(port: int, cap: Any, **hello: Any) -> dict[str, Any]:
    """Present capability ``cap`` on a source's data port: its reply ({"t": "ready"|"error", ...}),
    and for "ready" the first block's bytes under "block"; {"t": "unknown"} if the key is unknown."""
    fields = {"kind": "pull", "token": cap.token, "transfer_id": cap.transfer_id, "stream": 0}
    fields.update({"destination": "raw:/somewhere", "streams": 1, **hello})
    sock = raw_data_open(port, cap.secret, fields)
    if sock is None:
        return {"t": "unknown"}
    with sock:
        (length,) = struct.unpack(">I", _recv_n(sock, 4))
        reply: dict[str, Any] = msgspec.msgpack.decode(_recv_n(sock, length))
        if reply["t"] == "ready":
            want = min(cap.size, 65536)
            sock.sendall(struct.pack(">QQI", 0, want, 0))
            _, got, status = struct.unpack(">QQI", _recv_n(sock, 20))
            reply["block"] = _recv_n(sock, got) if status == 0 else b""
        return reply


class Recorder:
    """A plain TCP listener that is not an etfs data port: records every byte each connection sent.

    ``answer``: bytes it sends to every connection at once (a chatty service), or None (silent).
    """

    def __init__(self, answer: bytes | None = None) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self._srv = socket.create_server(("127.0.0.1", 0))
        self._srv.settimeout(0.2)
        self.port = self._srv.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._record, args=(conn,), daemon=True).start()

    def _record(self, conn: socket.socket) -> None:
        got = b""
        with conn:
            conn.settimeout(30)
            try:
                if self.answer is not None:
                    conn.sendall(self.answer)
                while chunk := conn.recv(65536):
                    got += chunk
            except OSError:
                pass
        self.received.append(got)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._srv.close()


# --- the proxy -----------------------------------------------------------------------------------------
class Proxy:
    """A TCP proxy ``listen -> target`` that parses etfs data connections in one direction.

    ``payload_from_target``: True when the target is the source (pull), False when the
    connecting side is (push).  ``frames``: framed messages the payload side sends before
    the block stream (pull: DataReady = 1; push: DataHello + DataReady = 2).
    """

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        *,
        payload_from_target: bool = True,
        frames: int = 1,
        rate: float | None = None,
        corrupt_block: int | None = None,
        cut_after: int | None = None,
        cut_count: int = 1,
        stall_at: int | None = None,
    ) -> None:
        self.listen_addr = listen
        self.target = target
        self.payload_from_target = payload_from_target
        self.frames = frames
        self.rate = rate
        self.corrupt_block = corrupt_block
        self.cut_after = cut_after
        self.cut_count = cut_count
        # Stop forwarding once this many block bytes passed (until resume()): a test that acts
        # "during" a copy then knows the copy cannot finish first, however slow the test runs.
        self.stall_at = stall_at
        self.lock = threading.Lock()
        self.bytes_payload = 0  # bytes forwarded in the payload direction (headers included)
        self.block_bytes = 0  # block payload bytes only
        self.blocks_seen = 0
        self.corrupted = 0
        self.connections = 0
        self.cuts = 0
        self.errors: list[BaseException] = []
        self.flowing = threading.Event()
        self.flowing.set()
        self._closed = False
        self._next_send = 0.0
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(listen)
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]

    def __enter__(self) -> Proxy:
        t = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self._threads.append(t)
        t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self._closed = True
        self.flowing.set()
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(10)
        with contextlib.suppress(OSError):
            self.listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            try:
                up = socket.create_connection(self.target, timeout=5)
                up.settimeout(None)
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.connections += 1
                self._socks += [conn, up]
            if self.payload_from_target:
                payload_src, payload_dst, back_src, back_dst = up, conn, conn, up
            else:
                payload_src, payload_dst, back_src, back_dst = conn, up, up, conn
            for target, args in (
                (self._pump_payload, (payload_src, payload_dst, (conn, up))),
                (self._pump_plain, (back_src, back_dst)),
            ):
                t = threading.Thread(target=self._guard, args=(target, *args), daemon=True)
                self._threads.append(t)
                t.start()

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except OSError:
            pass
        except BaseException as exc:  # a bug in the proxy: report it from the test, not a thread
            self.errors.append(exc)
        finally:
            for s in args[:2]:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _pump_plain(self, src: socket.socket, dst: socket.socket) -> None:
        while chunk := src.recv(65536):
            dst.sendall(chunk)

    def _throttle(self, n: int) -> None:
        if self.rate is None:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self._next_send)
            self._next_send = start + n / self.rate
        if start > now:
            time.sleep(start - now)

    def _pump_payload(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...]) -> None:
        buf = bytearray()
        frames_left = self.frames
        # The payload side speaks first with a fixed-size greeting (pull: the source's GREETING
        # as listener; push: the source's OPEN as connector), then its frames.
        need: str = "prefix"  # prefix | frame | header | payload | digest
        prefix = d.GREETING.size if self.payload_from_target else d.OPEN.size
        remaining = 0  # bytes of the current payload still to pass
        sent_here = 0
        corrupt_here = False
        max_chunk = 65536 if self.rate is None else max(4096, min(65536, int(self.rate / 50)))
        while True:
            self.flowing.wait()
            if self._closed:
                return
            chunk = src.recv(max_chunk)
            if not chunk:
                return
            out = bytearray(chunk)
            # Walk the protocol over this chunk (headers may straddle chunks: keep a tail).
            pos = 0
            while pos < len(out):
                if need == "payload":
                    take = min(remaining, len(out) - pos)
                    if corrupt_here and take > 0:
                        out[pos + take // 2] ^= 0xFF
                        corrupt_here = False
                        with self.lock:
                            self.corrupted += 1
                    remaining -= take
                    pos += take
                    with self.lock:
                        self.block_bytes += take
                        if self.stall_at is not None and self.block_bytes >= self.stall_at:
                            self.stall_at = None
                            self.flowing.clear()
                    if remaining == 0:
                        need, buf = "digest", bytearray()
                    continue
                buf.append(out[pos])
                pos += 1
                if need == "prefix":
                    if len(buf) == prefix:
                        need, buf = "frame", bytearray()
                    continue
                if need == "frame" and frames_left == 0:
                    need = "header"
                if need == "frame":
                    if len(buf) >= d.LENGTH.size:
                        (length,) = d.LENGTH.unpack_from(buf)
                        if len(buf) == d.LENGTH.size + length:
                            frames_left -= 1
                            buf = bytearray()
                            if frames_left == 0:
                                need = "header"
                elif need == "header" and len(buf) == d.BLOCK.size:
                    _, length, status = d.BLOCK.unpack(bytes(buf))
                    buf = bytearray()
                    if status == 0 and length > 0:
                        need, remaining = "payload", length
                        with self.lock:
                            n = self.blocks_seen
                            self.blocks_seen += 1
                            corrupt_here = self.corrupt_block is not None and n == self.corrupt_block
                    elif status == 0:
                        need = "digest"
                elif need == "digest" and len(buf) == d.TRAILER.size:
                    need, buf = "header", bytearray()
            self._throttle(len(out))
            cut = False
            if self.cut_after is not None:
                with self.lock:
                    if self.cut_count > 0 and sent_here + len(out) >= self.cut_after:
                        self.cut_count -= 1
                        self.cuts += 1
                        out = out[: max(0, self.cut_after - sent_here)]
                        cut = True
            dst.sendall(out)
            sent_here += len(out)
            with self.lock:
                self.bytes_payload += len(out)
            if cut:
                for s in pair:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                return


def proxied_source(node: Node, **kw: Any) -> Proxy:
    """A proxy on 127.0.0.2:<node's data port> -> 127.0.0.1:<data port>; pull traffic from ``node``
    goes through it once ``node.peer_address`` names 127.0.0.2 (set here: build the client config after).
    """
    proxy = Proxy(("127.0.0.2", node.data_port), ("127.0.0.1", node.data_port), **kw)
    node.peer_address = ("127.0.0.2", node.control_port)
    return proxy


# --- a copy in a separate client process ---------------------------------------------------------------
def client_command(spec: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[str]:
    # Run as a script, the helper would import the installed etfs (another checkout's, in a
    # git worktree) instead of this tree's: put this tree first.
    boot = f"import runpy, sys; sys.path[:0] = [{str(REPO)!r}, {str(HELPER.parent)!r}]; " + (
        f"sys.argv = sys.argv[1:]; runpy.run_path({str(HELPER)!r}, run_name='__main__')"
    )
    return [*prefix, sys.executable, "-c", boot, str(HELPER), json.dumps(spec)]


def client_spec(
    config: ClientConfig, src: str, src_path: str, dst: str, dst_path: str, **copy_kw: Any
) -> dict[str, Any]:
    """A JSON-able description of one copy for `client_main`."""
    return {
        "servers": [
            {
                "name": e.name,
                "addresses": [list(a) for a in e.addresses],
                "key_file": str(e.key_file),
                "peer_address": list(e.peer_address) if e.peer_address else None,
            }
            for e in config.servers.values()
        ],
        "transfer": dataclasses.asdict(config.transfer),
        "root": str(config.root),
        "copy": [src, src_path, dst, dst_path],
        "kw": copy_kw,
    }


def spec_config(spec: dict[str, Any]) -> ClientConfig:
    servers = {
        s["name"]: ServerEntry(
            name=s["name"],
            addresses=tuple((h, p) for h, p in s["addresses"]),
            user=USER,
            key_file=Path(s["key_file"]),
            export=EXPORT,
            peer_address=tuple(s["peer_address"]) if s["peer_address"] else None,
        )
        for s in spec["servers"]
    }
    return ClientConfig(
        file=Path(spec["root"]) / "x.yaml",
        root=Path(spec["root"]),
        servers=servers,
        transfer=TransferDefaults(**spec["transfer"]),
        connect_timeout=5.0,
        request_timeout=20.0,
    )


def client_main(argv: list[str]) -> int:
    """Run one copy; print one JSON line: the `ClientTransfer`, or ``{"errno", "error"}``."""
    spec = json.loads(argv[0])
    config = spec_config(spec)

    async def run() -> dict[str, Any]:
        async with open_engine(config) as engine:
            try:
                t = await engine.copy(*spec["copy"], **spec["kw"])
            except OSError as exc:
                return {"errno": exc.errno, "error": exc.strerror or str(exc)}
            out = t.as_dict()
            out["kinds"] = [x.kind for x in engine.transfers.values()]
            return out

    print(json.dumps(trio.run(run)), flush=True)
    return 0


# --- network namespaces --------------------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class NsServer:
    name: str
    ns: str
    base: Path
    export: Path
    proc: subprocess.Popen[bytes] | None = None
    control_port: int = 0
    data_port: int = 0

    @property
    def state_dir(self) -> Path:
        return self.base / f"state-{self.name}"

    def records(self) -> dict[str, dict[str, Any]]:
        return {
            (r := json.loads(p.read_text()))["id"]: r
            for p in sorted((self.state_dir / "transfers").glob("*.json"))
        }

    def log(self) -> str:
        p = self.base / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""


class NetnsLab:
    """Namespaces + veth pairs with names unique to this run; `cleanup()` removes all of them."""

    def __init__(self, base: Path, key_file: Path) -> None:
        self.base = base
        self.key_file = key_file
        self.tag = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.servers: list[NsServer] = []
        self._links = 0

    def ns(self, role: str) -> str:
        name = f"etfs-{self.tag}-{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str, prefix: int = 24) -> tuple[str, str]:
        """A veth pair between two namespaces, addressed and up; returns the interface names."""
        self._links += 1
        a, b = f"v{self.tag}{self._links}a", f"v{self.tag}{self._links}b"  # <= 15 chars
        _ip("link", "add", a, "type", "veth", "peer", "name", b)
        _ip("link", "set", a, "netns", ns_a)
        _ip("link", "set", b, "netns", ns_b)
        _ip("-n", ns_a, "addr", "add", f"{addr_a}/{prefix}", "dev", a)
        _ip("-n", ns_b, "addr", "add", f"{addr_b}/{prefix}", "dev", b)
        _ip("-n", ns_a, "link", "set", a, "up")
        _ip("-n", ns_b, "link", "set", b, "up")
        return a, b

    def server(
        self, name: str, ns: str, listen: str, data_listen: str, extra: dict[str, Any] | None = None
    ) -> NsServer:
        base = self.base / name
        export = base / "export"
        export.mkdir(parents=True)
        config = write_server_yaml(
            base / "server.yaml",
            exports={EXPORT: {"path": str(export), "acl": [{"who": USER, "path": "/", "rights": "all"}]}},
            users={USER: {"key_file": str(self.key_file)}},
            name=name,
            extra=extra,
        )
        port_file = base / "ports"
        srv = NsServer(name, ns, base, export)
        self.servers.append(srv)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("PYTHONWARNINGS", None)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "etfs_server.main", "-c", str(config)]
        cmd += ["--listen", listen, "--data-listen", data_listen, "--port-file", str(port_file)]
        with (base / "server.log").open("ab") as logf:
            srv.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + 15
        while not port_file.exists():
            if srv.proc.poll() is not None:
                raise RuntimeError(f"server {name} in {ns} exited:\n{srv.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {name} in {ns} did not start:\n{srv.log()}")
            time.sleep(0.02)
        srv.control_port, srv.data_port = map(int, port_file.read_text().split())
        return srv

    def run_client(self, ns: str, spec: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
        """A copy by a client process inside ``ns``; its JSON result."""
        out = subprocess.run(
            client_command(spec, ("ip", "netns", "exec", ns)),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
        )
        if out.returncode != 0:
            raise RuntimeError(f"client failed ({out.returncode}):\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def cleanup(self) -> None:
        for srv in self.servers:
            if srv.proc is not None and srv.proc.poll() is None:
                os.kill(srv.proc.pid, signal.SIGTERM)
                try:
                    srv.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(srv.proc.pid, signal.SIGKILL)
                    srv.proc.wait(5)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self.namespaces.clear()


def netns_available() -> str | None:
    """None when namespaces can be created here, else the reason they cannot."""
    name = f"etfs-probe-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'ip netns add' is not permitted here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


@pytest.fixture
def netns_lab(tmp_path: Path) -> Iterator[NetnsLab]:
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    key_file = tmp_path / "u.key"
    make_key(key_file)
    lab = NetnsLab(tmp_path, key_file)
    try:
        yield lab
    finally:
        lab.cleanup()


__all__ = [
    "EXPORT",
    "MIB",
    "Cluster",
    "NetnsLab",
    "Node",
    "Proxy",
    "client_command",
    "client_spec",
    "cluster",
    "leftovers",
    "make_file",
    "netns_lab",
    "open_engine",
    "proxied_source",
    "running_transfer",
    "sha256",
    "tmpfs",
    "wait_until",
    "wait_until_async",
]

if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))
