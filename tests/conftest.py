"""Shared fixtures: real `etfs-server` processes on loopback and real etfs mounts.

Everything runs in subprocesses (this process never imports pyfuse3).  Every fixture owns
the pids it started and stops only those; mounts are always removed at teardown with
``fusermount3 -u -z`` / ``umount -l``, also when a test failed.

Reuse: ``etfs_env`` (module scope: servers ``jive`` and ``onsala`` and one mount with bind
mounts, or symlinks when not root), or the factories ``start_server`` / ``start_mount`` /
``write_client_config`` for tests that need their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    return e


def wait_for(cond: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll a condition (the only way to wait on another process's state) with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM our own process, SIGKILL it if it lingers; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def force_unmount(path: Path) -> None:
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if mounted(path):
            subprocess.run(cmd, capture_output=True, check=False)


@contextmanager
def throttled(proc: subprocess.Popen[bytes], run: float = 0.005, pause: float = 0.045) -> Iterator[None]:
    """Slow one of our own processes down by pausing it (SIGSTOP/SIGCONT by pid) most of the time.

    A test that must act *during* a transfer cannot rely on a loopback copy being slow: 600 MiB
    can finish between two polls.  A process that runs 10% of the time still answers every
    request, only later.
    """
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set() and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            done.wait(pause)
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            done.wait(run)

    t = threading.Thread(target=cycle, name="throttle", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)


KEY = "etfs-test-key-NOT-A-SECRET-0123456789abcdef\n"


@dataclass
class Server:
    name: str
    export: Path
    config: Path
    port_file: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    data_port: int = 0

    def start(self, timeout: float = 15.0) -> None:
        self.port_file.unlink(missing_ok=True)
        cmd = [PY, "-m", "etfs_server.main", "-c", str(self.config), "--port-file", str(self.port_file)]
        if self.port:
            cmd += ["--listen", f"127.0.0.1:{self.port}"]  # a restart keeps its address
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited: {self.log.read_text()[-2000:]}")
            return self.port_file.exists()

        wait_for(ready, timeout, f"server {self.name}")
        self.port, self.data_port = map(int, self.port_file.read_text().split())

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)


def _server_yaml(name: str, export: Path, key_file: Path, state: Path, acl: list[dict[str, object]]) -> str:
    rules = "\n".join(
        f"      - {{who: {r['who']}, path: {r['path']}, rights: {json.dumps(r['rights'])}}}" for r in acl
    )
    return (
        f"name: {name}\nlisten: 127.0.0.1:0\ndata_listen: 127.0.0.1:0\nstate_dir: {state}\nrun_as: root\n"
        # The client of these tests is root: like root on a local disk it may chown and set
        # setuid bits (tests/test_privileges.py and tests/attack check users that may not).
        f"users:\n  tester:\n    key_file: {key_file}\n    may_chown: true\n    may_setid: true\n"
        f"exports:\n  {name}:\n    path: {export}\n    acl:\n{rules}\n"
    )


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "tester.key"
    p.write_text(KEY)
    p.chmod(0o600)  # a key others may read is refused (as ssh does)
    return p


ServerFactory = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[ServerFactory]:
    """Factory: start_server(name, acl=None) -> Server (export has a tmp/ dir); stopped at teardown."""
    started: list[Server] = []

    def factory(name: str, acl: list[dict[str, object]] | None = None) -> Server:
        base = tmp_path_factory.mktemp(f"srv-{name}")
        export = base / "export"
        (export / "tmp").mkdir(parents=True)
        os.chmod(export, 0o755)
        acl = acl or [{"who": "tester", "path": "/", "rights": ["all"]}]
        cfg = base / "server.yaml"
        cfg.write_text(_server_yaml(name, export, key_file, base / "state", acl))
        s = Server(name, export, cfg, base / "ports", base / "server.log")
        started.append(s)
        s.start()
        return s

    yield factory
    for s in started:
        s.stop()


def write_client_config(
    path: Path,
    servers: list[Server],
    key_file: Path,
    root: Path,
    mountpoints: dict[str, Path] | None = None,
    extra: str = "",
) -> Path:
    lines = [f"root: {root}", "connect_timeout: 2", "request_timeout: 10", extra, "servers:"]
    for s in servers:
        lines += [
            f"  {s.name}:",
            f"    address: 127.0.0.1:{s.port}",
            "    user: tester",
            f"    key_file: {key_file}",
            f"    export: {s.name}",
        ]
        if mountpoints and s.name in mountpoints:
            lines.append(f"    mountpoint: {mountpoints[s.name]}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Mount:
    config: Path
    root: Path
    mountpoints: dict[str, Path]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    preexec: list[str] = field(default_factory=list)

    def start(self, timeout: float = 20.0) -> None:
        cmd = [
            *self.preexec,
            PY,
            "-m",
            "etfs.cli",
            "mount",
            "-c",
            str(self.config),
            "-f",
            "--log-file",
            str(self.log),
        ]
        errfile = self.log.with_suffix(".stderr")
        with open(errfile, "wb") as errf:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, env=env(), cwd="/")
        proc = self.proc
        registry = self.root.parent / "daemon.json"

        def ready() -> bool:
            if proc.poll() is not None:
                err = errfile.read_text()
                log = self.log.read_text() if self.log.exists() else ""
                raise RuntimeError(f"mount exited {proc.returncode}: {err}\n{log[-3000:]}")
            if not registry.exists():
                return False
            try:
                return bool(json.loads(registry.read_text()).get("pid"))
            except ValueError:
                return False

        wait_for(ready, timeout, "the mount")

    def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            code = stop_pid(self.proc, 15)
        self.cleanup()
        return code

    def cleanup(self) -> None:
        for mp in self.mountpoints.values():
            force_unmount(mp)
            try:
                if mp.is_symlink():
                    mp.unlink()
            except OSError:
                pass
        force_unmount(self.root)

    def dir(self, server: str) -> Path:
        return self.mountpoints.get(server) or self.root / server


MountFactory = Callable[..., Mount]


@pytest.fixture
def start_mount(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[MountFactory]:
    """Factory: start_mount(servers, mountpoints=True, base=None, preexec=[]) -> Mount."""
    started: list[Mount] = []

    def factory(
        servers: list[Server],
        mountpoints: bool = True,
        base: Path | None = None,
        preexec: list[str] | None = None,
        key: Path | None = None,
    ) -> Mount:
        base = base or tmp_path_factory.mktemp("mount")
        root = base / "mnt" / ".etfs"
        mps = {s.name: base / "mnt" / s.name for s in servers} if mountpoints else {}
        cfg = write_client_config(base / "mountpoints.yaml", servers, key or key_file, root, mps)
        m = Mount(cfg, root, mps, base / "mount.log", preexec=preexec or [])
        started.append(m)
        m.start()
        return m

    yield factory
    for m in started:
        try:
            m.stop()
        except Exception:
            m.cleanup()


@dataclass
class Env:
    servers: dict[str, Server]
    mount: Mount

    def export(self, name: str) -> Path:
        return self.servers[name].export

    def dir(self, name: str) -> Path:
        return self.mount.dir(name)


@pytest.fixture(scope="module")
def etfs_env(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[Env]:
    """Two servers (jive, onsala) and one mount with per-server mountpoints, for a whole module."""
    with make_env(tmp_path_factory, key_file) as e:
        yield e


@contextmanager
def make_env(
    tmp_path_factory: pytest.TempPathFactory, key_file: Path, client_extra: str = ""
) -> Iterator[Env]:
    """Two servers (jive, onsala) and one mount; ``client_extra``: more mountpoints.yaml lines."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        pytest.skip("needs /dev/fuse and fusermount3")
    servers: dict[str, Server] = {}
    mount: Mount | None = None
    try:
        for name in ("jive", "onsala"):
            base = tmp_path_factory.mktemp(f"srv-{name}")
            export = base / "export"
            (export / "tmp").mkdir(parents=True)
            cfg = base / "server.yaml"
            cfg.write_text(
                _server_yaml(
                    name,
                    export,
                    key_file,
                    base / "state",
                    [{"who": "tester", "path": "/", "rights": ["all"]}],
                )
            )
            s = Server(name, export, cfg, base / "ports", base / "server.log")
            servers[name] = s
            s.start()
        base = tmp_path_factory.mktemp("mount")
        root = base / "mnt" / ".etfs"
        mps = {n: base / "mnt" / n for n in servers}
        cfg = write_client_config(
            base / "mountpoints.yaml", list(servers.values()), key_file, root, mps, client_extra
        )
        mount = Mount(cfg, root, mps, base / "mount.log")
        mount.start()
        yield Env(servers, mount)
    finally:
        try:
            if mount is not None:
                mount.stop()
        finally:
            for s in servers.values():
                s.stop()


@contextmanager
def walkable(path: Path) -> Iterator[None]:
    """pytest's temporary directories are 0700: let other local users walk (not list) down
    through ``path`` and its parents for the block."""
    changed: list[tuple[Path, int]] = []
    for d in [path, *path.parents]:
        if d == Path("/"):
            break
        mode = d.stat().st_mode & 0o7777
        if not mode & 0o001:
            changed.append((d, mode))
            os.chmod(d, mode | 0o001)
    try:
        yield
    finally:
        for d, mode in changed:
            os.chmod(d, mode)


# --- nothing left behind ----------------------------------------------------------------------------
def _leftovers(base: str, netns_prefix: str) -> list[str]:
    """Mounts under ``base``, live etfs processes whose command line names ``base`` (their
    configs and mountpoints live there), and network namespaces this run created."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point.startswith(base):
                found.append(f"mount {point}")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # gone meanwhile
        if state != "Z" and base in cmd and ("etfs_server" in cmd or "etfs.cli" in cmd):
            found.append(f"process {pid}: {cmd[:160]}")
    netns_dir = Path("/run/netns")
    if netns_dir.is_dir():
        found += [f"network namespace {n}" for n in os.listdir(netns_dir) if n.startswith(netns_prefix)]
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if any test left a mount, an etfs process or a namespace behind.

    Session scope and autouse: set up first, so torn down last, after every other fixture.
    """
    base = str(tmp_path_factory.getbasetemp())
    yield
    deadline = time.monotonic() + 10  # SIGTERMed processes may still be on their way out
    left = _leftovers(base, f"etfs-{os.getpid()}-")
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _leftovers(base, f"etfs-{os.getpid()}-")
    assert not left, "tests left these behind:\n" + "\n".join(left)
