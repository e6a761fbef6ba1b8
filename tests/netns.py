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

For etfs specifically: `start_server` runs an ``etfs-server`` inside a namespace and
`client_config` writes a ``mountpoints.yaml`` for servers reached at namespace addresses.

Nothing here imports pytest, so `bench/` can use it too.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parent.parent
_serial = itertools.count(1)  # names stay unique when several labs of one process overlap


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be created here (no permission): callers skip, not fail."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def poll(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``cond`` until it is true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM our own child by pid, SIGKILL it if it lingers; its exit status."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            proc.wait(5)
    return proc.returncode


def python_env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    e.pop("PYTHONWARNINGS", None)
    return e


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
                [*self.prefix(ns), *cmd], stdout=logf, stderr=subprocess.STDOUT, env=python_env(), cwd=cwd
            )
        self.procs.append(proc)
        return proc

    def run(self, ns: str, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix(ns), *cmd], capture_output=True, text=True, timeout=timeout, env=python_env()
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
                stop_process(proc)
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
@dataclass
class NsServer:
    name: str
    ns: str
    base: Path
    export: Path
    proc: subprocess.Popen[bytes]
    port: int
    data_port: int

    def log(self) -> str:
        p = self.base / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""


def start_server(
    lab: NetLab,
    ns: str,
    name: str,
    base: Path,
    key_file: Path,
    timeout: float = 20,
    transfer: dict[str, object] | None = None,
) -> NsServer:
    """An ``etfs-server`` named ``name`` in ``ns``, listening on all of its addresses (free ports).

    Its export is ``base/export`` (with a ``tmp/`` directory); user ``tester`` has all rights.
    ``transfer`` becomes the ``transfer:`` mapping of its server.yaml.
    """
    base.mkdir(parents=True, exist_ok=True)
    export = base / "export"
    (export / "tmp").mkdir(parents=True, exist_ok=True)
    os.chmod(export, 0o755)
    cfg = base / "server.yaml"
    cfg.write_text(
        f"name: {name}\nlisten: 0.0.0.0:0\ndata_listen: 0.0.0.0:0\nstate_dir: {base / 'state'}\n"
        "run_as: root\n"
        f"users:\n  tester:\n    key_file: {key_file}\n"
        f"exports:\n  {name}:\n    path: {export}\n    acl:\n"
        "      - {who: tester, path: /, rights: all}\n"
        + (f"transfer: {json.dumps(transfer)}\n" if transfer else "")
    )
    port_file = base / "ports"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "etfs_server.main", "-c", str(cfg), "--port-file", str(port_file)]
    proc = lab.spawn(ns, cmd, base / "server.log")

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} in {ns} exited:\n{(base / 'server.log').read_text()[-3000:]}")
        return port_file.exists() and len(port_file.read_text().split()) == 2

    poll(ready, timeout, f"server {name} in {ns}")
    port, data_port = map(int, port_file.read_text().split())
    return NsServer(name, ns, base, export, proc, port, data_port)


@dataclass
class ServerEntry:
    """One server as the client sees it: where to reach it, and where other servers reach it."""

    server: NsServer
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
            f"    address: {e.address}:{e.server.port}",
            "    user: tester",
            f"    key_file: {key_file}",
            f"    export: {e.server.name}",
        ]
        if e.peer_address:
            lines.append(f"    peer_address: {e.peer_address}:{e.server.port}")
        if e.mountpoint:
            lines.append(f"    mountpoint: {e.mountpoint}")
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the mount daemon in a namespace ---------------------------------------------------------------
def mounted_paths() -> set[str]:
    with open("/proc/self/mounts") as f:
        return {line.split()[1] for line in f}


def force_unmount(path: Path) -> None:
    """Lazy-unmount ``path`` if it is mounted (FUSE first, then plain umount)."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if str(path) in mounted_paths():
            subprocess.run(cmd, capture_output=True, check=False)


@dataclass
class NsMount:
    """``etfs mount -f`` run in a namespace's network only, so its mount is visible here."""

    lab: NetLab
    ns: str
    config: Path
    root: Path
    mountpoints: dict[str, Path]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> NsMount:
        cmd = [sys.executable, "-m", "etfs.cli", "mount", "-c", str(self.config), "-f"]
        cmd += ["--log-file", str(self.log)]
        self.proc = self.lab.spawn(self.ns, cmd, self.log.with_suffix(".stderr"), cwd=Path("/"))
        proc = self.proc
        registry = self.root.parent / "daemon.json"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"mount exited {proc.returncode}:\n{self.logs()}")
            try:
                pid = json.loads(registry.read_text()).get("pid")
            except (OSError, ValueError):
                return False
            return pid == proc.pid and all(str(p) in mounted_paths() for p in self.mountpoints.values())

        poll(ready, timeout, "the mount")
        return self

    def logs(self) -> str:
        out = []
        for p in (self.log.with_suffix(".stderr"), self.log):
            if p.exists():
                out.append(p.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def leftovers(self) -> list[str]:
        """Which of our paths are still mounted."""
        ours = {str(self.root), *(str(p) for p in self.mountpoints.values())}
        return sorted(ours & mounted_paths())

    def stop(self) -> int | None:
        """SIGTERM the daemon (by pid), then lazily unmount whatever is left."""
        code = stop_process(self.proc, 20) if self.proc is not None else None
        self.cleanup()
        return code

    def cleanup(self) -> None:
        for mp in self.mountpoints.values():
            force_unmount(mp)
        force_unmount(self.root)


def make_mount(
    lab: NetLab,
    ns: str,
    base: Path,
    entries: list[ServerEntry],
    key_file: Path,
    third_party: str = "auto",
    streams: int = 4,
    extra: str = "",
) -> NsMount:
    """Write a client config under ``base`` (mountpoints ``base/mnt/NAME``) and return an unstarted mount."""
    root = base / "mnt" / ".etfs"
    base.mkdir(parents=True, exist_ok=True)
    for e in entries:
        e.mountpoint = e.mountpoint or base / "mnt" / e.server.name
    cfg = client_config(base / "mountpoints.yaml", root, entries, key_file, third_party, streams, extra)
    mps = {e.server.name: e.mountpoint for e in entries if e.mountpoint is not None}
    return NsMount(lab, ns, cfg, root, mps, base / "mount.log")


def write_key(path: Path) -> Path:
    path.write_text("etfs-netns-test-key-NOT-A-SECRET-0123456789\n")
    path.chmod(0o600)
    return path
