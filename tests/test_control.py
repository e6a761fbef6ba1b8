"""The mount daemon's control socket (`etfs.daemon.control`) against malformed clients,
and the checks on the mount registry directory.

The server runs in-process with a minimal fake engine: the unit under test is the socket
handler (parsing, validation, error replies, survival); the real copy path is covered by
tests/test_etfs_cp.py.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from etfs import api
from etfs.daemon import control
from etfs.daemon.control import ControlServer, UnsafeRegistryDir, ensure_registry_dir
from etfs.transfer import commands

STATUS_ROWS = [{"id": "t1", "state": "done"}]
# No file of this process's (absent) mount was read or written.
NO_IO = {"jive": {"read": 0, "written": 0}, "bebop": {"read": 0, "written": 0}}


class FakeEngine:
    """Just what `ControlServer._dispatch` touches for status and rejected requests."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(servers={"jive": object(), "bebop": object()})
        self.transfers: dict[str, Any] = {}
        self.changed = trio.Event()
        self.copies: list[tuple[Any, ...]] = []

    def status(self) -> list[dict[str, Any]]:
        return STATUS_ROWS

    async def copy(self, *args: Any, **kwargs: Any) -> Any:
        self.copies.append((args, kwargs))
        raise AssertionError("a rejected request must never reach the engine")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[Path, FakeEngine]]:
    engine = FakeEngine()
    path = tmp_path / "ctl.sock"
    srv = ControlServer(engine, path)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.serve)
        yield path, engine
        nursery.cancel_scope.cancel()


async def _connect(path: Path) -> trio.SocketStream:
    return await trio.open_unix_socket(str(path))


async def _exchange(path: Path, payload: bytes) -> list[dict[str, Any]]:
    """Send payload, read until the server closes; the reply lines (with a time limit)."""
    with trio.fail_after(5):
        stream = await _connect(path)
        async with stream:
            await stream.send_all(payload)
            buf = b""
            while chunk := await stream.receive_some(65536):
                buf += chunk
    return [json.loads(line) for line in buf.splitlines() if line]


async def _assert_still_serving(path: Path) -> None:
    assert await _exchange(path, b'{"op": "status"}\n') == [{"transfers": STATUS_ROWS, "mount_io": NO_IO}]


async def test_status(server: tuple[Path, FakeEngine]) -> None:
    path, _ = server
    await _assert_still_serving(path)


async def test_socket_mode_is_0600(server: tuple[Path, FakeEngine]) -> None:
    path, _ = server
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


BAD_REQUESTS = {
    "not-json": b"this is not json\n",
    "not-utf8": b"\xff\xfe{\n",
    "json-list": b'["op", "status"]\n',
    "json-string": b'"status"\n',
    "unknown-op": b'{"op": "format-disk"}\n',
    "no-op": b"{}\n",
    "source-int": b'{"op": "copy", "source": 1, "destination": "jive:/b"}\n',
    "destination-missing": b'{"op": "copy", "source": "jive:/a"}\n',
    "destination-list": b'{"op": "copy", "source": "jive:/a", "destination": ["x"]}\n',
    "source-no-colon": b'{"op": "copy", "source": "jive", "destination": "bebop:/b"}\n',
    "mode-bad": b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "mode": "clobber"}\n',
    "mode-int": b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "mode": 3}\n',
    "streams-zero": b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "streams": 0}\n',
    "streams-huge": b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "streams": 65}\n',
    "streams-str": b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "streams": "4"}\n',
    "streams-bool": b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "streams": true}\n',
    "direction-bad": b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "direction": "up"}\n',
    "verify-str": b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "verify": "yes"}\n',
    "preserve-times-int": (
        b'{"op": "copy", "source": "jive:/a", "destination": "bebop:/b", "preserve_times": 1}\n'
    ),
    "server-records-list": b'{"op": "server-records", "server": ["jive"]}\n',
    "server-records-unknown": b'{"op": "server-records", "server": "nope"}\n',
}


@pytest.mark.parametrize("payload", list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS))
async def test_bad_request_gets_einval_and_server_survives(
    server: tuple[Path, FakeEngine], payload: bytes
) -> None:
    path, engine = server
    replies = await _exchange(path, payload)
    assert len(replies) == 1, replies
    assert replies[0]["event"] == "error"
    assert replies[0]["errno"] == errno.EINVAL
    assert replies[0]["message"].startswith("bad request: ")
    assert not engine.copies
    await _assert_still_serving(path)


async def test_unknown_server_gets_enoent(server: tuple[Path, FakeEngine]) -> None:
    path, engine = server
    replies = await _exchange(path, b'{"op": "copy", "source": "nope:/a", "destination": "jive:/b"}\n')
    assert replies == [{"event": "error", "errno": errno.ENOENT, "message": "unknown server 'nope'"}]
    assert not engine.copies
    await _assert_still_serving(path)


async def test_request_too_long(server: tuple[Path, FakeEngine]) -> None:
    path, _ = server
    with trio.fail_after(5):
        stream = await _connect(path)
        async with stream:
            try:
                await stream.send_all(b"x" * (control.MAX_LINE + 65536 * 2))
            except trio.BrokenResourceError:
                pass  # the server may close before we finished sending
    await _assert_still_serving(path)


@pytest.mark.parametrize("partial", [b"", b'{"op": "sta', b'{"op": "copy", "source": 1'])
async def test_client_disconnects_mid_request(server: tuple[Path, FakeEngine], partial: bytes) -> None:
    path, _ = server
    with trio.fail_after(5):
        stream = await _connect(path)
        await stream.send_all(partial)
        await stream.aclose()
    await trio.sleep(0.05)
    await _assert_still_serving(path)


async def test_client_vanishes_after_bad_request(server: tuple[Path, FakeEngine]) -> None:
    """The error reply goes to a closed connection: that must not escape either."""
    path, _ = server
    with trio.fail_after(5):
        for _ in range(5):
            stream = await _connect(path)
            await stream.send_all(b'{"op": "copy", "source": 1}\n')
            await stream.aclose()
    await trio.sleep(0.05)
    await _assert_still_serving(path)


async def test_unexpected_exception_is_contained(
    server: tuple[Path, FakeEngine], caplog: pytest.LogCaptureFixture
) -> None:
    path, engine = server

    def broken_status() -> list[dict[str, Any]]:
        raise RuntimeError("engine bug")

    engine.status = broken_status  # type: ignore[method-assign]
    replies = await _exchange(path, b'{"op": "status"}\n')
    assert len(replies) == 1 and replies[0]["event"] == "error" and replies[0]["errno"] == errno.EIO
    assert "engine bug" in caplog.text
    del engine.status  # back to the class method
    await _assert_still_serving(path)


async def test_exception_group_of_broken_connection_is_quiet(
    server: tuple[Path, FakeEngine], caplog: pytest.LogCaptureFixture
) -> None:
    path, engine = server

    def vanished() -> list[dict[str, Any]]:
        raise ExceptionGroup("nursery", [trio.BrokenResourceError(), BrokenPipeError()])

    engine.status = vanished  # type: ignore[method-assign]
    assert await _exchange(path, b'{"op": "status"}\n') == []
    assert "Traceback" not in caplog.text
    del engine.status
    await _assert_still_serving(path)


# ------------------------------------------------------------------ registry directory


def test_registry_dir_created_private(tmp_path: Path) -> None:
    reg = tmp_path / "etfs-x" / "mounts"
    old = os.umask(0)
    try:
        assert ensure_registry_dir(reg, base=tmp_path) == reg
    finally:
        os.umask(old)
    for level in (reg, reg.parent):
        st = os.lstat(level)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()
    ensure_registry_dir(reg, base=tmp_path)  # existing and fine: accepted again


def test_registry_dir_symlink_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "attacker"
    (elsewhere / "mounts").mkdir(parents=True, mode=0o700)
    (tmp_path / "etfs-x").symlink_to(elsewhere)
    with pytest.raises(UnsafeRegistryDir, match="symlink"):
        ensure_registry_dir(tmp_path / "etfs-x" / "mounts", base=tmp_path)


def test_registry_dir_symlink_leaf_refused(tmp_path: Path) -> None:
    (tmp_path / "etfs-x").mkdir(mode=0o700)
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "etfs-x" / "mounts").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafeRegistryDir, match="symlink"):
        ensure_registry_dir(tmp_path / "etfs-x" / "mounts", base=tmp_path)


def test_registry_dir_writable_by_others_refused(tmp_path: Path) -> None:
    d = tmp_path / "etfs-x"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(UnsafeRegistryDir, match="writable"):
        ensure_registry_dir(d / "mounts", base=tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a directory owned by someone else")
def test_registry_dir_foreign_owner_refused(tmp_path: Path) -> None:
    d = tmp_path / "etfs-x"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(UnsafeRegistryDir, match="owned by uid 12345"):
        ensure_registry_dir(d / "mounts", base=tmp_path)


def test_running_mounts_tolerates_unsafe_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = tmp_path / "mounts"
    reg.mkdir()
    os.chmod(reg, 0o777)
    (reg / "1.json").write_text(json.dumps({"pid": os.getpid(), "socket": "x", "root": "/", "servers": {}}))
    monkeypatch.setattr(control, "registry_dir", lambda: reg)
    assert control.running_mounts() == []
    os.chmod(reg, 0o700)
    (reg / "2.json").write_text("not json")
    (reg / "3.json").write_text("[1, 2]")
    (reg / "4.json").write_text(json.dumps({"pid": "x"}))
    assert [m["socket"] for m in control.running_mounts()] == ["x"]


# ------------------------------------------------- etfs cp argument resolution (api.Mount.resolve)

MOUNT = api.Mount(Path("/mnt/etfs"), "/nonexistent.sock", {"jive": "/mnt/jive", "bebop": "/mnt/etfs/bebop"})


@pytest.mark.parametrize(
    ("arg", "server", "path", "fs_path"),
    [
        ("/mnt/jive/.hidden", "jive", "/.hidden", "/mnt/etfs/jive/.hidden"),
        ("/mnt/jive/tmp/x.", "jive", "/tmp/x.", "/mnt/etfs/jive/tmp/x."),
        ("/mnt/jive/tmp/..x", "jive", "/tmp/..x", "/mnt/etfs/jive/tmp/..x"),
        ("/mnt/jive/./a/../.b/", "jive", "/.b", "/mnt/etfs/jive/.b"),
        ("/mnt/jive", "jive", "/", "/mnt/etfs/jive"),
        ("/mnt/jive/", "jive", "/", "/mnt/etfs/jive"),
        ("/mnt/etfs/jive/.x.", "jive", "/.x.", "/mnt/etfs/jive/.x."),
        ("/mnt/etfs/bebop", "bebop", "/", "/mnt/etfs/bebop"),
        ("jive:/tmp/x", "jive", "/tmp/x", "/mnt/etfs/jive/tmp/x"),
        ("jive:/.hidden", "jive", "/.hidden", "/mnt/etfs/jive/.hidden"),
        ("jive:/", "jive", "/", "/mnt/etfs/jive"),
        ("/home/me/file.", None, "/home/me/file.", "/home/me/file."),
        ("/mnt/jivex/a", None, "/mnt/jivex/a", "/mnt/jivex/a"),
    ],
)
def test_resolve(arg: str, server: str | None, path: str, fs_path: str) -> None:
    loc = MOUNT.resolve(arg)
    assert (loc.server, loc.path, loc.fs_path) == (server, path, Path(fs_path))


def test_resolve_relative_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    loc = MOUNT.resolve(".dot")
    assert (loc.server, loc.path) == (None, str(tmp_path / ".dot"))


# ------------------------------------------- stale registry entries (api.find_mount)


def _register(reg: Path, name: str, sock: Path) -> None:
    info = {"pid": os.getpid(), "root": f"/mnt/{name}", "socket": str(sock), "servers": {"jive": "/mnt/j"}}
    (reg / f"{name}.json").write_text(json.dumps(info))


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    reg = tmp_path / "mounts"
    reg.mkdir(mode=0o700)
    monkeypatch.setattr(control, "registry_dir", lambda: reg)
    return reg


def test_find_mount_stale_socket_is_a_clear_error(registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pid alive (ours) but the control socket is gone: a message, not a traceback."""
    _register(registry, "a", registry / "gone.sock")
    with pytest.raises(api.NoMountError, match="stale"):
        api.find_mount(None)
    args = argparse.Namespace(mount=None, server=None, json=False, watch=False)
    assert commands.cmd_status(args) == 1
    assert "stale" in capsys.readouterr().err


def test_find_mount_skips_stale_beside_live(registry: Path) -> None:
    _register(registry, "a", registry / "gone.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(registry / "live.sock"))
        _register(registry, "b", registry / "live.sock")
        assert api.find_mount(None).root == Path("/mnt/b")


def test_request_refused_socket_is_a_clear_error(registry: Path) -> None:
    sock = registry / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock))  # bound, never listening: connect is refused
        _register(registry, "a", sock)
        mount = api.find_mount(None)
        with pytest.raises(api.NoMountError, match="cannot reach the mount daemon"):
            api.request(mount.socket, {"op": "status"})
