"""The random-operation model test (tests/fsmodel.py) against a real mount of two servers.

Each seed runs a few hundred operations on files of both servers (copy_file_range also goes
between them) and compares every step with a reference directory on local disk; what it
closes is also read back through a second mount of the same servers (close-to-open).  The long
version is bench/model_run.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fsmodel import Model
from harness.mount import Env, Mount, write_client_config

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
]

SEEDS = range(8)
STEPS = 400


@pytest.fixture(scope="module")
def second_mount(etfs_env: Env, tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[Mount]:
    """A second client of the same two servers (close-to-open reference)."""
    base = tmp_path_factory.mktemp("second")
    servers = list(etfs_env.servers.values())
    root = base / "mnt" / ".etfs"
    cfg = write_client_config(base / "mountpoints.yaml", servers, key_file, root)
    m = Mount(cfg, root, {}, base / "mount.log")
    try:
        m.start()
        yield m
    finally:
        m.stop()


@pytest.mark.parametrize("seed", SEEDS)
def test_model(etfs_env: Env, second_mount: Mount, tmp_path: Path, seed: int) -> None:
    names = [f"{s}/tmp/model{seed}" for s in ("jive", "onsala")]
    dirs = [etfs_env.dir(n.split("/")[0]) / n.split("/", 1)[1] for n in names]
    second = [second_mount.dir(n.split("/")[0]) / n.split("/", 1)[1] for n in names]
    model = Model(seed, dirs, tmp_path / "ref", second=second)
    try:
        for _ in range(STEPS):
            model.step()
    finally:
        model.close_all()
