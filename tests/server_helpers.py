"""Helpers to run a real `etfs-server` subprocess on loopback and talk to it.

`ServerProcess.start()` writes nothing itself: give it a `server.yaml` (see
`write_server_yaml`).  It launches ``python -m etfs_server.main --listen 127.0.0.1:0
--data-listen 127.0.0.1:0 --port-file F -c server.yaml``, waits for the port file
and captures the server's log (stderr) in a file.  `stop()` kills the process by
pid; the `server_factory` fixture calls it in a finalizer, always.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from etfs.client.connection import Endpoint, ServerClient
from etfs.protocol import auth
from etfs.protocol import messages as m
from etfs.protocol.connection import NEED_DATA, Connection, Role, encode_frame

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 15.0

# Log lines that are never expected from a healthy server, whatever the test does.
FATAL_LOG = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|internal error")
LOG_LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def make_key(path: Path) -> bytes:
    """Write a fresh key file and return the key as the server will read it."""
    path.write_text(auth.generate_key_text())
    path.chmod(0o600)  # a key others may read is refused (as ssh does)
    return auth.load_key(path)


def write_server_yaml(
    path: Path,
    *,
    exports: dict[str, dict[str, Any]],
    users: dict[str, dict[str, Any]],
    name: str = "testsrv",
    extra: dict[str, Any] | None = None,
) -> Path:
    """A server.yaml from plain dicts (listen addresses come from the command line)."""
    doc: dict[str, Any] = {
        "name": name,
        "listen": "127.0.0.1:0",
        "state_dir": str(path.parent / f"state-{name}"),
        # The tests run as root; suites that are not about the privilege model keep root's
        # powers explicitly (tests/attack and test_privileges map users to other accounts).
        "run_as": "root",
        "users": users,
        "exports": exports,
    }
    doc.update(extra or {})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class ServerProcess:
    config: Path
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    control_port: int = 0
    data_port: int = 0
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.config.stem}.log"

    def start(self, *extra_args: str) -> ServerProcess:
        port_file = self.workdir / f"{self.config.stem}.ports"
        port_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("PYTHONWARNINGS", None)
        cmd = [
            sys.executable,
            "-m",
            "etfs_server.main",
            "--listen",
            "127.0.0.1:0",
            "--data-listen",
            "127.0.0.1:0",
            "--port-file",
            str(port_file),
            "-c",
            str(self.config),
            *extra_args,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"etfs-server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etfs-server did not write its port file:\n{self.log()}")
            time.sleep(0.02)
        control, data = port_file.read_text().split()
        self.control_port, self.data_port = int(control), int(data)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill by pid (SIGTERM, then SIGKILL); idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, level: str) -> list[str]:
        return [ln for ln in self.log().splitlines() if (mt := LOG_LEVEL.match(ln)) and mt.group(1) == level]

    def unexpected_warnings(self, *allowed: str) -> list[str]:
        """WARNING lines matching none of the ``allowed`` regexes."""
        pats = [re.compile(a) for a in allowed]
        return [ln for ln in self.log_lines("WARNING") if not any(p.search(ln) for p in pats)]

    def assert_healthy(self, *allowed_warnings: str) -> None:
        text = self.log()
        bad = [ln for ln in text.splitlines() if FATAL_LOG.search(ln)]
        assert not bad, "server logged errors:\n" + text[-5000:]
        warn = self.unexpected_warnings(*allowed_warnings)
        assert not warn, "unexpected server warnings:\n" + "\n".join(warn)

    async def wait_for_log(self, pattern: str, timeout: float = 5.0) -> str:
        rx = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                for ln in self.log().splitlines():
                    if rx.search(ln):
                        return ln
                await trio.sleep(0.02)

    def endpoint(self, user: str, key: bytes, export: str = "", **kw: Any) -> Endpoint:
        kw.setdefault("request_timeout", 20.0)
        kw.setdefault("connect_timeout", 10.0)
        return Endpoint(
            name="testsrv",
            addresses=(("127.0.0.1", self.control_port),),
            user=user,
            key=key,
            export=export,
            **kw,
        )

    def client(
        self, nursery: trio.Nursery, user: str, key: bytes, export: str = "", **kw: Any
    ) -> ServerClient:
        return ServerClient(self.endpoint(user, key, export, **kw), nursery)


ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """``server_factory(config_path)`` starts a server; every one is killed at teardown."""
    started: list[ServerProcess] = []

    def start(config: Path, *args: str) -> ServerProcess:
        sp = ServerProcess(config, config.parent)
        started.append(sp)
        return sp.start(*args)

    try:
        yield start
    finally:
        for sp in started:
            sp.stop()


@dataclass
class Setup:
    """A standard layout: ``<dir>/export`` (with ``/tmp`` and ``/private`` inside), users, keys."""

    dir: Path
    export: Path
    outside: Path
    keys: dict[str, bytes]
    config: Path


def standard_setup(
    base: Path,
    acl: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    groups: dict[str, list[str]] | None = None,
) -> Setup:
    """alice (group staff) gets everything under /tmp; bob and carol get what ``acl`` says.

    ``outside`` is a directory next to the export holding a sentinel file, for escape checks.
    """
    base.mkdir(parents=True, exist_ok=True)
    export = base / "export"
    (export / "tmp").mkdir(parents=True)
    (export / "private").mkdir()
    (export / "private" / "secret.txt").write_text("export-private\n")
    outside = base / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("SENTINEL\n")
    (outside / "canary").mkdir()
    groups = groups if groups is not None else {"alice": ["staff"], "bob": [], "carol": ["ops"]}
    keys: dict[str, bytes] = {}
    users: dict[str, dict[str, Any]] = {}
    for user, grp in groups.items():
        keys[user] = make_key(base / f"{user}.key")
        users[user] = {"key_file": str(base / f"{user}.key"), "groups": grp}
    if acl is None:
        acl = [{"who": "alice", "path": "/tmp", "rights": "all"}]
    config = write_server_yaml(
        base / "server.yaml", exports={"main": {"path": str(export), "acl": acl}}, users=users, extra=extra
    )
    return Setup(base, export, outside, keys, config)


# --- raw protocol access (no ServerClient), for malformed traffic -------------------------------------
class RawClient:
    """A hand-driven client: a socket stream plus a sans-IO `Connection` for decoding replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def login(self, user: str, key: bytes, export: str = "") -> m.Welcome:
        nonce = auth.new_nonce()
        await self.send(m.Hello(m.PROTOCOL_VERSION, user, export, nonce))
        ch = await self.receive()
        assert isinstance(ch, m.Challenge), ch
        await self.send(m.Prove(auth.client_proof(key, ch.nonce, nonce, user, export)))
        welcome = await self.receive()
        assert isinstance(welcome, m.Welcome), welcome
        return welcome

    async def send(self, msg: m.Message) -> None:
        await self.stream.send_all(self.conn.send(msg))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_body(self, body: bytes) -> None:
        await self.stream.send_all(len(body).to_bytes(4, "big") + body)

    async def receive(self, timeout: float = 10.0) -> m.Message | None:
        """The next message, or None when the server closed the connection."""
        with trio.fail_after(timeout):
            while True:
                ev = self.conn.next_event()
                if ev is not NEED_DATA:
                    assert ev is None or isinstance(ev, m.Message)
                    return ev
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                self.conn.receive_data(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


__all__ = [
    "RawClient",
    "ServerFactory",
    "ServerProcess",
    "Setup",
    "encode_frame",
    "make_key",
    "server_factory",
    "standard_setup",
    "write_server_yaml",
]
