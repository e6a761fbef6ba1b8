"""Reference filesystems the mount benchmarks compare etfs with, started on this machine.

* `passthrough_ll`: libfuse's own low-level C example, built from the Debian source package of
  the fuse3 version installed here (fetched with ``apt-get source`` into a private apt state,
  so the system's apt configuration is not touched), with its default options (multi-threaded,
  ``cache=auto``, 1 s timeouts, no writeback cache).  It is what a FUSE filesystem with no
  network and no Python costs on this kernel: the ceiling for a FUSE mount.
* sshfs: over an OpenSSH sshd on a free loopback port with a temporary host key and
  authorized key (Debian packages ``sshfs`` and ``openssh-server``).

Both mount the same export directory etfs serves.  Nothing is installed by this module: a
missing tool or package source is a note in the benchmark's output, and the row is left out.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

from harness.mount import force_unmount, mounted
from harness.process import stop_pid, wait_for

log = logging.getLogger(__name__)

# Built once per fuse3 version and kept: the source download and compile take ~5 s.
CACHE = Path(os.environ.get("ETFS_BENCH_CACHE", "/var/tmp/etfs-bench-cache"))


class Unavailable(Exception):
    """A reference cannot run here; the message says why (it goes into the benchmark's notes)."""


def _run(*cmd: str | Path, cwd: Path | None = None) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise Unavailable(f"{Path(str(cmd[0])).name} failed: {' / '.join(tail)}")
    return r.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_passthrough_ll() -> Path:
    """Path of a passthrough_ll binary built from the installed fuse3's Debian source."""
    version = _run("dpkg-query", "-W", "-f", "${Version}", "libfuse3-dev").strip()
    if not version:
        raise Unavailable("libfuse3-dev is not installed")
    out = CACHE / f"passthrough_ll-{version}"
    if out.exists():
        return out
    work = CACHE / f"fuse3-src-{version}"
    shutil.rmtree(work, ignore_errors=True)
    lists = work / "apt-lists"
    (lists / "partial").mkdir(parents=True)
    sources = work / "sources.list"
    suite = _run("sh", "-c", ". /etc/os-release && echo $VERSION_CODENAME").strip() or "bookworm"
    sources.write_text(f"deb-src http://deb.debian.org/debian {suite} main\n")
    apt = [
        "apt-get",
        "-q",
        "-o",
        f"Dir::Etc::SourceList={sources}",
        "-o",
        "Dir::Etc::SourceParts=/dev/null",
        "-o",
        f"Dir::State::Lists={lists}",
    ]
    _run(*apt, "update")
    _run(*apt, "source", "--download-only", f"fuse3={version}", cwd=work)
    tarballs = sorted(work.glob("fuse3_*.orig.tar.*"))
    if not tarballs:
        raise Unavailable(f"apt-get source fuse3={version} gave no .orig tarball")
    _run("tar", "xf", tarballs[0].name, cwd=work)
    sources_c = sorted(work.glob("fuse-*/example/passthrough_ll.c"))
    if not sources_c:
        raise Unavailable("no example/passthrough_ll.c in the fuse3 source")
    flags = _run("pkg-config", "--cflags", "--libs", "fuse3").split()
    _run("gcc", "-O2", "-o", f"{out}.tmp", sources_c[0], *flags)
    os.replace(f"{out}.tmp", out)
    shutil.rmtree(work, ignore_errors=True)
    return out


class References:
    """Started reference mounts of one export; `stop` unmounts them and stops their processes by pid."""

    def __init__(self, workdir: Path, export: Path) -> None:
        self.dir = workdir
        self.export = export
        self.procs: list[subprocess.Popen[bytes]] = []
        self.mounts: list[Path] = []
        self.notes: list[str] = []

    def passthrough_ll(self) -> Path | None:
        try:
            binary = build_passthrough_ll()
        except (Unavailable, OSError) as exc:
            self.notes.append(f"passthrough_ll reference skipped: {exc}")
            return None
        mp = self.dir / "passthrough_ll"
        mp.mkdir()
        # -f: stay in the foreground, so the pid we hold is the daemon's.
        proc = subprocess.Popen(
            [str(binary), "-f", "-o", f"source={self.export}", str(mp)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "passthrough_ll.log", "wb"),
        )
        self.procs.append(proc)
        self.mounts.append(mp)
        try:
            wait_for(lambda: mounted(mp) or proc.poll() is not None, 10, "passthrough_ll")
        except TimeoutError as exc:
            self.notes.append(f"passthrough_ll reference skipped: {exc}")
            return None
        if proc.poll() is not None:
            self.notes.append("passthrough_ll reference skipped: it exited (see passthrough_ll.log)")
            return None
        return mp

    def sshfs(self) -> Path | None:
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not (os.path.exists(sshd) and shutil.which("sshfs") and shutil.which("ssh-keygen")):
            self.notes.append(
                "sshfs reference skipped: sshd, sshfs or ssh-keygen missing "
                "(apt-get install sshfs openssh-server)"
            )
            return None
        d = self.dir / "ssh"
        d.mkdir(mode=0o700)
        try:
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host_key")
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "user_key")
        except Unavailable as exc:
            self.notes.append(f"sshfs reference skipped: {exc}")
            return None
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        os.chmod(d / "authorized_keys", 0o600)
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        port = free_port()
        cfg = d / "sshd_config"
        cfg.write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile none\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nUsePAM no\nSubsystem sftp internal-sftp\n"
        )
        self.procs.append(
            subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)], stderr=open(d / "sshd.log", "wb"))
        )

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10, "sshd")
        mp = self.dir / "sshfs"
        mp.mkdir()
        user = os.environ.get("USER") or "root"
        r = subprocess.run(
            [
                "sshfs",
                f"{user}@127.0.0.1:{self.export}",
                str(mp),
                "-o",
                f"port={port},IdentityFile={d / 'user_key'},StrictHostKeyChecking=no,"
                "UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR",
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            self.notes.append(f"sshfs reference skipped: sshfs failed: {r.stderr.strip()}")
            return None
        self.mounts.append(mp)
        return mp

    def stop(self) -> None:
        for mp in reversed(self.mounts):
            force_unmount(mp)
        for p in reversed(self.procs):
            stop_pid(p, 15)
