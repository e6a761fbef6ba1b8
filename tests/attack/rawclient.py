"""A raw etfs client for attack tests: sockets, ``msgpack`` and ``hmac``, nothing from ``etfs``.

The wire format was derived by reading ``etfs/protocol`` (``connection.py``, ``messages.py``,
``auth.py``, ``data.py``) and is restated here on purpose, so that a bug in the project's own
codec cannot hide a bug in the server:

Control connection
    Frames: a 4-byte big-endian body length, then one msgpack body.  Every body is a map
    whose ``"t"`` key names the message type (the lower-cased class name: ``"hello"``,
    ``"stat"``, ``"transferoffer"``, ``"localcopy"`` ...); the other keys are the message's
    fields.  Byte strings are msgpack ``bin``, text is ``str``.

    Login: client ``hello {version: 2, user, export, nonce: 32 random bytes}``; server
    ``challenge {version, nonce, server}``; client ``prove {mac}`` with
    ``mac = HMAC-SHA256(key, "etfs-client" \\0 server_nonce \\0 client_nonce \\0 user \\0 export)``;
    server ``welcome {mac, data_port, peer_host}`` whose ``mac`` is the same HMAC with the
    label ``"etfs-server"`` and the two nonces swapped (client nonce first).  Any ``err``
    during the handshake ends the connection.  The key is the key file's stripped content.

    Each request travels in an envelope ``call {id, req}`` with a client-chosen ``id`` (> 0)
    and the request map (its own ``t``, no id) as ``req``; the server answers each with
    ``ok {id, value}`` or ``err {id, errno, message}``, in any order (requests pipeline).
    ``err`` with ``id`` 0 is a fatal connection error.  Reply values: ``Attr`` is an array
    ``[ino, mode, nlink, uid, gid, size, blocks, atime_ns, mtime_ns, ctime_ns]``, ``Entry``
    an array ``[name, attr]``; ``Opened``, ``ListPage``, ``Capability``, ``TransferStarted``
    and ``TransferInfo`` are maps.

Data connection (the port named in ``welcome``)
    The connector sends one frame ``{t: "hello", kind: "pull"|"push", token, transfer_id,
    stream}``; the source answers ``{t: "ready", size, mtime_ns}`` or ``{t: "error", errno,
    message}``.  Then fixed binary structs: requests ``>QQI`` (offset, length, flags; flag 1
    asks for a digest, flag 2 ends), block headers ``>QQI`` (offset, length, status) followed
    by ``length`` raw bytes and an 8-byte ``>Q`` digest trailer.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import msgpack

PROTOCOL_VERSION = 2
HEADER = struct.Struct(">I")
DATA_REQUEST = struct.Struct(">QQI")
DATA_BLOCK = struct.Struct(">QQI")
DATA_DIGEST = struct.Struct(">Q")
FLAG_DIGEST = 1
FLAG_DONE = 2
MAX_REPLY = 64 * 1024 * 1024  # a sanity bound on what we accept from the server

# Linux open(2) flags, spelled out so that tests say what travels on the wire.
O_RDONLY = os.O_RDONLY
O_WRONLY = os.O_WRONLY
O_RDWR = os.O_RDWR
O_CREAT = os.O_CREAT
O_EXCL = os.O_EXCL
O_TRUNC = os.O_TRUNC
O_APPEND = os.O_APPEND
O_DIRECTORY = os.O_DIRECTORY

Msg = dict[str, Any]


class ProtocolViolation(Exception):
    """The server sent something that is not the etfs wire format (or not in order)."""


class ServerClosed(ConnectionError):
    """The server closed the connection (EOF or reset)."""


class ServerError(OSError):
    """An ``err`` reply: ``errno`` and ``strerror`` are the server's."""

    def __init__(self, code: int, message: str, request_id: int = 0) -> None:
        super().__init__(code, message)
        self.request_id = request_id


@dataclass(frozen=True)
class Attr:
    """A decoded ``Attr`` array."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, raw: Any) -> Attr:
        if not isinstance(raw, list) or len(raw) != 10 or not all(isinstance(x, int) for x in raw):
            raise ProtocolViolation(f"not an Attr array: {raw!r}")
        return cls(*raw)


@dataclass(frozen=True)
class Reply:
    """One ``ok`` or ``err`` reply."""

    id: int
    ok: bool
    value: Any = None
    errno: int = 0
    message: str = ""

    def unwrap(self) -> Any:
        if not self.ok:
            raise ServerError(self.errno, self.message, self.id)
        return self.value


def encode_frame(msg: Msg) -> bytes:
    body: bytes = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def client_mac(key: bytes, server_nonce: bytes, client_nonce: bytes, user: str, export: str) -> bytes:
    msg = b"\0".join([b"etfs-client", server_nonce, client_nonce, user.encode(), export.encode()])
    return hmac.new(key, msg, hashlib.sha256).digest()


def server_mac(key: bytes, server_nonce: bytes, client_nonce: bytes, user: str, export: str) -> bytes:
    msg = b"\0".join([b"etfs-server", client_nonce, server_nonce, user.encode(), export.encode()])
    return hmac.new(key, msg, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or `ServerClosed` when the peer ends first."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError as exc:
            raise ServerClosed("connection reset") from exc
        if not chunk:
            raise ServerClosed(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket, limit: int = MAX_REPLY) -> Msg:
    (length,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    if length > limit:
        raise ProtocolViolation(f"frame of {length} bytes")
    body = recv_exact(sock, length)
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ProtocolViolation(f"undecodable frame: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise ProtocolViolation(f"not a tagged map: {msg!r:.200}")
    return msg


class RawClient:
    """One control connection over a blocking socket (use one per thread)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._next_id = 1
        self._stash: dict[int, Reply] = {}
        self.welcome: Msg | None = None

    # --- connection ----------------------------------------------------------------------------
    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> RawClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    @classmethod
    def login_to(cls, port: int, user: str, key: bytes, export: str = "", timeout: float = 10.0) -> RawClient:
        c = cls.connect(port, timeout=timeout)
        try:
            c.login(user, key, export)
        except BaseException:
            c.close()
            raise
        return c

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- frames --------------------------------------------------------------------------------
    def send(self, msg: Msg) -> None:
        self.sock.sendall(encode_frame(msg))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> Msg:
        return recv_frame(self.sock)

    # --- handshake -----------------------------------------------------------------------------
    def login(self, user: str, key: bytes, export: str = "") -> Msg:
        """Hello / Challenge / Prove / Welcome; checks the server's proof.  Raises `ServerError`."""
        nonce = os.urandom(32)
        self.send({"t": "hello", "version": PROTOCOL_VERSION, "user": user, "export": export, "nonce": nonce})
        ch = self.recv()
        if ch["t"] == "err":
            raise ServerError(ch.get("errno", 0), ch.get("message", ""))
        if ch["t"] != "challenge" or not isinstance(ch.get("nonce"), bytes):
            raise ProtocolViolation(f"expected a challenge, got {ch!r:.200}")
        self.send({"t": "prove", "mac": client_mac(key, ch["nonce"], nonce, user, export)})
        wel = self.recv()
        if wel["t"] == "err":
            raise ServerError(wel.get("errno", 0), wel.get("message", ""))
        if wel["t"] != "welcome":
            raise ProtocolViolation(f"expected a welcome, got {wel!r:.200}")
        if not hmac.compare_digest(wel.get("mac", b""), server_mac(key, ch["nonce"], nonce, user, export)):
            raise ProtocolViolation("the server's proof does not match the key")
        self.welcome = wel
        return wel

    @property
    def data_port(self) -> int:
        assert self.welcome is not None
        return int(self.welcome["data_port"])

    # --- requests ------------------------------------------------------------------------------
    def send_request(self, kind: str, **fields: Any) -> int:
        """Send one request (``kind`` is the wire tag, e.g. ``"open"``); returns its id."""
        rid = self._next_id
        self._next_id += 1
        self.send({"t": "call", "id": rid, "req": {"t": kind, **fields}})
        return rid

    def recv_reply(self) -> Reply:
        """The next reply from the socket (whatever its id).  `ServerClosed` on EOF."""
        msg = self.recv()
        t = msg["t"]
        rid = msg.get("id")
        if not isinstance(rid, int):
            raise ProtocolViolation(f"reply without an id: {msg!r:.200}")
        if t == "ok":
            return Reply(rid, True, msg.get("value"))
        if t == "err":
            if rid == 0:
                raise ServerError(msg.get("errno", 0), msg.get("message", ""), 0)
            return Reply(rid, False, None, int(msg.get("errno", 0)), str(msg.get("message", "")))
        raise ProtocolViolation(f"unexpected {t!r} after login")

    def reply_to(self, rid: int) -> Reply:
        """Wait for the reply to ``rid``, keeping others for later."""
        if rid in self._stash:
            return self._stash.pop(rid)
        while True:
            r = self.recv_reply()
            if r.id == rid:
                return r
            self._stash[r.id] = r

    def call(self, kind: str, **fields: Any) -> Reply:
        return self.reply_to(self.send_request(kind, **fields))

    def ok(self, kind: str, **fields: Any) -> Any:
        """`call` that raises `ServerError` on an ``err``."""
        return self.call(kind, **fields).unwrap()

    def pipeline(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Reply]:
        """Send all, then collect all replies, in request order."""
        ids = [self.send_request(kind, **fields) for kind, fields in requests]
        return [self.reply_to(rid) for rid in ids]

    # --- common operations ---------------------------------------------------------------------
    def stat(self, path: str) -> Attr:
        return Attr.of(self.ok("stat", path=path))

    def open(self, path: str, flags: int = O_RDONLY) -> int:
        return int(self.ok("open", path=path, flags=flags)["handle"])

    def create(self, path: str, mode: int = 0o644, flags: int = O_WRONLY | O_CREAT | O_TRUNC) -> int:
        return int(self.ok("create", path=path, mode=mode, flags=flags)["handle"])

    def read(self, handle: int, offset: int = 0, size: int = 1 << 20) -> bytes:
        data = self.ok("read", handle=handle, offset=offset, size=size)
        if not isinstance(data, bytes):
            raise ProtocolViolation(f"read returned {type(data).__name__}")
        return data

    def write(self, handle: int, data: bytes, offset: int = 0) -> int:
        return int(self.ok("write", handle=handle, offset=offset, data=data))

    def close_handle(self, handle: int) -> None:
        self.ok("close", handle=handle)

    def read_file(self, path: str, size: int = 1 << 20) -> bytes:
        h = self.open(path)
        try:
            return self.read(h, 0, size)
        finally:
            self.call("close", handle=h)

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        h = self.create(path, mode)
        try:
            self.write(h, data)
        finally:
            self.call("close", handle=h)

    def listdir(self, path: str) -> list[str]:
        page = self.ok("list", path=path, after="", limit=5000)
        return [e[0] for e in page["entries"]]

    def setattr(self, path: str, **fields: Any) -> Attr:
        return Attr.of(self.ok("setattr", path=path, **fields))

    def wait_transfer(self, transfer_id: str, timeout: float = 10.0) -> Msg:
        """Poll ``transferwait`` until the transfer is done, failed or skipped, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            info: Msg = self.ok("transferwait", transfer_id=transfer_id, timeout=0.5)
            if info["state"] in ("done", "failed", "skipped") or time.monotonic() > deadline:
                return info


# --- data connections ------------------------------------------------------------------------------
class DataConnection:
    """A connection to a server's data port, speaking the data hello and block requests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> DataConnection:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def hello(self, kind: str, token: bytes, transfer_id: str, stream: int = 0) -> Msg:
        """Send the hello; the source's ``ready`` or ``error`` map.  `ServerClosed` if it hangs up."""
        hello = {"t": "hello", "kind": kind, "token": token, "transfer_id": transfer_id, "stream": stream}
        self.sock.sendall(encode_frame(hello))
        return recv_frame(self.sock, 65536)

    def fetch(self, offset: int, length: int) -> bytes:
        """One block (no digest requested); `ServerError` on a refused block."""
        self.sock.sendall(DATA_REQUEST.pack(offset, length, 0))
        _off, got_len, status = DATA_BLOCK.unpack(recv_exact(self.sock, DATA_BLOCK.size))
        if status:
            raise ServerError(status, f"block at {offset} refused with status {status}")
        data = recv_exact(self.sock, got_len)
        recv_exact(self.sock, DATA_DIGEST.size)
        return data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


__all__ = [
    "Attr",
    "DataConnection",
    "ProtocolViolation",
    "RawClient",
    "Reply",
    "ServerClosed",
    "ServerError",
    "client_mac",
    "encode_frame",
    "recv_exact",
    "recv_frame",
    "server_mac",
]
