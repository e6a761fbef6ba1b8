"""`etfs cp` / `etfs status` for daily use, and the Python API they are built on (issue 12, items
3, 4 and 7).

Two real mounts (each with its own two servers) run at once: the commands must pick the
mount from the paths or the working directory, and list the mounts when nothing says which.
`etfs cp -r` of a tree with symlinks, a 0640 file and old times is compared with `cp -a`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.mount import Env, make_env
from harness.process import PY, child_env, throttled, wait_for
from test_cp_mounts import digest, random_file

from etfs import api

ESC = "\x1b"
OLD = 1_500_000_000_123_456_789  # 2017, with nanoseconds


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[tuple[Env, Env]]:
    """Two mounts on this machine, each with servers named jive and onsala."""
    with (
        make_env(tmp_path_factory.mktemp("env"), key_file) as a,
        make_env(tmp_path_factory.mktemp("env"), key_file) as b,
    ):
        yield a, b


def etfs(*args: str, cwd: Path | str = "/", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "etfs.cli", *args],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=cwd,
        timeout=timeout,
    )


def etfs_popen(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PY, "-m", "etfs.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=cwd,
    )


def status_json(e: Env) -> dict[str, object]:
    r = etfs("status", "--json", cwd=e.dir("jive"))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_cp_and_status_find_their_mount(two: tuple[Env, Env]) -> None:
    for n, e in enumerate(two):
        name = f"which-{n}"
        random_file(e.export("jive") / "tmp" / name, 3 * 2**20 + n, seed=40 + n)
        # Paths say which mount (no --mount, two mounts running)
        r = etfs("cp", str(e.dir("jive") / "tmp" / name), str(e.dir("onsala") / "tmp") + "/")
        assert r.returncode == 0, r.stderr
        assert digest(e.export("onsala") / "tmp" / name) == digest(e.export("jive") / "tmp" / name)
        # SERVER:PATH names are the same on both mounts: the working directory says which
        r = etfs("cp", f"jive:/tmp/{name}", f"onsala:/tmp/{name}.2", cwd=e.dir("onsala") / "tmp")
        assert r.returncode == 0, r.stderr
        assert digest(e.export("onsala") / "tmp" / f"{name}.2") == digest(e.export("jive") / "tmp" / name)
        # ...and relative paths from there too
        r = etfs("cp", f"{name}.2", f"{name}.3", cwd=e.dir("onsala") / "tmp")
        assert r.returncode == 0, r.stderr
        assert (e.export("onsala") / "tmp" / f"{name}.3").stat().st_size == 3 * 2**20 + n
    for n, e in enumerate(two):
        # status from inside each mount shows that mount's transfers only
        r = etfs("status", "--json", cwd=e.dir("jive") / "tmp")
        assert r.returncode == 0, r.stderr
        dests = {t["destination"] for t in json.loads(r.stdout)["transfers"]}
        assert f"onsala:/tmp/which-{n}" in dests and f"onsala:/tmp/which-{1 - n}" not in dests, dests


def test_ambiguous_lists_the_mounts(two: tuple[Env, Env]) -> None:
    a, b = two
    (a.export("jive") / "tmp" / "amb").write_bytes(b"x" * 1000)
    r = etfs("cp", "jive:/tmp/amb", "onsala:/tmp/amb", cwd="/")
    assert r.returncode == 3, r.stderr
    assert str(a.mount.root) in r.stderr and str(b.mount.root) in r.stderr and "--mount" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (a.export("onsala") / "tmp" / "amb").exists()
    r = etfs("status", cwd="/")
    assert r.returncode == 1 and str(a.mount.root) in r.stderr and str(b.mount.root) in r.stderr
    # --mount decides
    r = etfs("cp", "--mount", str(a.mount.root), "jive:/tmp/amb", "onsala:/tmp/amb", cwd="/")
    assert r.returncode == 0, r.stderr
    assert (a.export("onsala") / "tmp" / "amb").read_bytes() == b"x" * 1000
    # paths on two different mounts: one clear line
    r = etfs("cp", str(a.dir("jive") / "tmp" / "amb"), str(b.dir("onsala") / "tmp") + "/")
    assert r.returncode == 3 and "different etfs mounts" in r.stderr, r.stderr
    assert not (b.export("onsala") / "tmp" / "amb").exists()


def _tree(base: Path) -> None:
    """A tree with what `cp -r` used to break: symlinks (to a file, to a directory, leading
    outside the export, dangling), a 0640 file, a 0750 directory, old times everywhere."""
    (base / "sub" / "deep").mkdir(parents=True)
    random_file(base / "secret", 300_000, seed=5)
    os.chmod(base / "secret", 0o640)
    random_file(base / "sub" / "deep" / "data", 2 * 2**20 + 7, seed=6)
    os.chmod(base / "sub" / "deep" / "data", 0o600)
    (base / "script").write_text("#!/bin/sh\necho hi\n")
    os.chmod(base / "script", 0o755)
    os.symlink("secret", base / "link-to-file")
    os.symlink("sub", base / "link-to-dir")
    os.symlink("/etc/passwd", base / "outside")
    os.symlink("no-such-target", base / "dangling")
    os.chmod(base / "sub", 0o750)
    for p in sorted(base.rglob("*"), key=lambda p: -len(p.parts)):
        if not p.is_symlink():
            os.utime(p, ns=(OLD, OLD + len(p.name)))
    os.utime(base, ns=(OLD, OLD))


def _listing(base: Path, link_times: bool = True) -> dict[str, tuple[object, ...]]:
    """What `cp -a` keeps: type, mode, mtime and content or link target, per relative path."""
    out: dict[str, tuple[object, ...]] = {}
    for p in [base, *sorted(base.rglob("*"))]:
        st = p.lstat()
        rel = str(p.relative_to(base))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p), st.st_mtime_ns if link_times else None)
        elif p.is_dir():
            out[rel] = ("dir", oct(st.st_mode & 0o7777), st.st_mtime_ns)
        else:
            out[rel] = ("file", oct(st.st_mode & 0o7777), st.st_mtime_ns, digest(p))
    return out


def test_cp_r_keeps_links_modes_and_times_like_cp_a(two: tuple[Env, Env], tmp_path: Path) -> None:
    e = two[0]
    src = e.export("jive") / "tmp" / "tree"
    _tree(src)
    reference = tmp_path / "reference"
    subprocess.run(["cp", "-a", str(src), str(reference)], check=True)
    expected = _listing(reference)
    assert expected == _listing(src)
    # server to server
    r = etfs("cp", "-r", str(e.dir("jive") / "tmp" / "tree"), str(e.dir("onsala") / "tmp") + "/")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    got = _listing(e.export("onsala") / "tmp" / "tree")
    assert got == expected
    # server to the local disk
    r = etfs("cp", "-r", str(e.dir("jive") / "tmp" / "tree"), str(tmp_path / "local"), cwd=e.dir("jive"))
    assert r.returncode == 0, r.stderr
    assert _listing(tmp_path / "local") == expected
    # -L follows links instead (without the ones that cannot be followed)
    for name in ("outside", "dangling"):
        (src / name).unlink()
    r = etfs("cp", "-r", "-L", str(e.dir("jive") / "tmp" / "tree"), str(e.dir("onsala") / "tmp" / "deref"))
    assert r.returncode == 0, r.stderr
    deref = e.export("onsala") / "tmp" / "deref"
    assert not (deref / "link-to-dir").is_symlink() and (deref / "link-to-dir" / "deep" / "data").is_file()
    assert digest(deref / "link-to-file") == digest(src / "secret")
    # --no-preserve=all: new files get the server's defaults, not the source's mode and times
    r = etfs(
        "cp", "--no-preserve", "all", str(e.dir("jive") / "tmp" / "tree" / "secret"), "onsala:/tmp/plain"
    )
    plain = (e.export("onsala") / "tmp" / "plain").stat()
    assert r.returncode == 0 and plain.st_mtime_ns != (src / "secret").stat().st_mtime_ns, r.stderr
    r = etfs("cp", "--no-preserve", "colour", "jive:/tmp/tree/secret", "onsala:/tmp/x", cwd=e.dir("jive"))
    assert r.returncode == 2 and "--no-preserve takes" in r.stderr


def test_summary_line_and_quiet(two: tuple[Env, Env], tmp_path: Path) -> None:
    e = two[0]
    random_file(e.export("jive") / "tmp" / "sum", 5 * 2**20, seed=50)
    r = etfs("cp", str(e.dir("jive") / "tmp" / "sum"), str(e.dir("onsala") / "tmp") + "/")
    assert r.returncode == 0, r.stderr
    [line] = r.stdout.splitlines()
    assert re.fullmatch(
        r"copied 1 of 1 files, 5\.0 MiB in [\d.]+ s \([\d.]+ [KMG]?i?B/s\): "
        r"1 server to server; 0 B via the client",
        line,
    ), line
    local = tmp_path / "up.bin"
    random_file(local, 2 * 2**20, seed=51)
    r = etfs("cp", str(local), str(e.dir("onsala") / "tmp") + "/")
    assert r.returncode == 0, r.stderr
    assert "1 local disk <-> server (through the client); 2.0 MiB via the client" in r.stdout, r.stdout
    r = etfs("cp", "-q", str(e.dir("jive") / "tmp" / "sum"), str(e.dir("onsala") / "tmp" / "sum.q"))
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r
    assert digest(e.export("onsala") / "tmp" / "sum.q") == digest(e.export("jive") / "tmp" / "sum")


def test_status_table_and_bytes_through_the_mount(two: tuple[Env, Env]) -> None:
    e = two[1]
    random_file(e.export("jive") / "tmp" / "st", 8 * 2**20, seed=60)
    r = etfs("cp", "-q", str(e.dir("jive") / "tmp" / "st"), str(e.dir("onsala") / "tmp") + "/")
    assert r.returncode == 0, r.stderr
    before = status_json(e)["mount_io"]
    assert isinstance(before, dict) and set(before) == {"jive", "onsala"}
    # Plain read/write through the mount (what rsync or gio copy do) goes through the client.
    data = (e.dir("jive") / "tmp" / "st").read_bytes()
    (e.dir("onsala") / "tmp" / "written").write_bytes(data[: 3 * 2**20])
    after = status_json(e)["mount_io"]
    assert isinstance(after, dict)
    assert after["jive"]["read"] - before["jive"]["read"] >= 8 * 2**20, (before, after)
    assert after["onsala"]["written"] - before["onsala"]["written"] == 3 * 2**20, (before, after)
    r = etfs("status", cwd=e.dir("onsala"))  # piped: no escape codes
    assert r.returncode == 0, r.stderr
    assert ESC not in r.stdout
    lines = r.stdout.splitlines()
    header = lines[0].split()
    for col in ("ID", "STATE", "DONE", "SIZE", "RATE", "ELAPSED", "ETA", "KIND", "VIA-CLIENT", "TRANSFER"):
        assert col in header, lines[0]
    rows = [line for line in lines if line.rstrip().endswith("jive:/tmp/st -> onsala:/tmp/st")]
    assert len(rows) == 1, r.stdout
    row = rows[0]
    assert re.search(
        r"done\s+8\.0 MiB\s+8\.0 MiB\s+100\.0\s+[\d.]+ [KMG]?i?B/s\s+\d+:\d\d\s+-\s+third-party", row
    ), row
    assert "MB" not in r.stdout  # one set of units: the progress bar's binary ones
    assert (
        lines[-1].startswith("through the client by plain read/write on the mount")
        and "jive read" in lines[-1]
    )


def test_api_start_wait_progress_cancel_and_resume(two: tuple[Env, Env]) -> None:
    """The Python API from a script: start a copy, read its progress, time out waiting,
    cancel it (the servers confirm), run it again (it resumes), see the resume in status."""
    e = two[1]
    src = e.export("jive") / "tmp" / "api.bin"
    random_file(src, 256 * 2**20, seed=70)
    mount = api.find_mount(paths=[e.dir("jive")])
    assert mount.root == e.mount.root
    jive = e.servers["jive"].proc
    assert jive is not None
    events: list[str] = []
    with throttled(jive):  # the source runs 10% of the time: the copy cannot finish first
        c = api.start_copy(
            e.dir("jive") / "tmp" / "api.bin",
            "onsala:/tmp/api.bin",
            mount=mount,
            streams=2,
            on_event=lambda _c, ev: events.append(str(ev.get("event"))),
        )

        def moving() -> bool:
            t = c.progress()
            return t is not None and t.bytes_done > 0

        wait_for(moving, 60, "the copy to move bytes")
        t = c.progress()
        assert isinstance(t, api.Transfer) and t.state == "running" and t.bytes_total == src.stat().st_size
        assert t.kind == "third-party" and t.rate() > 0 and t.eta() is not None
        with pytest.raises(TimeoutError):
            c.wait(timeout=0.3)
        assert not c.done()
        c.cancel()
        result = c.wait(timeout=30)
    assert result.outcome == api.CANCELLED and not result.ok, result
    assert result.transfer is not None and result.transfer.cancel_confirmed is True
    assert 0 < result.transfer.bytes_done < src.stat().st_size
    assert "progress" in events
    with pytest.raises(AttributeError):
        result.outcome = "done"  # type: ignore[misc]  # frozen
    assert not (e.export("onsala") / "tmp" / "api.bin").exists()
    # again: it resumes from what the cancelled one left
    result = api.copy("jive:/tmp/api.bin", "onsala:/tmp/api.bin", mount=mount, timeout=120)
    assert result.ok and result.transfer is not None, result
    assert result.transfer.resumed_from > 0 and result.transfer.state == "done"
    assert digest(e.export("onsala") / "tmp" / "api.bin") == digest(src)
    st = api.status(mount)
    [mine] = [t for t in st.transfers if t.id == result.transfer.id]
    assert mine.resumed_from == result.transfer.resumed_from and mine.bytes_via_client == 0
    r = etfs("status", cwd=e.dir("jive"))
    [row] = [line for line in r.stdout.splitlines() if line.startswith(mine.id + " ")]
    assert "resumed at " in row and "MiB" in row, row
    # a bad argument is a ValueError before anything starts
    with pytest.raises(ValueError, match="mode"):
        api.start_copy("jive:/tmp/api.bin", "onsala:/tmp/x", mount=mount, mode="sideways")


def test_watch_piped_shows_live_transfers_without_escape_codes(two: tuple[Env, Env]) -> None:
    e = two[1]
    src = e.export("jive") / "tmp" / "watched"
    random_file(src, 256 * 2**20, seed=80)
    jive = e.servers["jive"].proc
    assert jive is not None
    watch = etfs_popen("status", "--watch", "--interval", "0.2", cwd=e.dir("onsala"))
    try:
        with throttled(jive, run=0.002, pause=0.098):  # the source runs 2% of the time
            mount = api.find_mount(e.mount.root)
            c = api.start_copy("jive:/tmp/watched", "onsala:/tmp/watched", mount=mount, streams=1)
            wait_for(lambda: (t := c.progress()) is not None and t.bytes_done > 0, 60, "the copy to run")
            time.sleep(0.7)  # a few refreshes while it runs
            c.cancel()
            c.wait(30)
        time.sleep(0.6)  # and a few after
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=20)
    finally:
        if watch.poll() is None:
            watch.kill()
        watch.communicate(timeout=10)
    assert watch.returncode == 0, err
    assert ESC not in out
    blocks = [b for b in out.split("--- ") if b.strip()]
    assert len(blocks) >= 4, out
    assert all(re.match(r"\d\d:\d\d:\d\d\n", b) for b in blocks), out
    running = [b for b in blocks if "jive:/tmp/watched -> onsala:/tmp/watched" in b]
    assert running and all(re.search(r"\s(starting|running)\s", b) for b in running), out
    assert any(re.search(r"running\s.*MiB/s\s+\d+:\d\d\s+\d+:\d\d\s", b) for b in running), out  # rate, ETA
    assert "no running transfers" in blocks[-1]
    # finished transfers (there are some) are never listed by --watch
    assert not re.search(r"^\S+\s+(done|cancelled|failed)\s", out, re.M), out


def test_exit_codes_documented_match(two: tuple[Env, Env], tmp_path: Path) -> None:
    a, b = two
    r = etfs("cp", "--help")
    assert r.returncode == 0
    epilog = r.stdout[r.stdout.index("exit status:") :]
    documented = {int(m) for m in re.findall(r"^\s+(\d+)  ", epilog, re.M)}
    assert documented == {0, 1, 2, 3, 4, 130}, epilog
    for flag in ("--streams", "--mode", "--no-preserve", "--mount", "-q", "-L", "--json"):
        assert flag in r.stdout
    assert "(default: overwrite)" in " ".join(r.stdout.split())
    (a.export("jive") / "tmp" / "codes").write_bytes(b"c" * 4096)
    (a.export("onsala") / "tmp" / "codes-there").write_bytes(b"keep")
    jive, onsala = a.dir("jive") / "tmp", a.dir("onsala") / "tmp"
    cases: list[tuple[int, list[str], Path | str]] = [
        (0, ["cp", str(jive / "codes"), str(onsala / "codes")], "/"),
        (1, ["cp", "--mode", "new", str(jive / "codes"), str(onsala / "codes-there")], "/"),
        (2, ["cp", "--streams", "0", str(jive / "codes"), str(onsala)], "/"),
        (2, ["cp", "--no-such-flag", str(jive / "codes"), str(onsala)], "/"),
        (3, ["cp", "jive:/tmp/codes", "onsala:/tmp/x"], tmp_path),
        (3, ["cp", "--mount", "/nonexistent", str(jive / "codes"), str(onsala)], "/"),
        (4, ["cp", str(jive / "no-such"), str(onsala)], "/"),
        (4, ["cp", str(jive), str(onsala / "dir-without-r")], "/"),
    ]
    for want, args, cwd in cases:
        r = etfs(*args, cwd=cwd)
        assert r.returncode == want, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr
    assert (a.export("onsala") / "tmp" / "codes-there").read_bytes() == b"keep"
    # 130: Ctrl-C while a copy runs
    random_file(b.export("jive") / "tmp" / "ctrl-c", 128 * 2**20, seed=90)
    proc = b.servers["jive"].proc
    assert proc is not None
    cp = etfs_popen("cp", "jive:/tmp/ctrl-c", "onsala:/tmp/", cwd=b.dir("jive"))
    try:
        with throttled(proc):

            def running() -> bool:
                ts = [t for t in api.status(api.find_mount(b.mount.root)).transfers]
                return any(t.destination == "onsala:/tmp/ctrl-c" and t.bytes_done > 0 for t in ts)

            wait_for(running, 60, "the copy to run")
            cp.send_signal(signal.SIGINT)
            out, err = cp.communicate(timeout=30)
    finally:
        if cp.poll() is None:
            cp.kill()
        cp.communicate(timeout=10)
    assert cp.returncode == 130, err
    assert "1 cancelled" in out, out  # the summary says how it ended


def test_status_view_rate_eta_and_resume_exactly() -> None:
    """The numbers `etfs status` prints, for a transfer with a known history (no mount needed)."""
    from etfs.transfer import status_view

    mib = 2**20
    t = api.Transfer.from_dict(
        {
            "id": "c1-7",
            "source": "jive:/a",
            "destination": "onsala:/a",
            "state": "running",
            "kind": "third-party",
            "bytes_total": 180 * mib,
            "bytes_done": 100 * mib,
            "resumed_from": 20 * mib,
            "streams": 4,
            "started": 1000.0,
            "something_new": "ignored",  # a newer daemon's field does not break an older client
        }
    )
    assert t.rate(now=1010.0) == 8 * mib  # (100 - 20) MiB in 10 s: resumed bytes do not count
    assert t.eta(now=1010.0) == 10.0
    done = api.Transfer(
        "c1-8", "jive:/b", "onsala:/b", "done", bytes_total=1, bytes_done=1, started=1, finished=2
    )
    lines = status_view.render_status(api.Status((t, done), (api.ServerIO("jive", 5 * mib, 0),)), now=1010.0)
    assert lines[0].split() == [*status_view.HEADER, "TRANSFER"]
    assert re.search(
        r"running\s+100\.0 MiB\s+180\.0 MiB\s+55\.6\s+8\.0 MiB/s\s+0:10\s+0:10\s+third-party", lines[1]
    )
    assert lines[1].endswith("jive:/a -> onsala:/a  (resumed at 20.0 MiB)"), lines[1]
    assert re.search(r"done .* -  ", lines[2])  # no ETA once done
    assert lines[3].endswith("jive read 5.0 MiB, wrote 0 B")
    live = status_view.render_status(api.Status((done,)), live_only=True)
    assert live == ["no running transfers"]
    assert [status_view.fmt_bytes(n) for n in (0, 1023, 1024, 64 * mib, 3 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "64.0 MiB",
        "3.0 TiB",
    ]
    assert status_view.fmt_duration(3725) == "1:02:05"
