"""The data path without servers: `serve_blocks` and `DestinationTransfer.fetch_stream` over one loopback
connection, for every sender x receiver x verify, with blocks that are not a multiple of the
CHUNK they pass through.  Every block must arrive whole, in place, with its xxh3-64."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
import xxhash

from etfs.protocol import messages as m
from etfs.protocol.transfer import CopyMode, Direction
from etfs_server.transfer import datapath, destination, records
from etfs_server.transfer.source import serve_blocks


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s in (a, b):
        datapath.set_timeouts(s, 10.0)
    return a, b


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("receiver", ["splice", "recv_write"])
@pytest.mark.parametrize("sender", ["sendfile", "read_send"])
def test_blocks_arrive_whole_with_their_digest(
    tmp_path: Path, sender: str, receiver: str, verify: bool
) -> None:
    block = 2 * datapath.CHUNK + 4097
    size = 3 * block + datapath.CHUNK // 3  # a short last block, too
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    cap = m.Capability(b"t", "tid", "/src", size, 0, "127.0.0.1", 0, 0.0)
    rec = records.Record("tid", "a:/src", "b:/dst", "d", "/dst", bytes_total=size)
    settings = destination.Settings(CopyMode.OVERWRITE, Direction.PULL, verify, receiver=receiver)
    t = destination.DestinationTransfer(rec, cap, None, block, settings)  # type: ignore[arg-type]  # no root
    t.part_fd = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT, 0o600)
    t.journal_fd = os.open(tmp_path / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    src_fd = os.open(src, os.O_RDONLY)
    a, b = _tcp_pair()
    served: list[tuple[int, bool] | BaseException] = []

    def source() -> None:
        try:
            served.append(serve_blocks(b, src_fd, size, sender, block))
        except BaseException as exc:  # reported by the assertion below
            served.append(exc)

    th = threading.Thread(target=source)
    th.start()
    try:
        t.fetch_stream(a, destination.BlockQueue(list(range(t.nblocks))))
    finally:
        th.join(10)
        for fd in (t.part_fd, t.journal_fd, src_fd):
            os.close(fd)
        a.close()
        b.close()
    assert served == [(size, True)]  # all bytes, and the destination said it has every block
    assert (tmp_path / "part").read_bytes() == data
    assert rec.bytes_done == size
    want = [xxhash.xxh3_64_intdigest(data[i * block : (i + 1) * block]) if verify else 0 for i in range(4)]
    assert t.digests == want
