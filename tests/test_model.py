"""The random-operation model test (tests/fsmodel.py) against a real mount of two servers.

Each seed runs a few hundred operations on files of both servers (copy_file_range also goes
between them) and compares every step with a reference directory on local disk.  The long
version is bench/model_run.py.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import Env
from fsmodel import Model

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3"),
]

SEEDS = range(8)
STEPS = 400


@pytest.mark.parametrize("seed", SEEDS)
def test_model(etfs_env: Env, tmp_path: Path, seed: int) -> None:
    dirs = [etfs_env.dir("jive") / "tmp" / f"model{seed}", etfs_env.dir("onsala") / "tmp" / f"model{seed}"]
    model = Model(seed, dirs, tmp_path / "ref")
    try:
        for _ in range(STEPS):
            model.step()
    finally:
        model.close_all()
