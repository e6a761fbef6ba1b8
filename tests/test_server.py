"""A real `etfs-server` process: command line, file operations, pipelining, bad requests,
and 100 concurrent clients."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from harness.process import REPO
from harness.server import RawClient, ServerFactory, ServerProcess, Setup, standard_setup

from etfs.client.connection import RemoteError, ServerClient
from etfs.protocol import messages as m
from etfs_server.handlers import OPERATIONS
from etfs_server.transfer import TransferService


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "etfs_server.main", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    assert "usage: etfs-server" in out.stdout and "--config" in out.stdout and "--port-file" in out.stdout
    assert out.stderr == ""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Setup]]:
    setup = standard_setup(tmp_path_factory.mktemp("srv"))
    sp = ServerProcess(setup.config, setup.dir)
    try:
        sp.start()
        yield sp, setup
    finally:
        sp.stop()
    sp.assert_healthy(r"bad request", r"protocol error")


async def test_file_operations(srv: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    sp, setup = srv
    c = sp.client(nursery, "alice", setup.keys["alice"])
    await c.call(m.Mkdir(path="/tmp/ops", mode=0o755))
    o = await c.call(m.Create(path="/tmp/ops/a.txt", mode=0o640, flags=os.O_RDWR | os.O_EXCL))
    assert await c.call(m.Write(handle=o.handle, offset=0, data=b"hello world")) == 11
    await c.call(m.Fsync(handle=o.handle))
    assert await c.call(m.Read(handle=o.handle, offset=6, size=100)) == b"world"
    await c.call(m.Close(handle=o.handle))
    with pytest.raises(RemoteError) as ei:
        await c.call(m.Close(handle=o.handle))
    assert ei.value.errno == errno.EBADF
    attr = await c.call(m.Stat(path="/tmp/ops/a.txt"))
    assert attr.size == 11 and attr.mode & 0o777 == 0o640
    await c.call(m.Rename(old="/tmp/ops/a.txt", new="/tmp/ops/b.txt"))
    page = await c.call(m.List(path="/tmp/ops"))
    assert [e.name for e in page.entries] == ["b.txt"] and not page.more
    await c.call(m.SetAttr(path="/tmp/ops/b.txt", size=5))
    assert (setup.export / "tmp/ops/b.txt").read_bytes() == b"hello"
    await c.call(m.Symlink(path="/tmp/ops/l", target="b.txt"))
    assert await c.call(m.Readlink(path="/tmp/ops/l")) == "b.txt"
    await c.call(m.Link(old="/tmp/ops/b.txt", new="/tmp/ops/c.txt"))
    assert (await c.call(m.Stat(path="/tmp/ops/c.txt"))).nlink == 2
    assert len(await c.call(m.Checksum(path="/tmp/ops/c.txt"))) == 32
    with pytest.raises(RemoteError) as ei:
        await c.call(m.Create(path="/tmp/ops/b.txt", mode=0o644, flags=os.O_RDWR | os.O_EXCL))
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(RemoteError) as ei:
        await c.call(m.Stat(path="/tmp/ops/missing"))
    assert ei.value.errno == errno.ENOENT
    for name in ("b.txt", "c.txt", "l"):
        await c.call(m.Unlink(path=f"/tmp/ops/{name}"))
    await c.call(m.Rmdir(path="/tmp/ops"))
    assert (await c.call(m.StatFs())).bsize > 0
    await c.aclose()


async def test_fifo_in_export_is_refused_not_waited_on(
    srv: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    """Opening a FIFO would wait for a writer forever (and hold the server): EINVAL at once."""
    sp, setup = srv
    os.makedirs(setup.export / "tmp" / "fifo", exist_ok=True)
    os.mkfifo(setup.export / "tmp" / "fifo" / "p")
    c = sp.client(nursery, "alice", setup.keys["alice"])
    with trio.fail_after(10):
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            with pytest.raises(RemoteError) as ei:
                await c.call(m.Open(path="/tmp/fifo/p", flags=flags))
            assert ei.value.errno == errno.EINVAL, flags
        with pytest.raises(RemoteError) as ei:
            await c.call(m.Checksum(path="/tmp/fifo/p"))
        assert ei.value.errno == errno.EINVAL
        assert (await c.call(m.Stat(path="/tmp/fifo/p"))).size == 0  # still listed


async def test_pipelined_requests_on_live_server(
    srv: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    """Many requests in flight on one connection; each reply is matched to its caller by id."""
    sp, setup = srv
    for i in range(40):
        (setup.export / "tmp" / f"p{i}").write_bytes(b"x" * i)
    c = sp.client(nursery, "alice", setup.keys["alice"])
    sizes: dict[int, int] = {}

    async def one(i: int) -> None:
        sizes[i] = (await c.call(m.Stat(path=f"/tmp/p{i}"))).size

    async with trio.open_nursery() as n:
        for i in range(40):
            n.start_soon(one, i)
    assert sizes == {i: i for i in range(40)}
    await c.aclose()


def test_handlers_return_what_their_requests_declare() -> None:
    """The dispatch tables: every request has a handler whose return type is the reply type the
    request declares (the server also checks each reply it sends, `m.check_reply`)."""
    tables: dict[type[m.Request[Any]], Any] = {**OPERATIONS, **TransferService._handlers}
    assert set(tables) == set(m.Request.__subclasses__())
    for req_type, handler in tables.items():
        declared = typing.get_type_hints(handler)["return"]
        assert declared == m.reply_type(req_type), (req_type.__name__, declared)


async def bad_request_round(raw: RawClient, body: bytes, rid: int) -> None:
    await raw.send_body(body)
    reply = await raw.receive()
    assert isinstance(reply, m.Err), reply
    assert reply.errno == errno.EPROTO and reply.id == rid, reply


async def test_malformed_requests_get_eproto_with_id(srv: tuple[ServerProcess, Setup]) -> None:
    sp, setup = srv
    raw = await RawClient.connect(sp.control_port)
    try:
        await raw.login("alice", setup.keys["alice"])
        enc = msgspec.msgpack.encode
        await bad_request_round(raw, enc({"t": "call", "id": 5, "req": {"t": "frobnicate"}}), 5)
        await bad_request_round(raw, enc({"t": "call", "id": 6, "req": {"t": "stat", "path": 42}}), 6)
        read = {"t": "read", "handle": "h", "offset": 0, "size": 1}
        await bad_request_round(raw, enc({"t": "call", "id": 7, "req": read}), 7)
        # a protocol-1 request (no envelope) after login: refused with its id
        await bad_request_round(raw, enc({"t": "stat", "id": 8, "path": "/"}), 8)
        await bad_request_round(
            raw, enc({"t": "hello", "version": 1, "user": "a", "export": "", "nonce": b""}), 0
        )
        await bad_request_round(raw, b"\xc1", 0)
        # the connection still works
        await raw.send(m.Call(8, m.Ping()))
        assert await raw.receive() == m.Ok(8, None)
    finally:
        await raw.aclose()


async def test_oversized_frame_closes_only_that_connection(
    srv: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    sp, setup = srv
    other = sp.client(nursery, "alice", setup.keys["alice"])
    await other.call(m.Ping())
    raw = await RawClient.connect(sp.control_port)
    try:
        await raw.login("alice", setup.keys["alice"])
        await raw.send_raw((25 * 2**20).to_bytes(4, "big") + b"\0" * 100)
        reply = await raw.receive()
        assert isinstance(reply, m.Err) and reply.id == 0 and reply.errno == errno.EPROTO
        assert await raw.receive() is None
    finally:
        await raw.aclose()
    await other.call(m.Ping())  # the same old connection of another client
    assert sp.alive()


async def test_abrupt_disconnects_do_not_hurt(
    srv: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    sp, setup = srv
    for _ in range(5):
        raw = await RawClient.connect(sp.control_port)
        await raw.login("alice", setup.keys["alice"])
        await raw.send(m.Call(1, m.Stat("/tmp")))
        await raw.send_raw(b"\0\0")  # half a header, then gone
        await raw.aclose()
    c = sp.client(nursery, "alice", setup.keys["alice"])
    await c.call(m.Ping())
    await c.aclose()


async def test_hundred_concurrent_clients(server_factory: ServerFactory, tmp_path: Path) -> None:
    setup = standard_setup(tmp_path / "many")
    sp = server_factory(setup.config)
    n_clients = 100
    errors: list[str] = []

    async def session(i: int, nursery: trio.Nursery) -> None:
        c: ServerClient = sp.client(nursery, "alice", setup.keys["alice"])
        d = f"/tmp/c{i}"
        payload = os.urandom(1000 + i * 37)
        await c.call(m.Mkdir(path=d, mode=0o755))
        for j in range(3):
            o = await c.call(m.Create(path=f"{d}/f{j}", mode=0o644, flags=os.O_RDWR | os.O_EXCL))
            half = len(payload) // 2
            await c.call(m.Write(handle=o.handle, offset=0, data=payload[:half]))
            await c.call(m.Write(handle=o.handle, offset=half, data=payload[half:]))
            await c.call(m.Close(handle=o.handle))
        await c.call(m.Rename(old=f"{d}/f0", new=f"{d}/renamed"))
        await c.call(m.Unlink(path=f"{d}/f1"))
        page = await c.call(m.List(path=d))
        if [e.name for e in page.entries] != ["f2", "renamed"]:
            errors.append(f"client {i}: listing {page}")
        for name in ("f2", "renamed"):
            attr = await c.call(m.Stat(path=f"{d}/{name}"))
            o = await c.call(m.Open(path=f"{d}/{name}", flags=os.O_RDONLY))
            data = await c.call(m.Read(handle=o.handle, offset=0, size=len(payload) + 10))
            await c.call(m.Close(handle=o.handle))
            if attr.size != len(payload) or data != payload:
                errors.append(f"client {i}: {name} has wrong data")
        await c.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(n_clients):
                nursery.start_soon(session, i, nursery)
    assert not errors, errors[:5]
    assert len(list((setup.export / "tmp").iterdir())) == n_clients
    assert sp.alive()
    sp.assert_healthy()


async def test_out_of_range_io_arguments_are_einval(
    srv: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    """Negative or absurd offsets/sizes are the client's mistake (EINVAL), not an internal error."""
    sp, setup = srv
    c = sp.client(nursery, "alice", setup.keys["alice"])
    o = await c.call(m.Create(path="/tmp/range.txt", mode=0o644, flags=os.O_RDWR))
    bad: list[tuple[type[m.Request[Any]], dict[str, object]]] = [
        (m.Read, {"handle": o.handle, "offset": 0, "size": -1}),
        (m.Read, {"handle": o.handle, "offset": -5, "size": 1}),
        (m.Read, {"handle": o.handle, "offset": 2**63, "size": 1}),
        (m.Write, {"handle": o.handle, "offset": -1, "data": b"x"}),
        (m.Write, {"handle": o.handle, "offset": 2**64 - 1, "data": b"x"}),
        (m.SetAttr, {"path": "/tmp/range.txt", "size": -1}),
        (m.Checksum, {"path": "/tmp/range.txt", "offset": -1}),
    ]
    for req, fields in bad:
        with pytest.raises(RemoteError) as ei:
            await c.call(req(**fields))
        assert ei.value.errno in (errno.EINVAL, errno.EFBIG, errno.EOVERFLOW), (
            req.__name__,
            fields,
            ei.value,
        )
    await c.call(m.Close(handle=o.handle))
    await c.aclose()


async def test_out_of_range_setattr_values(srv: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    sp, setup = srv
    c = sp.client(nursery, "alice", setup.keys["alice"])
    o = await c.call(m.Create(path="/tmp/range2.txt", mode=0o644, flags=os.O_RDWR))
    await c.call(m.Close(handle=o.handle))
    changes: list[dict[str, Any]] = [{"uid": 2**64 - 1}, {"gid": 2**40}]
    for fields in changes:
        with pytest.raises(RemoteError) as ei:
            await c.call(m.SetAttr(path="/tmp/range2.txt", **fields))
        assert ei.value.errno in (errno.EINVAL, errno.EOVERFLOW), (fields, ei.value)
    await c.aclose()


def test_sigterm_shuts_down_cleanly(server_factory: ServerFactory, tmp_path: Path) -> None:
    setup = standard_setup(tmp_path / "term")
    sp = server_factory(setup.config)
    proc = sp.proc
    assert proc is not None
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    assert "received SIGTERM, shutting down" in sp.log()
    sp.assert_healthy()
