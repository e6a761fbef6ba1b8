"""Operating etfs: systemd units, /etc/fstab mounting, the mount's fsname, logs, versions, keys.

The units in contrib/systemd are checked by `systemd-analyze verify` (with the install path of
the programs pointed at this environment, so that the check that ExecStart exists applies).
fstab mounting goes through the real chain: ``mount -a -T FSTAB`` -> mount(8) -> libfuse's
mount.fuse3 -> ``/bin/sh -c 'etfs CONFIG ROOT -o ...'`` -> the detached daemon, against real
servers; ``umount ROOT`` undoes everything.  systemd itself does not run here, so the
``x-systemd.automount`` line is checked as far as systemd's own fstab generator and verifier go.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from harness.mount import Mount, write_client_config
from harness.process import PY, REPO, child_env, wait_for
from harness.server import ServerFactory, ServerProcess, standard_setup, write_server_yaml

import etfs
from etfs.client.connection import RemoteError
from etfs.daemon.procs import pid_alive
from etfs.protocol import messages as m

UNITS = REPO / "contrib" / "systemd"
BIN = Path(sys.executable).parent  # where this environment's etfs and etfs-server live
AUTOMOUNT = "_netdev,x-systemd.automount"
FSTAB_GENERATOR = Path("/lib/systemd/system-generators/systemd-fstab-generator")

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None, reason="needs /dev/fuse"
)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env(), **kw)  # type: ignore[call-overload, no-any-return]


def mountinfo(path: Path) -> list[tuple[str, str]]:
    """(fstype, source) of every mount at ``path``, bottom first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(path):
                fstype, source = right.split()[:2]
                found.append((fstype, source))
    return found


# --- versions, -v, keys ---------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["etfs.cli", "etfs_server.main"])
def test_version(module: str) -> None:
    out = run([PY, "-m", module, "--version"], cwd=REPO)
    assert out.returncode == 0, out.stderr
    prog = "etfs" if module == "etfs.cli" else "etfs-server"
    assert out.stdout == f"{prog} {etfs.__version__}\n"


def test_version_matches_package_metadata() -> None:
    from importlib.metadata import version

    assert etfs.__version__ == version("etfs")


@pytest.mark.parametrize("where", ["before", "after"])
async def test_keygen_key_is_accepted_by_a_real_server(
    tmp_path: Path, server_factory: ServerFactory, nursery: trio.Nursery, where: str
) -> None:
    """`etfs-server keygen alice` writes a 0600 key and prints one users: line; a server.yaml
    with that line lets alice in with that key, and not with another."""
    keys = tmp_path / "keys"
    verbose = ["-v"]
    cmd = [PY, "-m", "etfs_server.main", *(verbose if where == "before" else [])]
    cmd += ["keygen", "alice", "--key-dir", str(keys), *(verbose if where == "after" else [])]
    out = run(cmd, cwd=REPO)
    assert out.returncode == 0, out.stderr
    line = out.stdout.rstrip("\n")
    assert "\n" not in line and line.startswith("  alice: "), out.stdout
    key_path = keys / "alice.key"
    assert key_path.stat().st_mode & 0o777 == 0o600
    # Again: the key stays, and the message says why.
    again = run(cmd, cwd=REPO)
    assert again.returncode == 1 and "not replacing" in again.stderr
    assert key_path.read_bytes().strip() != b""
    bad_name = run([PY, "-m", "etfs_server.main", "keygen", "../x", "--key-dir", str(keys)], cwd=REPO)
    assert (
        bad_name.returncode == 2 and "no user name" in bad_name.stderr and not (tmp_path / "x.key").exists()
    )

    export = tmp_path / "export"
    (export / "tmp").mkdir(parents=True)
    config = tmp_path / "server.yaml"
    acl = [{"who": "alice", "path": "/tmp", "rights": "all"}]
    write_server_yaml(config, exports={"main": {"path": str(export), "acl": acl}}, users={})
    text = config.read_text()
    assert "users: {}\n" in text
    config.write_text(text.replace("users: {}\n", "users:\n" + line + "\n"))
    sp = server_factory(config)

    c = sp.client(nursery, "alice", key_path.read_bytes().strip())
    await c.call(m.Mkdir(path="/tmp/by-alice", mode=0o755))
    await c.aclose()
    assert (export / "tmp" / "by-alice").is_dir()
    wrong = sp.client(nursery, "alice", b"x" * 64)
    with pytest.raises(RemoteError) as ei:
        await wrong.call(m.Ping())
    assert ei.value.errno == errno.EACCES
    await wrong.aclose()
    sp.assert_healthy(r"authentication failed for user 'alice' \(wrong key\)")


# --- logs and readiness under systemd -------------------------------------------------------------
@contextmanager
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """What systemd gives a Type=notify service: a datagram socket named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


async def test_server_logs_with_journal_priorities_and_notifies_ready(
    tmp_path: Path, server_factory: ServerFactory, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd (stderr is the journal stream named by $JOURNAL_STREAM) every line starts
    with its syslog priority, and -v adds debug (7) lines; READY=1 comes once the ports listen."""
    setup = standard_setup(tmp_path / "srv")
    log = setup.config.parent / f"{setup.config.stem}.log"  # where ServerProcess sends stderr
    log.touch()
    st = log.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with notify_socket(tmp_path, monkeypatch) as sock:
        sp = server_factory(setup.config, "-v")
        assert sock.recv(100) == b"READY=1"
    c = sp.client(nursery, "alice", setup.keys["alice"])
    await c.call(m.Stat(path="/tmp"))
    await c.aclose()
    await sp.wait_for_log(r"^<7>etfs_server\.server: \S+ Stat #")
    lines = sp.log().splitlines()
    assert any(re.match(r"<6>etfs_server\.server: server testsrv listening", ln) for ln in lines)
    assert all(re.match(r"<[0-7]>", ln) for ln in lines), lines


async def test_server_logs_plainly_elsewhere(
    tmp_path: Path, server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $JOURNAL_STREAM that is not our stderr (inherited by a redirected child) changes nothing;
    and without -v there are no debug lines."""
    setup = standard_setup(tmp_path / "srv")
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    sp = server_factory(setup.config)
    await sp.wait_for_log(r"^\S+ \S+ INFO etfs_server\.server: server testsrv listening")
    assert not sp.log_lines("DEBUG") and "<6>" not in sp.log()


@needs_fuse
def test_mount_notifies_ready_with_mountpoints_and_names_its_servers(
    tmp_path: Path,
    start_server: ServerFactory,
    start_mount: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`etfs mount -f` (the units' ExecStart) says READY=1 once every mountpoint is there; the
    mount's source is etfs:jive,onsala for mount, df and findmnt, also with a directory named
    etfs in the current directory (a bare "etfs" was then shown as that path)."""
    servers = [start_server("jive"), start_server("onsala")]
    with notify_socket(tmp_path, monkeypatch) as sock:
        mount = start_mount(servers)  # type: ignore[operator]
        assert sock.recv(100) == b"READY=1"
    for path in (mount.root, *mount.mountpoints.values()):
        assert mountinfo(path) == [("fuse.etfs", "etfs:jive,onsala")], path
    cwd = tmp_path / "cwd"
    (cwd / "etfs").mkdir(parents=True)
    df = subprocess.run(["df", str(mount.mountpoints["jive"])], capture_output=True, text=True, cwd=cwd)
    assert df.returncode == 0 and df.stdout.splitlines()[1].split()[0] == "etfs:jive,onsala", df
    findmnt = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(mount.root)], capture_output=True, text=True, cwd=cwd
    )
    assert findmnt.stdout.split() == ["etfs:jive,onsala", "fuse.etfs"], findmnt


# --- detached mounts: -v, fstab ---------------------------------------------------------------------
@contextmanager
def detached_mount(config: Path, root: Path, mountpoints: dict[str, Path]) -> Iterator[Path]:
    """Yields the registry path of a mount started detached (by `etfs mount` or mount(8)) and
    always undoes it: `etfs umount`, then the daemon's pid from the registry, then the mounts."""
    registry = root.parent / "daemon.json"
    pids: list[int] = []
    try:
        yield registry
    finally:
        try:
            pids.append(json.loads(registry.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pass
        subprocess.run(
            [PY, "-m", "etfs.cli", "umount", "-c", str(config)], capture_output=True, env=child_env()
        )
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        Mount(config, root, mountpoints, root.parent / "unused.log").cleanup()


def client_setup(
    base: Path, servers: list[ServerProcess], key_file: Path
) -> tuple[Path, Path, dict[str, Path]]:
    root = base / "mnt" / ".etfs"
    mps = {s.name: base / "mnt" / s.name for s in servers}
    return write_client_config(base / "mountpoints.yaml", servers, key_file, root, mps), root, mps


@needs_fuse
@pytest.mark.parametrize("where", ["before", "after", "none"])
def test_verbose_before_or_after_the_subcommand(
    tmp_path: Path, start_server: ServerFactory, key_file: Path, where: str
) -> None:
    server = start_server("jive")
    config, root, mps = client_setup(tmp_path, [server], key_file)
    cmd = [PY, "-m", "etfs.cli", *(["-v"] if where == "before" else []), "mount", "-c", str(config)]
    cmd += ["-v"] if where == "after" else []
    with detached_mount(config, root, mps):
        out = run(cmd)
        assert out.returncode == 0, out.stderr
        assert (mps["jive"] / "tmp").is_dir()  # connects to the server (a debug line)
        log = (root.parent / "daemon.log").read_text()
    assert (" DEBUG " in log) == (where != "none"), log


def fstab_line(source: str, root: Path, fstype: str, options: str) -> str:
    return f"{source} {root} {fstype} {options} 0 0\n"


@needs_fuse
def test_fstab_mount_and_umount(tmp_path: Path, start_server: ServerFactory, key_file: Path) -> None:
    """``mount -a -T FSTAB`` with the ``etfs#CONFIG`` line returns once the mount answers; the
    options of a network mount and an automount pass; ``umount ROOT`` removes the server
    mountpoints too and ends the daemon."""
    servers = [start_server("jive"), start_server("onsala")]
    config, root, mps = client_setup(tmp_path, servers, key_file)
    root.mkdir(parents=True)
    fstab = tmp_path / "fstab"
    options = "_netdev,x-systemd.automount,x-systemd.idle-timeout=60,nofail,verbose"
    fstab.write_text(fstab_line(f"{BIN / 'etfs'}#{config}", root, "fuse", options))
    with detached_mount(config, root, mps) as registry:
        out = run(["mount", "-a", "-T", str(fstab)])
        assert out.returncode == 0, out.stdout + out.stderr
        # Ready when mount(8) returns: no waiting here.
        for path in (root, *mps.values()):
            assert mountinfo(path) == [("fuse.etfs", "etfs:jive,onsala")], path
        (mps["onsala"] / "tmp" / "via-fstab").write_text("hello\n")
        assert (servers[1].export / "tmp" / "via-fstab").read_text() == "hello\n"
        pid = json.loads(registry.read_text())["pid"]
        assert " DEBUG " in (root.parent / "daemon.log").read_text()  # -o verbose

        out = run(["umount", str(root)])
        assert out.returncode == 0, out.stderr
        wait_for(lambda: not pid_alive(pid), 15, "the daemon to exit after umount")
        for path in (root, *mps.values()):
            assert mountinfo(path) == [], path
        assert not registry.exists()


@needs_fuse
def test_fstab_type_form_finds_etfs_on_the_default_path(
    tmp_path: Path, start_server: ServerFactory, key_file: Path
) -> None:
    """``CONFIG ROOT fuse.etfs`` makes mount.fuse3 run plain ``etfs`` through /bin/sh without any
    PATH: the shell's default finds /usr/local/bin/etfs.  In a private mount namespace (this
    machine's /usr/local/bin stays untouched) this environment's etfs is bound there."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    server = start_server("jive")
    config, root, mps = client_setup(tmp_path, [server], key_file)
    root.mkdir(parents=True)
    fakebin = tmp_path / "usr-local-bin"
    fakebin.mkdir()
    (fakebin / "etfs").symlink_to(BIN / "etfs")
    fstab = tmp_path / "fstab"
    fstab.write_text(fstab_line(str(config), root, "fuse.etfs", "_netdev,nofail"))
    script = f"""
set -e
mount --bind {fakebin} /usr/local/bin
mount -a -T {fstab}
grep -F ' {root} ' /proc/self/mountinfo
cat {mps["jive"]}/tmp/hello
umount {root}
"""
    (server.export / "tmp" / "hello").write_text("from jive\n")
    with detached_mount(config, root, mps) as registry:
        out = run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
        assert out.returncode == 0, out.stdout + out.stderr
        assert " - fuse.etfs etfs:jive " in out.stdout and "from jive\n" in out.stdout
        wait_for(lambda: not registry.exists(), 15, "the daemon to exit after umount")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("rw,bogus=1", "unknown mount option 'bogus=1'"),
        ("ro", "mount option 'ro': etfs mounts are read-write"),
    ],
)
def test_fstab_bad_option_is_one_clear_line(tmp_path: Path, options: str, message: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    config = tmp_path / "mountpoints.yaml"
    config.write_text(f"root: {root}\nservers: {{}}\n")
    fstab = tmp_path / "fstab"
    fstab.write_text(fstab_line(f"{BIN / 'etfs'}#{config}", root, "fuse", options))
    out = run(["mount", "-a", "-T", str(fstab)])
    assert out.returncode != 0
    assert f"etfs: {message}" in out.stderr, out.stderr
    assert mountinfo(root) == []


def test_fstab_automount_line_makes_systemd_units(tmp_path: Path) -> None:
    """systemd's own fstab generator turns the documented line into an automount required by
    remote-fs.target and a mount unit of type fuse.etfs; both pass `systemd-analyze verify`."""
    if not FSTAB_GENERATOR.exists() or shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-fstab-generator and systemd-analyze")
    fstab = tmp_path / "fstab"
    fstab.write_text(
        fstab_line(
            "/etc/etfs/mountpoints.yaml", Path("/mnt/etfs"), "fuse.etfs", "_netdev,x-systemd.automount"
        )
    )
    out_dir = tmp_path / "generated"
    out_dir.mkdir()
    gen_env = dict(child_env(), SYSTEMD_FSTAB=str(fstab), SYSTEMD_PROC_CMDLINE="")
    gen = subprocess.run(
        [str(FSTAB_GENERATOR), *[str(out_dir)] * 3], capture_output=True, text=True, env=gen_env
    )
    assert gen.returncode == 0, gen.stderr
    unit = (out_dir / "mnt-etfs.mount").read_text()
    assert "Type=fuse.etfs" in unit and "What=/etc/etfs/mountpoints.yaml" in unit
    assert "Before=remote-fs.target" in unit
    assert (out_dir / "remote-fs.target.requires" / "mnt-etfs.automount").exists()
    verify = subprocess.run(
        ["systemd-analyze", "verify", "mnt-etfs.automount", "mnt-etfs.mount"],
        capture_output=True,
        text=True,
        cwd=out_dir,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


# --- the units ----------------------------------------------------------------------------------------
def installed_units(tmp_path: Path) -> list[Path]:
    """contrib/systemd's units, with the programs' install path pointed at this environment."""
    units = []
    for src in sorted(UNITS.rglob("*.service")):
        dst = tmp_path / src.relative_to(UNITS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = src.read_text()
        assert "ExecStart=/usr/local/bin/" in text, src
        dst.write_text(text.replace("/usr/local/bin/", f"{BIN}/"))
        units.append(dst)
    return units


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    units = installed_units(tmp_path)
    assert {u.relative_to(tmp_path).as_posix() for u in units} == {
        "etfs-mount.service",
        "etfs-server.service",
        "user/etfs-mount.service",
    }
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700)
    for unit in units:
        user = ["--user"] if unit.parent.name == "user" else []
        out = subprocess.run(
            ["systemd-analyze", *user, "verify", unit.name],
            capture_output=True,
            text=True,
            cwd=unit.parent,
            env=dict(child_env(), XDG_RUNTIME_DIR=str(runtime)),
        )
        # verify exits 0 for unknown keys and bad values, but says so: any message fails.
        assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), (unit, out.stdout, out.stderr)


def unit_setting(unit: Path, key: str) -> str:
    values = [ln.split("=", 1)[1] for ln in unit.read_text().splitlines() if ln.startswith(key + "=")]
    assert len(values) == 1, (unit, key, values)
    return values[0]


async def test_server_works_with_the_units_capabilities_only(
    tmp_path: Path, server_factory: ServerFactory, nursery: trio.Nursery
) -> None:
    """etfs-server.service runs as root with CapabilityBoundingSet= and NoNewPrivileges=; started
    that way (setpriv does what systemd does), a user mapped to an unprivileged account works on
    files as that account."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv")
    unit = UNITS / "etfs-server.service"
    caps = unit_setting(unit, "CapabilityBoundingSet").split()
    assert unit_setting(unit, "User") == "root" and unit_setting(unit, "NoNewPrivileges") == "yes"
    names = [c.removeprefix("CAP_").lower() for c in caps]
    prefix = ("setpriv", "--bounding-set", ",".join(["-all", *(f"+{n}" for n in names)]), "--no-new-privs")
    setup = standard_setup(
        tmp_path / "srv",
        extra={"run_as": NOBODY, "users": {"alice": {"key_file": "alice.key"}}},
    )
    for d in (setup.export, setup.export / "tmp"):
        os.chown(d, NOBODY, NOBODY)
        os.chmod(d, 0o700)
    sp = server_factory(setup.config, prefix=prefix)
    assert sp.proc is not None
    status = Path(f"/proc/{sp.proc.pid}/status").read_text()
    eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
    assert eff == sum(1 << CAP_NUMBERS[c] for c in caps), status

    c = sp.client(nursery, "alice", setup.keys["alice"])
    await c.call(m.Mkdir(path="/tmp/d", mode=0o755))
    o = await c.call(m.Create(path="/tmp/d/f", mode=0o640, flags=os.O_RDWR | os.O_EXCL))
    assert await c.call(m.Write(handle=o.handle, offset=0, data=b"under the unit")) == 14
    await c.call(m.Close(handle=o.handle))
    await c.call(m.SetAttr(path="/tmp/d/f", mode=0o600))
    await c.call(m.Rename(old="/tmp/d/f", new="/tmp/d/g"))
    assert len(await c.call(m.Checksum(path="/tmp/d/g"))) == 32
    await c.aclose()
    st = (setup.export / "tmp" / "d" / "g").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY, NOBODY, 0o600)
    sp.assert_healthy()


NOBODY = 65534
# linux/capability.h
CAP_NUMBERS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_NET_BIND_SERVICE": 10,
}
