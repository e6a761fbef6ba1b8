"""`etfs cp` and `etfs status` against a real mount and real servers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from harness.mount import Env
from harness.process import PY, child_env, wait_for
from test_cp_mounts import daemon_io, digest, random_file, status


def etfs(e: Env, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "etfs.cli", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
        check=check,
    )


def test_cp_streams_server_to_server(etfs_env: Env) -> None:
    e = etfs_env
    src = e.export("jive") / "tmp" / "cpbig"
    random_file(src, 128 * 2**20 + 3, seed=11)
    before = daemon_io(e)
    r = etfs(
        e,
        "cp",
        "--streams",
        "4",
        "--mount",
        str(e.mount.root),
        str(e.dir("jive") / "tmp" / "cpbig"),
        str(e.dir("onsala") / "tmp") + "/",
    )
    assert r.returncode == 0, r.stderr
    assert digest(e.export("onsala") / "tmp" / "cpbig") == digest(src)
    assert daemon_io(e) - before < 4 * 2**20
    [t] = [t for t in status(e) if t["destination"] == "onsala:/tmp/cpbig"]
    assert t["streams"] == 4 and t["state"] == "done"
    assert t["bytes_done"] == t["bytes_total"] == src.stat().st_size
    assert t["bytes_via_client"] == 0
    for key in (
        "id",
        "source",
        "destination",
        "state",
        "bytes_total",
        "bytes_done",
        "streams",
        "bytes_via_client",
    ):
        assert key in t


def test_cp_modes_and_errors(etfs_env: Env) -> None:
    e = etfs_env
    src = e.export("jive") / "tmp" / "modes"
    random_file(src, 3 * 2**20, seed=12)
    dst = e.export("onsala") / "tmp" / "modes"
    dst.write_bytes(b"keep me")
    m = ["--mount", str(e.mount.root)]
    r = etfs(e, "cp", *m, "--mode", "new", "jive:/tmp/modes", "onsala:/tmp/modes")
    assert r.returncode != 0
    assert "exists" in r.stderr and "Traceback" not in r.stderr
    assert dst.read_bytes() == b"keep me"
    r = etfs(e, "cp", *m, "--mode", "overwrite", "--push", "jive:/tmp/modes", "onsala:/tmp/modes")
    assert r.returncode == 0, r.stderr
    assert digest(dst) == digest(src)
    assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns  # etfs cp keeps times, like cp -p
    r = etfs(e, "cp", *m, "--json", "--mode", "skip-existing", "jive:/tmp/modes", "onsala:/tmp/modes")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["transfer"]["state"] == "skipped"
    r = etfs(e, "cp", *m, str(e.dir("jive") / "tmp" / "no-such-file"), str(e.dir("onsala") / "tmp"))
    assert r.returncode != 0
    assert "No such file or directory" in r.stderr and "Traceback" not in r.stderr


def test_cp_recursive_and_local(etfs_env: Env, tmp_path: Path) -> None:
    e = etfs_env
    tree = e.export("jive") / "tmp" / "tree"
    for i in range(5):
        (tree / f"d{i}").mkdir(parents=True)
        random_file(tree / f"d{i}" / "f", 100_000 + i, seed=i)
    (tree / "empty").write_bytes(b"")
    (tree / ".empty.etfs-part").write_bytes(b"half a copy")  # a copy in progress: not copied
    m = ["--mount", str(e.mount.root)]
    r = etfs(e, "cp", *m, "-r", str(e.dir("jive") / "tmp" / "tree"), str(e.dir("onsala") / "tmp"))
    assert r.returncode == 0, r.stderr
    for i in range(5):
        assert digest(e.export("onsala") / "tmp" / "tree" / f"d{i}" / "f") == digest(tree / f"d{i}" / "f")
    assert (e.export("onsala") / "tmp" / "tree" / "empty").read_bytes() == b""
    assert not (e.export("onsala") / "tmp" / "tree" / ".empty.etfs-part").exists()
    r = etfs(e, "cp", *m, "-r", str(e.dir("jive") / "tmp" / "tree" / "d0"), str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert digest(tmp_path / "d0" / "f") == digest(tree / "d0" / "f")
    local = tmp_path / "local.bin"
    random_file(local, 2 * 2**20 + 1, seed=99)
    r = etfs(e, "cp", *m, str(local), "onsala:/tmp/")
    assert r.returncode == 0, r.stderr
    assert digest(e.export("onsala") / "tmp" / "local.bin") == digest(local)
    r = etfs(e, "cp", *m, str(e.dir("jive") / "tmp" / "tree"), str(e.dir("onsala") / "tmp" / "x"))
    assert r.returncode != 0 and "-r not specified" in r.stderr
    # A tree onto an existing file: one clear line, no traceback.
    r = etfs(e, "cp", *m, "-r", str(e.dir("jive") / "tmp" / "tree"), str(tmp_path / "local.bin"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "cannot create directory" in r.stderr
    # Local -> server, mode new onto an existing file: refused, the file kept.
    r = etfs(e, "cp", *m, "--mode", "new", str(tmp_path / "d0" / "f"), "onsala:/tmp/local.bin")
    assert r.returncode != 0 and "exists" in r.stderr, r.stderr
    assert digest(e.export("onsala") / "tmp" / "local.bin") == digest(local)


def test_status_human_and_no_mount(etfs_env: Env) -> None:
    e = etfs_env
    r = etfs(e, "status", "--mount", str(e.mount.root))
    assert r.returncode == 0 and ("no transfers" in r.stdout or "->" in r.stdout)
    r = etfs(e, "status", "--mount", "/nonexistent/etfs-root")
    assert r.returncode != 0 and "no running etfs mount" in r.stderr
    assert os.path.isdir(e.dir("jive"))


def test_server_records_survive_restart(etfs_env: Env) -> None:
    e = etfs_env
    src = e.export("jive") / "tmp" / "recorded"
    random_file(src, 5 * 2**20, seed=21)
    m = ["--mount", str(e.mount.root)]
    assert etfs(e, "cp", *m, "jive:/tmp/recorded", "onsala:/tmp/recorded").returncode == 0

    def records() -> list[dict[str, object]]:
        r = etfs(e, "status", *m, "--server", "onsala", "--json")
        assert r.returncode == 0, r.stderr
        return [t for t in json.loads(r.stdout)["transfers"] if t["destination"] == "onsala:/tmp/recorded"]

    [before] = records()
    assert before["state"] == "done" and before["digest"]
    onsala = e.servers["onsala"]
    onsala.kill()
    onsala.restart()

    def back() -> bool:
        try:
            return bool(records())
        except AssertionError:
            return False

    wait_for(back, 20, "onsala to come back")
    [after] = records()
    assert after == before


def test_progress_bar_on_a_tty(etfs_env: Env) -> None:
    """On a terminal `etfs cp` draws a progress bar (rich); `script` gives it a pty."""
    e = etfs_env
    random_file(e.export("jive") / "tmp" / "tty.bin", 64 * 2**20, seed=31)
    cmd = f"{PY} -m etfs.cli cp --mount {e.mount.root} jive:/tmp/tty.bin onsala:/tmp/tty.bin"
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, env=child_env(), timeout=120
    )
    assert r.returncode == 0, r.stdout
    assert "tty.bin" in r.stdout and "━" in r.stdout and "MiB" in r.stdout, r.stdout
    assert digest(e.export("onsala") / "tmp" / "tty.bin") == digest(e.export("jive") / "tmp" / "tty.bin")
