"""Real `etfs-server` subprocesses for tests and benchmarks, their configs and keys.

`ServerProcess` launches ``python -m etfs_server.main -c server.yaml --port-file F`` (with
``--listen``/``--data-listen`` on free loopback ports unless told otherwise, optionally behind
a command prefix that enters a network namespace), waits for the port file, captures the log
and stops the process by pid.  `start()` writes nothing itself: give it a ``server.yaml``
(`write_server_yaml`, or `single_export_yaml` for the usual one-user layout).
`standard_setup` builds the multi-user layout of the ACL and traversal tests; `RawClient`
speaks the control protocol by hand, for malformed traffic.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml

from etfs.client.connection import Endpoint, ServerClient
from etfs.protocol import auth
from etfs.protocol import messages as m
from etfs.protocol.connection import NEED_DATA, Connection, Role

from .process import PY, REPO, child_env, stop_pid, wait_for

START_TIMEOUT = 15.0

# A fixed, clearly fake key for the tests' common user ``tester``.
KEY = "etfs-test-key-NOT-A-SECRET-0123456789abcdef\n"

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


def single_export_yaml(
    path: Path,
    name: str,
    export: Path,
    key_file: Path,
    acl: list[dict[str, Any]] | None = None,
    user: str = "tester",
    extra: dict[str, Any] | None = None,
) -> Path:
    """The usual layout: export ``name`` at ``export``; ``user`` (all rights unless ``acl``).

    Like root on a local disk, the user may chown and set setuid bits: the client of these
    tests is root (tests/test_privileges.py and tests/attack check users that may not).
    """
    return write_server_yaml(
        path,
        exports={name: {"path": str(export), "acl": acl or [{"who": user, "path": "/", "rights": "all"}]}},
        users={user: {"key_file": str(key_file), "may_chown": True, "may_setid": True}},
        name=name,
        extra=extra,
    )


class ServerProcess:
    """One ``etfs-server`` of this run; `stop()` and `kill()` act on its pid only."""

    def __init__(
        self,
        config: Path,
        workdir: Path | None = None,
        *,
        name: str | None = None,
        export: Path | None = None,
        prefix: tuple[str, ...] = (),
        listen: str = "127.0.0.1:0",
        data_listen: str = "127.0.0.1:0",
    ) -> None:
        self.config = config
        self.workdir = workdir or config.parent
        self.name = name or config.stem
        self._export = export
        self.prefix = prefix  # e.g. enter a network namespace (see harness.netlab)
        self.listen, self.data_listen = listen, data_listen
        self.proc: subprocess.Popen[bytes] | None = None
        self.control_port = 0
        self.data_port = 0
        self.log_path = self.workdir / f"{self.config.stem}.log"
        self.port_file = self.workdir / f"{self.config.stem}.ports"

    @property
    def export(self) -> Path:
        assert self._export is not None, f"server {self.name} was started without naming its export"
        return self._export

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *extra_args: str, timeout: float = START_TIMEOUT) -> ServerProcess:
        self.port_file.unlink(missing_ok=True)
        cmd = [*self.prefix, PY, "-m", "etfs_server.main", "-c", str(self.config)]
        cmd += ["--listen", self.listen, "--data-listen", self.data_listen]
        cmd += ["--port-file", str(self.port_file), *extra_args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=child_env())
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"etfs-server {self.name} exited with {proc.returncode}:\n{self.log()[-3000:]}"
                )
            return self.port_file.exists() and len(self.port_file.read_text().split()) == 2

        try:
            wait_for(ready, timeout, f"server {self.name} to write its port file")
        except TimeoutError:
            self.stop()
            raise RuntimeError(
                f"etfs-server {self.name} did not write its port file:\n{self.log()}"
            ) from None
        self.control_port, self.data_port = map(int, self.port_file.read_text().split())
        return self

    def restart(self) -> ServerProcess:
        """Start again on the same control and data ports (clients and proxies keep them)."""
        host = self.listen.rpartition(":")[0]
        data_host = self.data_listen.rpartition(":")[0]
        cport, dport = self.control_port, self.data_port
        self.start("--listen", f"{host}:{cport}", "--data-listen", f"{data_host}:{dport}")
        assert (self.control_port, self.data_port) == (cport, dport)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM by pid, then SIGKILL; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_pid(proc, 5)

    def kill(self) -> None:
        """SIGKILL by pid: no graceful shutdown (transfer records stay 'running' on disk)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def records(self) -> dict[str, dict[str, Any]]:
        """The transfer records of its state directory, by transfer id."""
        state = yaml.safe_load(self.config.read_text()).get("state_dir")
        out = {}
        for p in sorted((Path(state) / "transfers").glob("*.json")):
            rec = json.loads(p.read_text())
            out[rec["id"]] = rec
        return out

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
