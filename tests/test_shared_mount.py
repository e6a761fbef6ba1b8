"""A root mount shared by several local users keeps them apart (issue 9 item 7, first part).

The daemon runs as root with ``allow_other``; ``default_permissions`` makes the kernel check
each caller against the mode bits and owners the servers report, so another local user
(``setpriv`` to nobody) gets EACCES where ext4 would say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from harness.mount import Env, walkable

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)


@pytest.fixture
def traversable(etfs_env: Env) -> Iterator[None]:
    """pytest's temporary directories are 0700: let nobody walk (not list) down to the mount."""
    with walkable(etfs_env.dir("jive").parent):
        yield


def as_nobody(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, "sh", "-c", script], capture_output=True, text=True, timeout=60)


def test_other_local_user_gets_eacces_where_ext4_would(etfs_env: Env, traversable: None) -> None:
    d = etfs_env.dir("jive") / "tmp" / "shared-mount"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    private = d / "alice-only.txt"
    private.write_text("PRIVATE\n")
    os.chmod(private, 0o600)
    public = d / "readable.txt"
    public.write_text("PUBLIC\n")
    os.chmod(public, 0o644)

    r = as_nobody(f"cat {private}")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_nobody(f"echo more >> {private}")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_nobody(f"echo more >> {public}")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_nobody(f"rm -f {public}")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_nobody(f"touch {d}/new")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    # what the mode bits allow still works
    r = as_nobody(f"cat {public}")
    assert r.returncode == 0 and r.stdout == "PUBLIC\n", r
    server_side = etfs_env.export("jive") / "tmp" / "shared-mount"
    assert (server_side / "alice-only.txt").read_text() == "PRIVATE\n"
    assert (server_side / "readable.txt").read_text() == "PUBLIC\n"
    assert not (server_side / "new").exists()
