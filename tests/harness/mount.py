"""Real `etfs mount` daemons for tests and benchmarks, their configs, and guaranteed unmounting.

`Mount.start()` runs ``python -m etfs.cli mount -c mountpoints.yaml -f`` (optionally behind a
command prefix, e.g. one that enters a network namespace) and waits until the daemon has
registered; `Mount.stop()` stops it by pid and always removes every mount it made with
``fusermount3 -u -z`` / ``umount -l`` (`force_unmount`), also after a failed test.
`make_env` gives the usual two servers (``jive``, ``onsala``) with one mount.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .process import PY, child_env, stop_pid, wait_for
from .server import ServerProcess, single_export_yaml


def mounted(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def force_unmount(path: Path) -> None:
    """Lazy-unmount ``path`` if it is mounted (FUSE first, then plain umount)."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if mounted(path):
            subprocess.run(cmd, capture_output=True, check=False)


def fuse_unavailable() -> str | None:
    """None when FUSE mounts can be made here, else why not."""
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "needs /dev/fuse and fusermount3"
    return None


def write_client_config(
    path: Path,
    servers: list[ServerProcess],
    key_file: Path,
    root: Path,
    mountpoints: dict[str, Path] | None = None,
    extra: str = "",
) -> Path:
    """A ``mountpoints.yaml`` for servers on loopback, user ``tester``, one export per server."""
    lines = [f"root: {root}", "connect_timeout: 2", "request_timeout: 10", extra, "servers:"]
    for s in servers:
        lines += [
            f"  {s.name}:",
            f"    address: 127.0.0.1:{s.control_port}",
            "    user: tester",
            f"    key_file: {key_file}",
            f"    export: {s.name}",
        ]
        if mountpoints and s.name in mountpoints:
            lines.append(f"    mountpoint: {mountpoints[s.name]}")
    path.write_text("\n".join(lines) + "\n")
    return path


CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


@dataclass
class Mount:
    config: Path
    root: Path
    mountpoints: dict[str, Path]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    preexec: list[str] = field(default_factory=list)  # a command prefix (namespace, other user)

    def start(self, timeout: float = 20.0) -> None:
        cmd = [*self.preexec, PY, "-m", "etfs.cli", "mount", "-c", str(self.config), "-f"]
        cmd += ["--log-file", str(self.log)]
        errfile = self.log.with_suffix(".stderr")
        with open(errfile, "wb") as errf:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=errf, env=child_env(), cwd="/"
            )
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
                if json.loads(registry.read_text()).get("pid") != proc.pid:
                    return False
            except ValueError:
                return False
            # per-server mountpoints are bind mounts (root) or symlinks (not root)
            return all(mounted(p) or p.is_symlink() for p in self.mountpoints.values())

        wait_for(ready, timeout, "the mount")

    def stop(self) -> int | None:
        """Stop the daemon (SIGTERM) and clean up; its exit status.  A daemon that died of a
        crash signal (it once segfaulted in libfuse at exit) fails the test here."""
        code = None
        if self.proc is not None:
            code = stop_pid(self.proc, 15)
        self.cleanup()
        if code is not None and -code in CRASH_SIGNALS:
            raise AssertionError(f"the mount daemon crashed: {signal.Signals(-code).name}\n{self.logs()}")
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

    def logs(self) -> str:
        """The tails of the daemon's stderr and log, for assertion messages."""
        out = []
        for p in (self.log.with_suffix(".stderr"), self.log):
            if p.exists():
                out.append(p.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def leftovers(self) -> list[str]:
        """Which of our paths are still mounted."""
        return sorted(str(p) for p in (self.root, *self.mountpoints.values()) if mounted(p))


MountFactory = Callable[..., Mount]


def mount_servers(
    base: Path,
    servers: list[ServerProcess],
    key_file: Path,
    mountpoints: bool = True,
    preexec: list[str] | None = None,
    client_extra: str = "",
) -> Mount:
    """A started mount of ``servers`` under ``base/mnt`` (per-server mountpoints unless told not to)."""
    base.mkdir(parents=True, exist_ok=True)
    root = base / "mnt" / ".etfs"
    mps = {s.name: base / "mnt" / s.name for s in servers} if mountpoints else {}
    cfg = write_client_config(base / "mountpoints.yaml", servers, key_file, root, mps, client_extra)
    m = Mount(cfg, root, mps, base / "mount.log", preexec=preexec or [])
    try:
        m.start()
    except BaseException:
        m.stop()
        raise
    return m


def start_export_server(
    base: Path, name: str, key_file: Path, acl: list[dict[str, object]] | None = None
) -> ServerProcess:
    """A started server ``name`` exporting ``base/export`` (which has a ``tmp/`` directory)."""
    export = base / "export"
    (export / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(export, 0o755)
    cfg = single_export_yaml(
        base / "server.yaml", name, export, key_file, acl, extra={"data_listen": "127.0.0.1:0"}
    )
    return ServerProcess(cfg, base, name=name, export=export).start()


@dataclass
class Env:
    servers: dict[str, ServerProcess]
    mount: Mount

    def export(self, name: str) -> Path:
        return self.servers[name].export

    def dir(self, name: str) -> Path:
        return self.mount.dir(name)


@contextmanager
def make_env(base: Path, key_file: Path, client_extra: str = "") -> Iterator[Env]:
    """Two servers (jive, onsala) under ``base`` and one mount of both; all stopped on exit."""
    servers: dict[str, ServerProcess] = {}
    mount: Mount | None = None
    try:
        for name in ("jive", "onsala"):
            servers[name] = start_export_server(base / f"srv-{name}", name, key_file)
        mount = mount_servers(base / "mount", list(servers.values()), key_file, client_extra=client_extra)
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
