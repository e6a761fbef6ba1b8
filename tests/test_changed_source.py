"""A source rewritten in place during a copy, its mtime put back (issue 14 item 1), never commits.

Real servers and a real mount per stream count; `cp` between the mountpoints and `etfs cp`
with 1, 4 and 8 streams.  The source server is throttled so that the copy is surely under
way; then 1 MiB at offset 0 (already sent) and 1 MiB near the end (not yet sent) are
overwritten and the mtime restored with `os.utime(ns=...)`, as timestamp-preserving
writers do.  The copy must fail (ESTALE at the destination) and leave no complete file
that differs from every version of the source.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.mount import Env, make_env
from harness.process import PY, child_env, throttled, wait_for
from test_cp_mounts import digest, random_file, transfers_to

SIZE = 96 * 2**20
MIB = 2**20


@pytest.fixture(scope="module", params=[1, 4, 8], ids=lambda n: f"{n}-streams")
def streams_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, key_file: Path
) -> Iterator[tuple[Env, int]]:
    n: int = request.param
    extra = f"transfer:\n  streams: {n}\n  block_size_mib: 1"
    with make_env(tmp_path_factory.mktemp("env"), key_file, extra) as e:
        yield e, n


def rewrite_keeping_mtime(path: Path) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        for offset in (0, st.st_size - 3 * MIB):
            f.seek(offset)
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size


@pytest.mark.parametrize("tool", ["cp", "etfs-cp"])
def test_rewritten_source_never_commits(streams_env: tuple[Env, int], tool: str) -> None:
    e, n = streams_env
    name = f"changing-{tool}"
    src = e.export("jive") / "tmp" / name
    random_file(src, SIZE, seed=n)
    old = digest(src)
    dst = e.export("onsala") / "tmp" / name
    cmd = ["cp", str(e.dir("jive") / "tmp" / name), str(e.dir("onsala") / "tmp") + "/"]
    if tool == "etfs-cp":
        cmd = [PY, "-m", "etfs.cli", "cp", "--streams", str(n), "--mount", str(e.mount.root), *cmd[1:]]
    jive = e.servers["jive"].proc
    assert jive is not None
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        part = dst.parent / f".{name}.etfs-part"

        def received() -> int:
            try:
                return part.stat().st_blocks * 512  # bytes of blocks received so far
            except FileNotFoundError:
                return 0

        with throttled(jive, run=0.002, pause=0.048):  # the copy cannot end before the rewrite
            wait_for(lambda: received() >= SIZE // 5, 60, "a fifth of the copy")
            # Otherwise the test proves nothing: the copy must still have blocks to fetch.
            assert received() < SIZE * 0.9, "the copy was nearly done before the rewrite"
            rewrite_keeping_mtime(src)
        new = digest(src)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Never a complete file that is neither version; and here, where the rewrite surely came
    # before the last block, no file at all and a failed copy.
    if dst.exists() and dst.stat().st_size == SIZE:
        assert digest(dst) in (old, new), "a complete file that matches no version of the source"
    assert proc.returncode != 0, f"{tool} succeeded although its source changed under it"
    # (cp itself creates the destination before its copy_file_range: that empty file may stay)
    assert not dst.exists() or dst.stat().st_size < SIZE, "a file was committed from a changed source"
    [t] = transfers_to(e, f"onsala:/tmp/{name}")[-1:]
    assert t["state"] == "failed", t
    log = e.servers["onsala"].log_path.read_text()
    assert "changed during the transfer" in log, err
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{name}.etfs-part")], "part file kept"
    src.unlink()
