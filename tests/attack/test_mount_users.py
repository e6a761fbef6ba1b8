"""Issue 9 item 7: a shared (root) mount keeps its local users apart.

A root ``etfs mount`` serves every local user (``allow_other``).  A file of local user 1000,
mode 0600, on the server: local user ``nobody`` (65534, via ``setpriv``) must get EACCES
reading or appending to it through the mount, as on a local filesystem.  Uses the suite's
``start_server`` / ``start_mount`` fixtures (``tests/conftest.py``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.attack,
    pytest.mark.skipif(
        os.geteuid() != 0
        or not os.path.exists("/dev/fuse")
        or not all(shutil.which(t) for t in ("fusermount3", "setpriv")),
        reason="needs root, /dev/fuse, fusermount3 and setpriv",
    ),
]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
OWNER_UID = 1000  # "alice" on the client host
SECRET = "ALICE-LOCAL-0600\n"


class SetupFailed(RuntimeError):
    """The mount does not work for nobody at all: not the attack's result (never an xfail)."""


def as_nobody(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, "sh", "-c", script], capture_output=True, text=True, timeout=30, cwd="/")


@pytest.fixture
def shared_mount(start_server: Any, start_mount: Any) -> Iterator[tuple[Path, Path]]:
    """(the server's export, the mount's view of it) for one server ``m7`` mounted as root."""
    srv = start_server("m7")
    tmp = srv.export / "tmp"
    os.chmod(tmp, 0o1777)
    (tmp / "public.txt").write_text("PUBLIC\n")
    os.chmod(tmp / "public.txt", 0o644)
    (tmp / "alice-0600.txt").write_text(SECRET)
    os.chown(tmp / "alice-0600.txt", OWNER_UID, OWNER_UID)
    os.chmod(tmp / "alice-0600.txt", 0o600)
    base = Path(tempfile.mkdtemp(prefix="etfs-attack-mnt-", dir="/tmp"))
    os.chmod(base, 0o755)
    mount = None
    try:
        mount = start_mount([srv], base=base)
        yield srv.export, mount.dir("m7")
    finally:
        if mount is not None:
            mount.stop()  # unmounted before the directory goes (start_mount's teardown is later)
        shutil.rmtree(base, ignore_errors=True)


def test_other_local_user_cannot_read_or_append_0600_file(shared_mount: tuple[Path, Path]) -> None:
    export, mp = shared_mount
    pub = as_nobody(f"cat {mp}/tmp/public.txt")
    if pub.returncode != 0 or "PUBLIC" not in pub.stdout:
        raise SetupFailed(f"nobody cannot even read a 0644 file through the mount: {pub.stderr}")
    read = as_nobody(f"cat {mp}/tmp/alice-0600.txt")
    append = as_nobody(f"echo NOBODY-WAS-HERE >> {mp}/tmp/alice-0600.txt")
    on_disk = (export / "tmp" / "alice-0600.txt").read_text()
    assert SECRET not in read.stdout, (
        f"nobody read uid {OWNER_UID}'s 0600 file through the mount (append: {append})"
    )
    assert read.returncode != 0 and "Permission denied" in read.stderr, read.stderr
    assert on_disk == SECRET, f"nobody appended to uid {OWNER_UID}'s 0600 file: {on_disk!r}"
    assert append.returncode != 0 and "Permission denied" in append.stderr, append.stderr
