"""The fixtures every test file may use: real `etfs-server` processes and real etfs mounts.

The code that starts, waits for and stops them lives in ``tests/harness/`` (shared with
``bench/``); this file only turns it into fixtures.  Every fixture owns the pids it started
and stops only those; mounts are always removed at teardown with ``fusermount3 -u -z`` /
``umount -l``, also when a test failed, and `nothing_left_behind` fails the run if anything
was left anyway.

Reuse: ``etfs_env`` (module scope: servers ``jive`` and ``onsala`` and one mount with bind
mounts, or symlinks when not root), or the factories ``start_server`` / ``start_mount`` for
tests that need their own; ``server_factory`` for a server from a config of your own;
``cluster`` for servers driven by an in-process transfer engine; ``netlab`` for network
namespaces; ``tmpfs`` for a small filesystem.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.mount import (
    Env,
    Mount,
    MountFactory,
    fuse_unavailable,
    make_env,
    mount_servers,
    start_export_server,
)
from harness.netlab import NetLab, netns_unavailable
from harness.server import KEY, ServerFactory, ServerProcess, make_key
from harness.transfers import Cluster


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("keys") / "tester.key"
    p.write_text(KEY)
    p.chmod(0o600)  # a key others may read is refused (as ssh does)
    return p


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[ServerFactory]:
    """Factory: start_server(name, acl=None) -> ServerProcess (export has a tmp/ dir); stopped at teardown."""
    started: list[ServerProcess] = []

    def factory(name: str, acl: list[dict[str, object]] | None = None) -> ServerProcess:
        s = start_export_server(tmp_path_factory.mktemp(f"srv-{name}"), name, key_file, acl)
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """``server_factory(config_path, *args, prefix=())`` starts a server from that config (behind
    a command prefix, e.g. setpriv); all stopped at teardown."""
    started: list[ServerProcess] = []

    def start(config: Path, *args: str, prefix: tuple[str, ...] = ()) -> ServerProcess:
        sp = ServerProcess(config, config.parent, prefix=prefix)
        started.append(sp)
        return sp.start(*args)

    try:
        yield start
    finally:
        for sp in started:
            sp.stop()


@pytest.fixture
def start_mount(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[MountFactory]:
    """Factory: start_mount(servers, mountpoints=True, base=None, preexec=[], key=None) -> Mount."""
    if reason := fuse_unavailable():
        pytest.skip(reason)
    started: list[Mount] = []

    def factory(
        servers: list[ServerProcess],
        mountpoints: bool = True,
        base: Path | None = None,
        preexec: list[str] | None = None,
        key: Path | None = None,
    ) -> Mount:
        m = mount_servers(
            base or tmp_path_factory.mktemp("mount"), servers, key or key_file, mountpoints, preexec
        )
        started.append(m)
        return m

    yield factory
    for m in started:
        try:
            m.stop()
        except Exception:
            m.cleanup()


@pytest.fixture(scope="module")
def etfs_env(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[Env]:
    """Two servers (jive, onsala) and one mount with per-server mountpoints, for a whole module."""
    if reason := fuse_unavailable():
        pytest.skip(reason)
    with make_env(tmp_path_factory.mktemp("env"), key_file) as e:
        yield e


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """An empty `Cluster`; ``cluster.add(name)`` starts servers, all stopped by pid at teardown."""
    c = Cluster(tmp_path)
    c.key_file = tmp_path / "u.key"
    make_key(c.key_file)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    """Namespaces and veth pairs of this test; removed (their processes stopped) at teardown."""
    if reason := netns_unavailable():
        pytest.skip(reason)
    with NetLab() as lab:
        yield lab


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    """``tmpfs(path, "20m")`` mounts a small tmpfs on ``path``; unmounted (lazily) at teardown."""
    made: list[Path] = []

    def mount(path: Path, size: str) -> None:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        made.append(path)

    try:
        yield mount
    finally:
        for p in reversed(made):
            subprocess.run(["umount", "-l", str(p)], capture_output=True, check=False)


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
