"""Issue 14 item 5: the mount registries after kill -9 of the daemon (a zombie counts as dead)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness.mount import Mount, MountFactory
from harness.process import PY, child_env, wait_for
from harness.server import ServerFactory

from etfs.daemon import control
from etfs.daemon.procs import pid_alive


def etfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "etfs.cli", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )


def kill_leave_zombie(m: Mount) -> int:
    """SIGKILL our own mount daemon by pid and do not reap it: it stays a zombie (state Z)."""
    assert m.proc is not None
    pid = m.proc.pid
    os.kill(pid, signal.SIGKILL)

    def zombie() -> bool:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"

    wait_for(zombie, 10, "the killed daemon to become a zombie")
    return pid


def mounted_and_registered(start_mount: MountFactory, *args: object, **kw: object) -> Mount:
    """A mount, once its daemon has written its control registry entry (PID.json, PID.sock)."""
    m = start_mount(*args, **kw)
    assert m.proc is not None
    pid = m.proc.pid
    wait_for(lambda: len(registered(pid)) == 2, 10, "the daemon's control registry")
    return m


def registered(pid: int) -> list[str]:
    reg = control.registry_dir()
    return sorted(p.name for p in (reg / f"{pid}.json", reg / f"{pid}.sock") if os.path.lexists(p))


def test_pid_alive_says_a_zombie_is_dead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(child.pid), 10, "the child to die")
        assert Path(f"/proc/{child.pid}").exists()  # still a zombie: not reaped yet
        # The control registry uses the same answer: a zombie's record is not a running mount.
        reg = tmp_path / "mounts"
        reg.mkdir(mode=0o700)
        rec = {"socket": str(reg / f"{child.pid}.sock"), "root": "/x", "servers": {}}
        (reg / f"{child.pid}.json").write_text(json.dumps({"pid": child.pid, **rec}))
        (reg / f"{child.pid}.sock").write_text("")
        (reg / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), **rec}))
        monkeypatch.setattr(control, "registry_dir", lambda: reg)
        assert [m["pid"] for m in control.running_mounts()] == [os.getpid()]
        assert {p.name for p in control.forget_dead_daemons()} == {f"{child.pid}.json", f"{child.pid}.sock"}
        assert sorted(p.name for p in reg.iterdir()) == [f"{os.getpid()}.json"]
    finally:
        child.kill()
        child.wait()


def test_umount_after_kill9_removes_the_control_registry(
    start_server: ServerFactory, start_mount: MountFactory
) -> None:
    jive = start_server("jive")
    m = mounted_and_registered(start_mount, [jive])
    pid = kill_leave_zombie(m)
    assert registered(pid) == [f"{pid}.json", f"{pid}.sock"]  # what a crash leaves behind
    r = etfs("umount", "-c", str(m.config))
    assert r.returncode == 0, r.stderr
    assert registered(pid) == []
    assert not (m.root.parent / "daemon.json").exists()


def test_status_with_mount_after_a_zombie_at_the_same_root(
    start_server: ServerFactory, start_mount: MountFactory
) -> None:
    jive = start_server("jive")
    first = mounted_and_registered(start_mount, [jive])
    dead = kill_leave_zombie(first)
    # A second mount at the same root while the first daemon is still an unreaped zombie.
    (first.root.parent / "daemon.json").unlink()
    second = mounted_and_registered(start_mount, [jive], base=first.root.parent.parent)
    started = time.monotonic()
    r = etfs("status", "--json", "--mount", str(second.root))
    assert r.returncode == 0, r.stderr
    assert "several" not in r.stderr
    assert json.loads(r.stdout)["transfers"] == []
    assert time.monotonic() - started < 30
    assert registered(dead) == []  # the new daemon forgot the zombie's records when it started
