"""Real `etfs-server` processes with the review's layout, memory sampling and timing helpers.

Layout (issue 9): users alice and bob (fake test keys); one export ``main`` holding

=================  ==========================  =========================================
path               bob's rights                content
=================  ==========================  =========================================
``/tmp/bob``       all                         ``src.txt`` (bob's own)
``/tmp/ro``        read, list                  ``important.txt`` (must never change)
``/tmp/inbox``     write                       ``report.txt`` (alice's; bob must not read)
``/tmp/secret``    none (alice's)              ``alice.txt``
``/private``       none (alice only)           ``passwords``
=================  ==========================  =========================================

alice has every right on ``/``.  The server runs as this test process's user (root in CI).

Privilege model (issue 9 item 3): the config first carries the keys the lead is adding
(top-level ``run_as``, per-user ``may_chown``/``may_setid``) and maps both users to one
unprivileged service account, ``nobody``, so the OS never separates alice from bob and the
ACL alone decides (the tests stay about the ACL).  The export tree belongs to that account.
A server that does not know these keys yet refuses such a config; the fixture then starts
it without them and records it in `AttackServer.privilege_keys`.  Tests of the model itself
(``test_privileges.py``) never fall back.

Everything a fixture starts is stopped by pid at teardown (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .rawclient import RawClient

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0
MiB = 1024 * 1024

SERVICE_ACCOUNT = "nobody"
SERVICE_UID = 65534
SERVICE_GID = 65534

KEYS: dict[str, bytes] = {
    "alice": b"alice-attack-test-key-NOT-A-SECRET-0123456789",
    "bob": b"bob-attack-test-key-NOT-A-SECRET-0123456789ab",
}

# Recognisable contents: a test fails when one of them reaches the wrong user.
ALICE_SECRET = b"ALICE-SECRET-bytes-bob-must-never-see\n"
ALICE_REPORT = b"ALICE-REPORT-in-the-inbox-bob-may-only-write\n"
PASSWORDS = b"PRIVATE-PASSWORDS-root:hunter2\n"
IMPORTANT = b"IMPORTANT-ORIGINAL-read-only-for-bob\n"
BOB_SOURCE = b"BOB-SOURCE-" + b"b" * 4096 + b"\n"

ACL: list[dict[str, Any]] = [
    {"who": "alice", "path": "/", "rights": ["all"]},
    {"who": "bob", "path": "/tmp/bob", "rights": ["all"]},
    {"who": "bob", "path": "/tmp/ro", "rights": ["read", "list"]},
    {"who": "bob", "path": "/tmp/inbox", "rights": ["write"]},
]

# bob's rights per prefix (the ACL above, for the table tests)
BOB_RIGHTS: dict[str, frozenset[str]] = {
    "/tmp/bob": frozenset({"read", "write", "list", "delete", "transfer-out", "transfer-in"}),
    "/tmp/ro": frozenset({"read", "list"}),
    "/tmp/inbox": frozenset({"write"}),
    "/tmp/secret": frozenset(),
    "/private": frozenset(),
}


def privilege_keys(users: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The top-level privilege keys, and per-user rights (none) added to ``users`` in place."""
    for u in users.values():
        u.setdefault("may_chown", False)
        u.setdefault("may_setid", False)
    return {"run_as": SERVICE_ACCOUNT}


def build_layout(export: Path) -> None:
    """The review's tree (see the module docstring), owned by the service account."""
    files = {
        "tmp/bob/src.txt": BOB_SOURCE,
        "tmp/ro/important.txt": IMPORTANT,
        "tmp/ro/other.txt": b"other read-only file\n",
        "tmp/inbox/report.txt": ALICE_REPORT,
        "tmp/secret/alice.txt": ALICE_SECRET,
        "private/passwords": PASSWORDS,
    }
    for d in ("tmp/bob", "tmp/ro", "tmp/inbox", "tmp/secret", "private"):
        (export / d).mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (export / rel).write_bytes(data)
        os.chmod(export / rel, 0o640)
    chown_tree(export)


def chown_tree(top: Path) -> None:
    if os.geteuid() != 0:
        return
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), SERVICE_UID, SERVICE_GID)
    os.lchown(top, SERVICE_UID, SERVICE_GID)


def read_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes (empty once it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


@dataclass
class AttackServer:
    """One `etfs-server` subprocess with the review's layout (see the module docstring)."""

    base: Path
    export: Path
    name: str = "attack"
    acl: list[dict[str, Any]] = field(default_factory=lambda: list(ACL))
    extra: dict[str, Any] = field(default_factory=dict)  # more top-level config keys
    export_extra: dict[str, Any] = field(default_factory=dict)  # more keys of the export
    user_extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    data_port: int = 0
    privilege_keys: bool = False
    config: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.config = self.base / f"{self.name}.yaml"
        self.log = self.base / f"{self.name}.log"

    # --- configuration ------------------------------------------------------------------------
    def config_doc(self, privileges: bool) -> dict[str, Any]:
        keydir = self.base / "keys"
        keydir.mkdir(exist_ok=True)
        users: dict[str, dict[str, Any]] = {}
        for user, key in KEYS.items():
            kf = keydir / f"{user}.key"
            kf.write_bytes(key + b"\n")
            kf.chmod(0o600)
            users[user] = {"key_file": str(kf), **self.user_extra.get(user, {})}
        doc: dict[str, Any] = {
            "name": self.name,
            "listen": "127.0.0.1:0",
            "data_listen": "127.0.0.1:0",
            "state_dir": str(self.base / f"state-{self.name}"),
        }
        if privileges:
            doc.update(privilege_keys(users))
        doc["users"] = users
        doc["exports"] = {"main": {"path": str(self.export), "acl": self.acl, **self.export_extra}}
        # Loopback on purpose: the transfers of these tests run between servers on 127.0.0.1.
        doc["transfer"] = {"peers": ["127.0.0.0/8"]}
        doc.update(self.extra)
        return doc

    def write_config(self, doc: dict[str, Any]) -> None:
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))

    # --- process ------------------------------------------------------------------------------
    def start(self, privileges: bool = True, fallback: bool = True) -> AttackServer:
        """Start with the privilege keys; without them if this server refuses them and ``fallback``."""
        self.write_config(self.config_doc(privileges))
        err = self._launch()
        if err is None:
            self.privilege_keys = privileges
            return self
        if privileges and fallback:
            self.write_config(self.config_doc(False))
            err = self._launch()
            if err is None:
                self.privilege_keys = False
                return self
        raise RuntimeError(f"etfs-server did not start: {err}")

    def start_raw(self, doc: dict[str, Any], timeout: float = START_TIMEOUT) -> str | None:
        """Start with exactly ``doc``; None when it runs, else why it did not (its output)."""
        self.write_config(doc)
        return self._launch(timeout)

    def _launch(self, timeout: float = START_TIMEOUT) -> str | None:
        port_file = self.base / f"{self.name}.ports"
        port_file.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        env.pop("PYTHONWARNINGS", None)
        cmd = [
            sys.executable,
            "-m",
            "etfs_server.main",
            "-c",
            str(self.config),
            "--port-file",
            str(port_file),
        ]
        mark = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                text = self.log.read_bytes()[mark:].decode(errors="replace")
                self.proc = None
                return text or "(no output)"
            if time.monotonic() > deadline:
                self.stop()
                return "no port file in time"
            time.sleep(0.02)
        self.port, self.data_port = map(int, port_file.read_text().split())
        return None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM our own process by pid, SIGKILL when it lingers; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGCONT, 0.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                return
            if not wait:
                continue
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def memory(self) -> dict[str, int]:
        return read_status(self.pid) if self.proc is not None else {}

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- clients and files --------------------------------------------------------------------
    def client(self, user: str, timeout: float = 10.0) -> RawClient:
        return RawClient.login_to(self.port, user, KEYS[user], "", timeout=timeout)

    def path(self, rel: str) -> Path:
        """The file on disk behind an export path like ``/tmp/ro/important.txt``."""
        return self.export / rel.lstrip("/")

    def plant(self, rel: str, data: bytes = b"", mode: int = 0o644) -> Path:
        """Create a file directly on disk (as the service account's file)."""
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.chmod(p, mode)
        if os.geteuid() == 0:
            os.lchown(p, SERVICE_UID, SERVICE_GID)
        return p

    def plant_dir(self, rel: str) -> Path:
        p = self.path(rel)
        p.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.lchown(p, SERVICE_UID, SERVICE_GID)
        return p

    def plant_symlink(self, rel: str, target: str) -> Path:
        p = self.path(rel)
        p.symlink_to(target)
        if os.geteuid() == 0:
            os.lchown(p, SERVICE_UID, SERVICE_GID)
        return p


def new_base(prefix: str = "etfs-attack-") -> Path:
    """A fresh directory under /tmp that the service account can traverse."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    return base


@contextmanager
def attack_server(**kw: Any) -> Iterator[AttackServer]:
    """An `AttackServer` on a fresh layout; stopped (by pid) and removed afterwards."""
    base = new_base()
    export = base / "export"
    export.mkdir()
    os.chmod(export, 0o755)
    build_layout(export)
    privileges = kw.pop("privileges", True)
    srv = AttackServer(base, export, **kw)
    try:
        srv.start(privileges=privileges)
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(base, ignore_errors=True)


# --- memory and timing ----------------------------------------------------------------------------
class MemoryGuard:
    """Samples a server's VmRSS/VmHWM every few ms; SIGKILLs it (our own pid) above ``kill_above``.

    The kill protects the shared machine from an unbounded server (the review saw 4.25 GiB);
    a test then fails on `peak` and on the dead server.
    """

    def __init__(self, pid: int, kill_above: int = 768 * MiB, interval: float = 0.01) -> None:
        self.pid = pid
        self.kill_above = kill_above
        self.interval = interval
        self.peak_rss = 0
        self.hwm = 0
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-guard", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            st = read_status(self.pid)
            if not st:
                return
            self.peak_rss = max(self.peak_rss, st.get("VmRSS", 0))
            self.hwm = max(self.hwm, st.get("VmHWM", 0))
            if self.peak_rss > self.kill_above and not self.killed:
                self.killed = True
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryGuard:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def describe(self) -> str:
        killed = f", killed above {self.kill_above // MiB} MiB" if self.killed else ""
        return f"peak VmRSS {self.peak_rss / MiB:.0f} MiB, VmHWM {self.hwm / MiB:.0f} MiB{killed}"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``; an exception is the result (the caller asserts on it)."""
    t0 = time.monotonic()
    try:
        result: Any = fn()
    except Exception as exc:
        result = exc
    return time.monotonic() - t0, result


class Deadline:
    """A bounded loop: ``while dl:`` runs until ``seconds`` passed."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def __bool__(self) -> bool:
        return time.monotonic() < self.end

    @property
    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


__all__ = [
    "ACL",
    "ALICE_REPORT",
    "ALICE_SECRET",
    "BOB_RIGHTS",
    "BOB_SOURCE",
    "IMPORTANT",
    "KEYS",
    "PASSWORDS",
    "AttackServer",
    "Deadline",
    "MemoryGuard",
    "MiB",
    "attack_server",
    "new_base",
    "read_status",
    "timed",
]
