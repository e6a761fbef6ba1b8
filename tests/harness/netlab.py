"""Network namespaces for tests and benchmarks: namespaces, veth pairs, routes, shaping, counters.

`NetLab` creates namespaces and veth pairs whose names carry this process's pid (unique per
run), assigns the addresses you give it (use 10.213.x.y only, and only inside these
namespaces), optionally shapes an interface with htb or tbf, reads interface byte counters
(``/sys/class/net/IF/statistics`` read via ``ip netns exec NS cat``), and removes everything
it created in `cleanup()` (also on failure: use it as a context manager or call `cleanup` in
a finalizer).

Processes: `NetLab.prefix(ns)` is the command prefix that enters only the *network*
namespace (``nsenter --net=/run/netns/NS --``), so a FUSE mount made by a daemon started
with it stays in the root mount namespace and is visible to the caller (``ip netns exec``
would also unshare the mount namespace and hide it).  `NetLab.spawn` starts a process with
that prefix and remembers its pid; `cleanup` stops those pids (SIGTERM, then SIGKILL) and
nothing else.

For etfs specifically: `start_server` runs an ``etfs-server`` inside a namespace,
`client_config` writes a ``mountpoints.yaml`` for servers reached at namespace addresses and
`make_mount` prepares an ``etfs mount`` whose daemon lives in a namespace's network.

Nothing here imports pytest, so `bench/` can use it too.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .mount import Mount
from .process import REPO, child_env, stop_pid
from .server import ServerProcess, single_export_yaml

_serial = itertools.count(1)  # names stay unique when several labs of one process overlap


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here (no permission): callers skip, not fail."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


@dataclass
class NetLab:
    """Namespaces, veth pairs and processes of one run; `cleanup()` removes all of them."""

    tag: str = field(default_factory=lambda: str(os.getpid()))
    namespaces: list[str] = field(default_factory=list)
    links: list[tuple[str, str, str, str]] = field(default_factory=list)  # (ns_a, if_a, ns_b, if_b)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    finalizers: list[Callable[[], object]] = field(default_factory=list)  # run first, last-in first

    # --- namespaces and links -----------------------------------------------------------------
    def namespace(self, role: str) -> str:
        """A new namespace ``etfs-PID-ROLE`` with loopback up."""
        name = f"etfs-{self.tag}-{next(_serial)}{role}"
        r = _run("ip", "netns", "add", name, check=False)
        if r.returncode != 0:
            if "ermission" in r.stderr or "not permitted" in r.stderr:
                raise NetnsUnavailable(f"'ip netns add' is not permitted here: {r.stderr.strip()}")
            raise RuntimeError(f"ip netns add {name} failed: {r.stderr.strip()}")
        self.namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def link(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str, prefix: int = 24) -> tuple[str, str]:
        """A veth pair between two namespaces, addressed (``addr/prefix``) and up: the two names."""
        n = next(_serial)
        a, b = f"e{self.tag}x{n}a", f"e{self.tag}x{n}b"
        assert len(a) <= 15, a
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        self.links.append((ns_a, a, ns_b, b))
        _run("ip", "link", "set", a, "netns", ns_a)
        _run("ip", "link", "set", b, "netns", ns_b)
        _run("ip", "-n", ns_a, "addr", "add", f"{addr_a}/{prefix}", "dev", a)
        _run("ip", "-n", ns_b, "addr", "add", f"{addr_b}/{prefix}", "dev", b)
        _run("ip", "-n", ns_a, "link", "set", a, "up")
        _run("ip", "-n", ns_b, "link", "set", b, "up")
        return a, b

    def route(self, ns: str, destination: str, via: str) -> None:
        """A route in ``ns`` to ``destination`` (CIDR or ``default``) via a gateway address."""
        _run("ip", "-n", ns, "route", "add", destination, "via", via)

    def forwarding(self, ns: str, on: bool = True) -> None:
        """Let ``ns`` route packets between its interfaces (a router namespace)."""
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.ip_forward={int(on)}")

    def shape(self, ns: str, dev: str, mbit: float, kind: str = "htb") -> None:
        """Cap what ``dev`` in ``ns`` sends at ``mbit`` Mbit/s (htb class or tbf qdisc).

        Egress only: to cap both directions of a link, shape both ends of the veth pair.
        """
        rate = f"{mbit}mbit"
        if kind == "htb":
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                 "handle", "1:", "htb", "default", "10")  # fmt: skip
            _run("ip", "netns", "exec", ns, "tc", "class", "replace", "dev", dev, "parent", "1:",
                 "classid", "1:10", "htb", "rate", rate, "ceil", rate)  # fmt: skip
        elif kind == "tbf":
            burst = max(32 * 1024, int(mbit * 1e6 / 8 / 250))  # >= rate/HZ
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                 "rate", rate, "burst", str(burst), "latency", "50ms")  # fmt: skip
        else:
            raise ValueError(f"unknown shaping kind {kind!r} (htb or tbf)")

    def counters(self, ns: str, dev: str) -> tuple[int, int]:
        """(rx_bytes, tx_bytes) of ``dev`` inside ``ns``."""
        r = _run("ip", "netns", "exec", ns, "cat",
                 f"/sys/class/net/{dev}/statistics/rx_bytes",
                 f"/sys/class/net/{dev}/statistics/tx_bytes")  # fmt: skip
        rx, tx = (int(x) for x in r.stdout.split())
        return rx, tx

    def total_bytes(self, ns: str, devs: list[str]) -> int:
        """rx + tx of several interfaces of ``ns``."""
        return sum(sum(self.counters(ns, d)) for d in devs)

    # --- processes ------------------------------------------------------------------------------
    @staticmethod
    def prefix(ns: str) -> list[str]:
        """Enter only the network namespace (FUSE mounts stay visible to the caller)."""
        return ["nsenter", f"--net=/run/netns/{ns}", "--"]

    def spawn(self, ns: str, cmd: list[str], log: Path, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in the network namespace ``ns``; output to ``log``; stopped by cleanup."""
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [*self.prefix(ns), *cmd], stdout=logf, stderr=subprocess.STDOUT, env=child_env(), cwd=cwd
            )
        self.procs.append(proc)
        return proc

    def run(self, ns: str, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(ns), *cmd], capture_output=True, text=True, timeout=timeout, env=child_env()
        )

    # --- teardown -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Run finalizers, stop our processes (by pid), delete our namespaces (and their veths)."""
        while self.finalizers:
            try:
                self.finalizers.pop()()
            except Exception:  # teardown continues whatever happens
                pass
        for proc in reversed(self.procs):
            try:
                stop_pid(proc)
            except Exception:  # teardown continues whatever happens
                pass
        self.procs.clear()
        for _ns_a, a, _ns_b, _b in self.links:
            # A veth not yet moved into a namespace would outlive the namespaces.
            if Path(f"/sys/class/net/{a}").exists():
                _run("ip", "link", "del", a, check=False)
        self.links.clear()
        for ns in reversed(self.namespaces):
            _run("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


def netns_unavailable() -> str | None:
    """None when this process may create namespaces, else why not."""
    name = f"etfs-{os.getpid()}-probe"
    r = _run("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return f"'ip netns add' failed: {r.stderr.strip()}"
    _run("ip", "netns", "del", name, check=False)
    return None


# --- etfs servers and client config in namespaces --------------------------------------------------
def start_server(
    lab: NetLab,
    ns: str,
    name: str,
    base: Path,
    key_file: Path,
    timeout: float = 20,
    transfer: Mapping[str, object] | None = None,
) -> ServerProcess:
    """An ``etfs-server`` named ``name`` in ``ns``, listening on all of its addresses (free ports).

    Its export is ``base/export`` (with a ``tmp/`` directory); user ``tester`` has all rights.
    ``transfer`` becomes the ``transfer:`` mapping of its server.yaml.  The lab stops it at cleanup.
    """
    base.mkdir(parents=True, exist_ok=True)
    export = base / "export"
    (export / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(export, 0o755)
    cfg = single_export_yaml(
        base / "server.yaml", name, export, key_file, extra={"transfer": dict(transfer)} if transfer else None
    )
    srv = ServerProcess(
        cfg,
        base,
        name=name,
        export=export,
        prefix=tuple(lab.prefix(ns)),
        listen="0.0.0.0:0",
        data_listen="0.0.0.0:0",
    )
    lab.finalizers.append(srv.stop)
    return srv.start(timeout=timeout)


@dataclass
class ServerEntry:
    """One server as the client sees it: where to reach it, and where other servers reach it."""

    server: ServerProcess
    address: str
    peer_address: str | None = None
    mountpoint: Path | None = None


def client_config(
    path: Path,
    root: Path,
    entries: list[ServerEntry],
    key_file: Path,
    third_party: str = "auto",
    streams: int = 4,
    extra: str = "",
) -> Path:
    """Write a ``mountpoints.yaml`` for servers reached at namespace addresses."""
    lines = [
        f"root: {root}",
        "connect_timeout: 3",
        "request_timeout: 30",
        "transfer:",
        f"  third_party: {third_party}",
        f"  streams: {streams}",
        extra,
        "servers:",
    ]
    for e in entries:
        lines += [
            f"  {e.server.name}:",
            f"    address: {e.address}:{e.server.control_port}",
            "    user: tester",
            f"    key_file: {key_file}",
            f"    export: {e.server.name}",
        ]
        if e.peer_address:
            lines.append(f"    peer_address: {e.peer_address}:{e.server.control_port}")
        if e.mountpoint:
            lines.append(f"    mountpoint: {e.mountpoint}")
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the mount daemon in a namespace ---------------------------------------------------------------
def make_mount(
    lab: NetLab,
    ns: str,
    base: Path,
    entries: list[ServerEntry],
    key_file: Path,
    **config: Any,
) -> Mount:
    """An unstarted ``etfs mount`` that will run in ``ns``'s network only (its mounts stay visible
    here); config under ``base``, mountpoints ``base/mnt/NAME``; the lab stops it at cleanup."""
    root = base / "mnt" / ".etfs"
    base.mkdir(parents=True, exist_ok=True)
    for e in entries:
        e.mountpoint = e.mountpoint or base / "mnt" / e.server.name
    cfg = client_config(base / "mountpoints.yaml", root, entries, key_file, **config)
    mps = {e.server.name: e.mountpoint for e in entries if e.mountpoint is not None}
    mount = Mount(cfg, root, mps, base / "mount.log", preexec=lab.prefix(ns))
    lab.finalizers.append(mount.stop)
    return mount


def write_key(path: Path) -> Path:
    path.write_text("etfs-netns-test-key-NOT-A-SECRET-0123456789\n")
    path.chmod(0o600)
    return path
