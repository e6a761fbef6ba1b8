"""A shared root mount keeps its local users apart (issue 9 item 7, second part): `etfs login`.

Real servers (jive, onsala) know two etfs users: ``tester`` (the mount's identity, rights on
everything) and ``bob`` (rights only on ``/tmp/bob``).  A real root mount serves local users;
``nobody`` (``setpriv``) logs in as bob with its own credentials file, after which its
requests reach the servers as bob: the server's ACL decides, and its denials name bob.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness.mount import Mount, mount_servers, walkable
from harness.process import PY, child_env
from harness.server import ServerProcess

NOBODY_UID = 65534
OTHER_UID = 65533  # a second unprivileged local user (no passwd entry needed)


def as_uid(uid: int, caps: bool = False) -> list[str]:
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    if caps:
        # The test Python may live under root's home: let the `etfs` command traverse it.
        # (Never used for file access through the mount: it would pass the kernel's checks.)
        cmd += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    return cmd


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists("/dev/fuse"),
    reason="needs root, setpriv and /dev/fuse",
)

TESTER_KEY = "etfs-test-key-NOT-A-SECRET-0123456789abcdef\n"
BOB_KEY = "bob-test-key-NOT-A-SECRET-fedcba9876543210\n"


@dataclass
class Site:
    servers: dict[str, ServerProcess]
    mount: Mount
    home: Path  # nobody's home: .config/etfs/login.yaml, bob.key

    def dir(self, server: str) -> Path:
        return self.mount.dir(server)

    def export(self, server: str) -> Path:
        return self.servers[server].export

    def sh(self, script: str, uid: int = NOBODY_UID) -> subprocess.CompletedProcess[str]:
        """A shell command as a local user (plain credentials: the kernel checks it)."""
        return subprocess.run(
            [*as_uid(uid), "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home)},
        )

    def etfs(self, *args: str, uid: int | None = NOBODY_UID) -> subprocess.CompletedProcess[str]:
        """The `etfs` command as a local user (None: as root), for this mount."""
        e = child_env()
        e.pop("XDG_RUNTIME_DIR", None)
        if uid is not None:
            e["HOME"] = str(self.home)
        pre = as_uid(uid, caps=True) if uid is not None else []
        return subprocess.run(
            [*pre, PY, "-m", "etfs.cli", *args],
            capture_output=True,
            text=True,
            timeout=90,
            cwd="/",
            env=e,
        )

    def login(self, *extra: str, uid: int = NOBODY_UID) -> subprocess.CompletedProcess[str]:
        return self.etfs("login", "--mount", str(self.mount.root), *extra, uid=uid)

    def status(self, uid: int | None) -> list[dict[str, object]]:
        r = self.etfs("status", "--json", "--mount", str(self.mount.root), uid=uid)
        assert r.returncode == 0, r
        rows = json.loads(r.stdout)["transfers"]
        assert isinstance(rows, list)
        return rows


def _server_yaml(name: str, export: Path, keys: Path, state: Path) -> str:
    return (
        f"name: {name}\nlisten: 127.0.0.1:0\ndata_listen: 127.0.0.1:0\nstate_dir: {state}\nrun_as: root\n"
        f"users:\n  tester:\n    key_file: {keys / 'tester.key'}\n"
        f"  bob:\n    key_file: {keys / 'bob.key'}\n"
        f"exports:\n  {name}:\n    path: {export}\n    acl:\n"
        "      - {who: tester, path: /, rights: [all]}\n"
        "      - {who: bob, path: /tmp/bob, rights: [all]}\n"
    )


def _own(path: Path, mode: int, uid: int = NOBODY_UID) -> None:
    os.chown(path, uid, uid)
    os.chmod(path, mode)


@contextmanager
def make_site(tmp_path_factory: pytest.TempPathFactory, others: str | None = None) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("login")
    keys = base / "server-keys"
    keys.mkdir(mode=0o700)
    (keys / "tester.key").write_text(TESTER_KEY)
    (keys / "bob.key").write_text(BOB_KEY)
    for k in keys.iterdir():
        k.chmod(0o600)  # the server refuses keys others may read
    # nobody's own credentials: a mountpoints-style file and a key, both private to nobody
    home = base / "home-nobody"
    (home / ".config" / "etfs").mkdir(parents=True)
    (home / "bob.key").write_text(BOB_KEY)
    login_yaml = home / ".config" / "etfs" / "login.yaml"
    login_yaml.write_text(
        "servers:\n"
        "  jive: {user: bob, key_file: ~/bob.key}\n"
        "  onsala:\n    user: bob\n    key_file: ~/bob.key\n    address: ignored:7070\n"
    )
    for p in (home, home / ".config", home / ".config" / "etfs"):
        _own(p, 0o700)
    _own(home / "bob.key", 0o600)
    _own(login_yaml, 0o600)
    servers: dict[str, ServerProcess] = {}
    mount: Mount | None = None
    with walkable(base):
        try:
            for name in ("jive", "onsala"):
                sbase = base / f"srv-{name}"
                export = sbase / "export"
                for d in ("tmp/bob", "tmp/shared"):
                    (export / d).mkdir(parents=True)
                    os.chmod(export / d, 0o777)  # the kernel lets nobody in; the server's ACL decides
                (export / "tmp" / "open.txt").write_text("FOR THE MOUNT'S IDENTITY\n")
                os.chmod(export / "tmp" / "open.txt", 0o644)
                cfg = sbase / "server.yaml"
                cfg.write_text(_server_yaml(name, export, keys, sbase / "state"))
                s = ServerProcess(cfg, sbase, name=name, export=export)
                servers[name] = s
                s.start()
            # Mount.start waits until every server's bind mount is up.
            mount = mount_servers(
                base / "mount",
                list(servers.values()),
                keys / "tester.key",
                client_extra=f"others: {others}" if others else "",
            )
            yield Site(servers, mount, home)
        finally:
            try:
                if mount is not None:
                    mount.stop()
            finally:
                for s in servers.values():
                    s.stop()


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Default policy (``others`` not set: mount-identity)."""
    with make_site(tmp_path_factory) as s:
        yield s


@pytest.fixture
def refusing_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with make_site(tmp_path_factory, "refuse") as s:
        yield s


def denied(r: subprocess.CompletedProcess[str]) -> bool:
    return r.returncode != 0 and "Permission denied" in r.stderr


def test_login_acts_as_bob_and_logout_ends_it(site: Site) -> None:
    jive = site.dir("jive")
    server_log = site.servers["jive"].log_path
    # Without a login nobody acts as the mount's identity (others: mount-identity, the default).
    r = site.sh(f"cat {jive}/tmp/open.txt")
    assert r.returncode == 0 and r.stdout == "FOR THE MOUNT'S IDENTITY\n", r

    r = site.login()  # the default credentials file, ~/.config/etfs/login.yaml
    assert r.returncode == 0, r
    assert "jive: logged in as bob" in r.stdout and "onsala: logged in as bob" in r.stdout, r

    # As bob: writes land where bob may write...
    r = site.sh(f"echo from-bob > {jive}/tmp/bob/f && cat {jive}/tmp/bob/f")
    assert r.returncode == 0 and r.stdout == "from-bob\n", r
    assert (site.export("jive") / "tmp" / "bob" / "f").read_text() == "from-bob\n"
    # ...and nowhere else, although the mode bits let the kernel pass: the server says no, to bob.
    r = site.sh(f"echo from-bob > {jive}/tmp/shared/g")
    assert denied(r), r
    assert not (site.export("jive") / "tmp" / "shared" / "g").exists()
    assert "denied: user=bob path=/tmp/shared" in server_log.read_text()
    # What only the mount's identity may read is out of reach now (data and listings).
    r = site.sh(f"cat {jive}/tmp/open.txt")
    assert denied(r), r
    r = site.sh(f"ls {jive}/tmp/shared")
    assert denied(r), r
    assert "denied: user=tester" not in server_log.read_text()
    # Root keeps the mount's identity.
    assert (jive / "tmp" / "open.txt").read_text() == "FOR THE MOUNT'S IDENTITY\n"
    # `cp` between servers with bob's handles is a transfer as bob (in nobody's status), never
    # one of the mount's identity.
    onsala = site.dir("onsala")
    r = site.sh(f"cp {jive}/tmp/bob/f {onsala}/tmp/bob/f2")
    assert r.returncode == 0, r
    assert (site.export("onsala") / "tmp" / "bob" / "f2").read_text() == "from-bob\n"
    rows = [t for t in site.status(None) if t["destination"] == "onsala:/tmp/bob/f2"]
    assert rows and {t["uid"] for t in rows} == {NOBODY_UID}, rows
    assert [t["state"] for t in site.status(NOBODY_UID)] == ["done"]

    # A file opened as bob stays bob's; `etfs logout` ends even that.
    holder = subprocess.Popen(
        [*as_uid(NOBODY_UID), "sh", "-c", f"exec 3< {jive}/tmp/bob/f; echo opened; read go; cat <&3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "opened\n"
        r = site.etfs("logout", "--mount", str(site.mount.root))
        assert r.returncode == 0 and "logged out" in r.stdout, r
        out, err = holder.communicate("go\n", timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode != 0 and "Permission denied" in err and "from-bob" not in out, (out, err)
    # Back to the mount's identity.
    r = site.sh(f"cat {jive}/tmp/open.txt")
    assert r.returncode == 0 and r.stdout == "FOR THE MOUNT'S IDENTITY\n", r
    r = site.etfs("logout", "--mount", str(site.mount.root))
    assert r.returncode == 0 and "was not logged in" in r.stdout, r
    # The key was kept in memory only: not in the daemon's log or registry files.
    secret = BOB_KEY.strip()
    logs = [site.mount.log, site.mount.log.with_suffix(".stderr")]
    written = [*logs, *Path("/run/etfs/mounts").glob("*.json")]
    for f in written:
        if f.exists():
            text = f.read_text()
            assert secret not in text and secret.encode().hex() not in text, f


def test_login_is_verified_and_private(site: Site) -> None:
    home = site.home
    # A wrong key: the server refuses it, the daemon keeps nothing.
    bad_key = home / "wrong.key"
    bad_key.write_text("not-bobs-key-NOT-A-SECRET-000000000000\n")
    _own(bad_key, 0o600)
    bad = home / "bad.yaml"
    bad.write_text(f"servers:\n  jive: {{user: bob, key_file: {bad_key}}}\n")
    _own(bad, 0o600)
    r = site.login("-c", str(bad))
    assert r.returncode == 1 and "jive" in r.stderr and "refused" in r.stderr, r
    r = site.sh(f"echo x > {site.dir('jive')}/tmp/shared/still-mount-identity")
    assert r.returncode == 0, r  # no login happened: still the mount's identity

    # A key file others can read is not a secret any more: refused before anything is sent.
    os.chmod(home / "bob.key", 0o644)
    r = site.login()
    assert r.returncode == 2 and "readable" in r.stderr, r
    os.chmod(home / "bob.key", 0o600)

    # Root and the mount's owner never take another identity.
    r = site.etfs(
        "login", "--mount", str(site.mount.root), "-c", str(home / ".config/etfs/login.yaml"), uid=None
    )
    assert r.returncode != 0, r


def test_others_refuse_without_login(refusing_site: Site) -> None:
    site = refusing_site
    jive = site.dir("jive")
    for script in (f"cat {jive}/tmp/open.txt", f"ls {jive}/tmp", f"echo x > {jive}/tmp/bob/x"):
        r = site.sh(script)
        assert denied(r), (script, r)
    assert (jive / "tmp" / "open.txt").read_text() == "FOR THE MOUNT'S IDENTITY\n"  # root: the mount's
    r = site.login()
    assert r.returncode == 0, r
    r = site.sh(f"echo x > {jive}/tmp/bob/x && ls {jive}/tmp/bob")
    assert r.returncode == 0 and "x" in r.stdout.split(), r
    r = site.sh(f"cat {jive}/tmp/open.txt")
    assert denied(r), r  # bob may not, and the mount's identity is not lent
    # Another uid is not logged in just because nobody is.
    r = site.sh(f"ls {jive}/tmp/bob", uid=OTHER_UID)
    assert denied(r), r
    r = site.etfs("logout", "--mount", str(site.mount.root))
    assert r.returncode == 0 and "logged out" in r.stdout, r
    r = site.sh(f"ls {jive}/tmp/bob")
    assert denied(r), r


def test_each_uid_sees_only_its_transfers(site: Site) -> None:
    (site.export("jive") / "tmp" / "bob" / "src").write_bytes(os.urandom(300_000))
    (site.export("jive") / "tmp" / "root-src").write_bytes(os.urandom(200_000))
    root = str(site.mount.root)
    # Without a login, `etfs cp` never runs as the mount's identity (no kernel checks a copy).
    r = site.etfs("cp", "--mount", root, "jive:/tmp/bob/src", "onsala:/tmp/bob/dst")
    assert r.returncode != 0 and not (site.export("onsala") / "tmp" / "bob" / "dst").exists(), r
    assert "etfs login" in r.stdout + r.stderr, r
    # ...and sees nothing.
    r = site.etfs("status", "--mount", root, "--server", "jive")
    assert r.returncode != 0 and "etfs login" in r.stderr, r

    assert site.login().returncode == 0
    r = site.etfs("cp", "--json", "--mount", root, "jive:/tmp/bob/src", "onsala:/tmp/bob/dst")
    assert r.returncode == 0, r
    assert (site.export("onsala") / "tmp" / "bob" / "dst").read_bytes() == (
        site.export("jive") / "tmp" / "bob" / "src"
    ).read_bytes()
    # bob's copy cannot reach what only the mount's identity may.
    r = site.etfs("cp", "--mount", root, "jive:/tmp/root-src", "onsala:/tmp/bob/stolen")
    assert r.returncode != 0 and not (site.export("onsala") / "tmp" / "bob" / "stolen").exists(), r
    r = site.etfs("cp", "--mount", root, "jive:/tmp/root-src", "onsala:/tmp/root-dst", uid=None)
    assert r.returncode == 0, r

    mine = site.status(NOBODY_UID)
    assert mine and {t["uid"] for t in mine} == {NOBODY_UID}, mine
    assert all("root-dst" not in str(t["destination"]) for t in mine), mine
    assert any(str(t["destination"]) == "onsala:/tmp/bob/dst" for t in mine), mine
    assert site.status(OTHER_UID) == []
    everything = site.status(None)  # root sees every uid's
    assert {t["uid"] for t in everything} >= {0, NOBODY_UID}, everything
    assert any(str(t["destination"]) == "onsala:/tmp/root-dst" for t in everything)

    # The socket is open to every local user, but the registry stays root's.
    reg = Path("/run/etfs/mounts")
    st = reg.stat()
    assert st.st_uid == 0 and st.st_mode & 0o022 == 0
