"""Failures say why, at once, and etfs never damages the host (issue 12, items 1 and 2).

Each test drives the real commands (`etfs mount`, `etfs status`, `etfs-server`) against real
servers on loopback: a refused login fails the mount with one line per server, an unreachable
server is named and retried, a server that starts refusing answers EACCES, a FUSE device that
cannot work is one line, and no file written by name replaces a symlink, FIFO or device.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness.mount import Mount, MountFactory, mounted, write_client_config
from harness.process import PY, child_env, wait_for
from harness.server import ServerFactory, ServerProcess, make_key, write_server_yaml

from etfs.common.safefile import create_new, open_append, write_atomic

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(
    not ROOT or not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="needs root, /dev/fuse and fusermount3",
)

VICTIM = "precious contents that etfs must never overwrite\n"


def etfs(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "etfs.cli", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd="/",
        timeout=timeout,
    )


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@contextmanager
def background_mount(
    base: Path, servers: list[ServerProcess], key_file: Path, edit: str = ""
) -> Iterator[Mount]:
    """A mountpoints.yaml for ``servers`` (``edit``: "old => new", once), for `etfs mount`
    run by the test itself; whatever got mounted is unmounted at the end, also on failure."""
    root = base / "mnt" / ".etfs"
    mps = {s.name: base / "mnt" / s.name for s in servers}
    cfg = write_client_config(base / "mountpoints.yaml", servers, key_file, root, mps)
    if edit:
        old, new = edit.split(" => ")
        text = cfg.read_text()
        assert old in text, (old, text)
        cfg.write_text(text.replace(old, new, 1))
    m = Mount(cfg, root, mps, root.parent / "daemon.log")
    try:
        yield m
    finally:
        if (root.parent / "daemon.json").exists():
            etfs("umount", "-c", str(cfg))
        m.cleanup()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def other_key(path: Path) -> Path:
    make_key(path)  # 0600, random: not the key the servers know
    return path


# --- 1. failures say why, at once ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ("user: tester => user: tesster", "authentication failed (user 'tesster'"),
        ("KEY", "authentication failed (user 'tester'"),
        ("export: jive => export: nope", "no export named 'nope'"),
    ],
    ids=["user", "key", "export"],
)
def test_mount_fails_on_refused_login(
    start_server: ServerFactory, key_file: Path, tmp_path: Path, edit: str, says: str
) -> None:
    jive, onsala = start_server("jive"), start_server("onsala")
    if edit == "KEY":
        edit = f"key_file: {key_file} => key_file: {other_key(tmp_path / 'other.key')}"
    # Only jive's entry is wrong (the edit changes the first match: jive's).
    with background_mount(tmp_path, [jive, onsala], key_file, edit) as m:
        r = etfs("mount", "-c", str(m.config))
        assert r.returncode == 1, r
        jive_lines = [ln for ln in lines(r.stderr) if ln.startswith("etfs mount: jive:")]
        assert len(jive_lines) == 1 and says in jive_lines[0], r.stderr
        assert not any("onsala" in ln for ln in lines(r.stderr)), r.stderr  # onsala is fine
        assert "Traceback" not in r.stderr and "mounted" not in r.stdout, r
        assert not mounted(m.root) and not (m.root.parent / "daemon.json").exists()


def test_mount_fails_on_tls_that_cannot_work(
    start_server: ServerFactory, key_file: Path, tmp_path: Path
) -> None:
    """TLS configured for a server that does not speak it: refused for good, not "unreachable"."""
    trustme = pytest.importorskip("trustme")
    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    jive = start_server("jive")
    edit = "    export: jive\n => " + f"    export: jive\n    tls: {{ca_file: {ca}}}\n"
    with background_mount(tmp_path, [jive], key_file, edit) as m:
        r = etfs("mount", "-c", str(m.config))
        assert r.returncode == 1, r
        jive_lines = [ln for ln in lines(r.stderr) if ln.startswith("etfs mount: jive:")]
        assert (
            len(jive_lines) == 1 and f"jive: TLS with 127.0.0.1:{jive.control_port} failed" in jive_lines[0]
        ), r
        assert "unreachable" not in r.stderr and not mounted(m.root), r


def test_mount_with_unreachable_server_says_it_retries(
    start_server: ServerFactory, key_file: Path, tmp_path: Path
) -> None:
    jive, onsala = start_server("jive"), start_server("onsala")
    onsala.stop()  # down when mounting; its port stays known and it comes back on it
    with background_mount(tmp_path, [jive, onsala], key_file) as m:
        r = etfs("mount", "-c", str(m.config))
        assert r.returncode == 0, r
        said = lines(r.stderr)
        assert len(said) == 1 and said[0].startswith("etfs mount: onsala: unreachable ("), r.stderr
        assert "Connection refused" in said[0] and "retries" in said[0], said
        # The log's path is printed at start, and it is where the daemon logs.
        log_path = Path(r.stdout.rsplit("log: ", 1)[1].strip())
        assert log_path == m.log and log_path.is_file(), r.stdout
        assert (m.dir("jive") / "tmp").is_dir()
        with pytest.raises(OSError) as down:
            os.listdir(m.dir("onsala"))
        assert down.value.errno == errno.EHOSTDOWN
        onsala.restart()
        wait_for(lambda: _lists(m.dir("onsala")), 20, "onsala to be used once it is back")


def _lists(path: Path) -> bool:
    try:
        return "tmp" in os.listdir(path)
    except OSError:
        return False


def test_ls_of_server_that_refuses_login_is_eacces(
    start_server: ServerFactory, start_mount: MountFactory, tmp_path: Path
) -> None:
    jive = start_server("jive")
    m = start_mount([jive])
    assert "tmp" in os.listdir(m.dir("jive"))
    # The server now knows another key for our user (rotated): every login is refused.
    text = jive.config.read_text()
    old = text.split("key_file: ", 1)[1].split("\n", 1)[0]
    jive.stop()
    jive.config.write_text(text.replace(old, str(other_key(tmp_path / "rotated.key"))))
    jive.restart()
    errors: list[int] = []

    def refused() -> bool:
        try:
            os.listdir(m.dir("jive") / "tmp")
        except OSError as exc:
            errors.append(exc.errno or 0)
            return True
        return False

    wait_for(refused, 15, "the mount to notice the refused login")
    for _ in range(3):  # also while it backs off before logging in again
        refused()
    assert errors and set(errors) == {errno.EACCES}, [errno.errorcode.get(e) for e in errors]
    r = subprocess.run(["ls", str(m.dir("jive"))], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    assert "cannot log in to server jive: authentication failed" in m.log.read_text()


def _in_mount_namespace(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=90,
    )


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.parametrize("device", ["dev-null", "nodev"])
def test_unusable_fuse_device_is_one_line(
    start_server: ServerFactory, key_file: Path, tmp_path: Path, foreground: bool, device: str
) -> None:
    """/dev/fuse replaced, in a private mount namespace, by /dev/null (found before mounting),
    or by a FUSE node on a nodev filesystem (libfuse's open fails: its own message is the line)."""
    jive = start_server("jive")
    with background_mount(tmp_path, [jive], key_file) as m:
        if device == "dev-null":
            fake = "mount --bind /dev/null /dev/fuse"
            says = "/dev/fuse is not the FUSE device"
        else:
            nd = tmp_path / "nodev"
            nd.mkdir()
            fake = (
                f"mount -t tmpfs -o nodev tmpfs {nd} && mknod {nd}/fuse c 10 229 && "
                f"mount --bind {nd}/fuse /dev/fuse"
            )
            says = "failed to open /dev/fuse: Permission denied"
        cmd = f"{PY} -m etfs.cli mount -c {m.config}" + (
            f" -f --log-file {tmp_path}/fg.log" if foreground else ""
        )
        # Whatever happens, nothing stays mounted or running in the namespace.
        umount = f"{PY} -m etfs.cli umount -c {m.config} >/dev/null 2>&1"
        r = _in_mount_namespace(f"set -e; {fake}; set +e; {cmd}; rc=$?; {umount}; exit $rc")
        assert r.returncode == 1, r
        said = lines(r.stderr)
        assert len(said) == 1 and said[0].startswith("etfs mount: ") and says in said[0], r.stderr


def test_state_dir_error_names_file_and_line(server_factory: ServerFactory, tmp_path: Path) -> None:
    make_key(tmp_path / "u.key")
    (tmp_path / "export").mkdir()
    cfg = write_server_yaml(
        tmp_path / "server.yaml",
        exports={"main": {"path": str(tmp_path / "export"), "acl": [{"who": "u", "rights": "all"}]}},
        users={"u": {"key_file": str(tmp_path / "u.key")}},
        extra={"state_dir": "/proc/nope"},
    )
    line = next(i for i, ln in enumerate(cfg.read_text().splitlines(), 1) if ln.startswith("state_dir:"))
    r = subprocess.run(
        [PY, "-m", "etfs_server.main", "-c", str(cfg)], capture_output=True, text=True, env=child_env()
    )
    assert r.returncode == 2, r
    assert lines(r.stderr) == [
        f"etfs-server: {cfg}:{line}: state_dir /proc/nope: cannot create: No such file or directory"
    ], r.stderr


def test_acl_naming_nobody_is_warned_with_its_line(server_factory: ServerFactory, tmp_path: Path) -> None:
    make_key(tmp_path / "u.key")
    (tmp_path / "export").mkdir()
    acl = [
        {"who": "u", "rights": "all"},
        {"who": "uu", "rights": "read"},
        {"group": "staff", "rights": "read"},
    ]
    cfg = write_server_yaml(
        tmp_path / "server.yaml",
        exports={"main": {"path": str(tmp_path / "export"), "acl": acl}},
        users={"u": {"key_file": str(tmp_path / "u.key"), "groups": ["ops"]}},
    )
    text = cfg.read_text().splitlines()
    uu_line = next(i for i, ln in enumerate(text, 1) if "who: uu" in ln)
    sp = server_factory(cfg)  # a warning, not an error: the server runs
    warned = sp.log_lines("WARNING")
    assert any(f"{cfg}:{uu_line}:" in w and "unknown user 'uu'" in w for w in warned), warned
    assert any("no user is in group 'staff'" in w for w in warned), warned
    assert not any("'u'" in w or "'ops'" in w for w in warned), warned


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_key_file_others_may_read_is_refused(
    start_server: ServerFactory, key_file: Path, tmp_path: Path, mode: int
) -> None:
    jive = start_server("jive")
    loose = tmp_path / "loose.key"
    shutil.copy(key_file, loose)
    loose.chmod(mode)
    # The client: mountpoints.yaml names the key; nothing is mounted, one line says why.
    with background_mount(tmp_path, [jive], key_file, f"key_file: {key_file} => key_file: {loose}") as m:
        r = etfs("mount", "-c", str(m.config))
        assert r.returncode == 2, r
        said = lines(r.stderr)
        assert len(said) == 1 and f"{m.config}:" in said[0] and f"chmod 600 {loose}" in said[0], r.stderr
        assert not mounted(m.root)
    # The server: a user's key file.
    cfg = tmp_path / "server.yaml"
    cfg.write_text(jive.config.read_text().replace(f"key_file: {key_file}", f"key_file: {loose}"))
    r = subprocess.run(
        [PY, "-m", "etfs_server.main", "-c", str(cfg)], capture_output=True, text=True, env=child_env()
    )
    assert r.returncode == 2 and f"{cfg}:" in r.stderr and f"(mode {mode:04o})" in r.stderr, r


def test_status_into_head_exits_quietly(start_server: ServerFactory, start_mount: MountFactory) -> None:
    m = start_mount([start_server("jive")])
    for args in ("status", "status --json --watch"):  # --watch: writes again after head has gone
        script = f"{{ {PY} -m etfs.cli {args} --mount {m.root} 2>err; echo $? > rc; }} | head -1"
        r = subprocess.run(
            ["sh", "-c", script],
            capture_output=True,
            text=True,
            env=child_env(),
            cwd=m.log.parent,
            timeout=30,
        )
        assert r.returncode == 0 and len(lines(r.stdout)) == 1, r
        assert (m.log.parent / "rc").read_text().strip() == "0", args
        assert (m.log.parent / "err").read_text() == "", args


# --- 2. never damage the host -------------------------------------------------------------------
def _planted(kind: str, path: Path, victim: Path) -> None:
    if kind == "symlink":
        path.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null node
    elif kind == "foreign":
        path.write_text(VICTIM)
        os.chown(path, 65534, 65534)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device", "foreign"])
def test_mount_log_never_replaces_what_is_not_its_file(
    start_server: ServerFactory, key_file: Path, tmp_path: Path, kind: str
) -> None:
    jive = start_server("jive")
    victim = tmp_path / "victim"
    victim.write_text(VICTIM)
    with background_mount(tmp_path, [jive], key_file) as m:
        m.root.parent.mkdir(parents=True)
        _planted(kind, m.log, victim)
        before = os.lstat(m.log)
        r = etfs("mount", "-c", str(m.config), "--log-file", str(m.log), timeout=30)
        assert r.returncode == 1, r
        said = lines(r.stderr)
        assert len(said) == 1 and str(m.log) in said[0] and "not replacing it" in said[0], r.stderr
        assert not mounted(m.root)
        after = os.lstat(m.log)
        assert (after.st_ino, after.st_mode, after.st_uid) == (before.st_ino, before.st_mode, before.st_uid)
    assert victim.read_text() == VICTIM


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_mount_registry_never_replaces_a_planted_file(
    start_server: ServerFactory, key_file: Path, tmp_path: Path, kind: str
) -> None:
    """daemon.json (written once the mount is up) planted as a symlink to a victim or a FIFO:
    the mount fails with one line, the victim is untouched and nothing stays mounted."""
    jive = start_server("jive")
    victim = tmp_path / "victim"
    victim.write_text(VICTIM)
    with background_mount(tmp_path, [jive], key_file) as m:
        m.root.parent.mkdir(parents=True)
        registry = m.root.parent / "daemon.json"
        _planted(kind, registry, victim)
        r = etfs("mount", "-c", str(m.config), timeout=60)
        assert r.returncode == 1, r
        said = lines(r.stderr)
        assert len(said) == 1 and f"{registry} exists and is not a regular file" in said[0], r.stderr
        wait_for(lambda: not mounted(m.root), 10, "the failed mount to be gone")
        assert os.path.islink(registry) if kind == "symlink" else stat.S_ISFIFO(os.lstat(registry).st_mode)
    assert victim.read_text() == VICTIM


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device", "foreign"])
def test_server_port_file_and_writes_by_name_refuse_planted_files(
    start_server: ServerFactory, tmp_path: Path, kind: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text(VICTIM)
    # The server's --port-file.
    jive = start_server("jive")
    jive.stop()
    planted = tmp_path / "ports"
    _planted(kind, planted, victim)
    r = subprocess.run(
        [PY, "-m", "etfs_server.main", "-c", str(jive.config), "--port-file", str(planted)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=30,
    )
    assert r.returncode == 2 and "not replacing it" in r.stderr and len(lines(r.stderr)) == 1, r
    # The helper every state, registry and record file goes through (etfs.common.safefile).
    writes: list[Callable[[], object]] = [
        lambda: write_atomic(planted, b"new\n"),
        lambda: open_append(planted).close(),
        lambda: create_new(planted).close(),
    ]
    for write in writes:
        with pytest.raises(OSError, match="not replacing it"):
            write()
    assert victim.read_text() == VICTIM
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_write_atomic_replaces_its_own_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, "one\n", 0o600)
    write_atomic(path, b"two\n", 0o600)
    assert path.read_text() == "two\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with open_append(path) as f:
        f.write(b"three\n")
    assert path.read_text() == "two\nthree\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
