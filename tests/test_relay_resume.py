"""Issue 14 item 3: relay copies (through the client) resume like server transfers and leave
nothing behind: engine level, real servers on loopback, policy ``never`` forces the relay."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from harness.transfers import MIB, Cluster, make_file, open_engine, sha256

from etfs.protocol.transfer import relay_id_name, relay_part_name
from etfs.transfer.engine import ClientTransfer, TransferEngine

pytestmark = pytest.mark.timeout(120)


SIZE = 24 * MIB + 4321


@pytest.fixture
def pair(cluster: Cluster) -> Cluster:
    cluster.add("jive")
    cluster.add("onsala")
    return cluster


def etfs_files(directory: Path) -> list[str]:
    """Hidden files of copies (part files, relay files and their records)."""
    return sorted(p.name for p in directory.glob(".*.etfs-*"))


async def broken_relay(engine: TransferEngine, fraction: float = 0.4) -> ClientTransfer:
    """Start a relay jive:/a -> onsala:/b and cancel it once ``fraction`` of it is written."""
    records: list[ClientTransfer] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def copy() -> None:
                await engine.copy("jive", "/a", "onsala", "/b", policy="never", on_record=records.append)

            nursery.start_soon(copy)
            while not records or records[-1].bytes_done < fraction * SIZE:
                await engine.changed.wait()
            scope.cancel()
    [t] = records
    assert t.state == "cancelled" and t.cancel_confirmed is True, t
    return t


async def test_broken_relay_resumes(pair: Cluster) -> None:
    expect = make_file(pair["jive"].export / "a", SIZE)
    out = pair["onsala"].export
    async with open_engine(pair.client_config()) as engine:
        first = await broken_relay(engine)
        assert etfs_files(out) == [".b.etfs-relay", ".b.etfs-relay.id"]
        kept = (out / ".b.etfs-relay").stat().st_size
        assert 0 < kept < SIZE and not (out / "b").exists()
        t = await engine.copy("jive", "/a", "onsala", "/b", policy="never")
    assert t.kind == "relay" and t.state == "done", t
    assert sha256(out / "b") == expect
    assert etfs_files(out) == []
    assert 0 < t.bytes_via_client <= SIZE - first.bytes_done + 2 * MIB, (t, first)


async def test_changed_source_is_not_resumed(pair: Cluster) -> None:
    src = pair["jive"].export / "a"
    make_file(src, SIZE)
    out = pair["onsala"].export
    async with open_engine(pair.client_config()) as engine:
        await broken_relay(engine)
        st = src.stat()
        expect = make_file(src, SIZE, seed=99)  # same size; put the time back: ctime still changes
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        t = await engine.copy("jive", "/a", "onsala", "/b", policy="never")
    assert t.state == "done" and t.bytes_via_client == SIZE, t
    assert sha256(out / "b") == expect
    assert etfs_files(out) == []


async def test_damaged_part_file_is_not_trusted(pair: Cluster) -> None:
    expect = make_file(pair["jive"].export / "a", SIZE)
    out = pair["onsala"].export
    async with open_engine(pair.client_config()) as engine:
        await broken_relay(engine)
        with open(out / ".b.etfs-relay", "r+b") as f:
            f.write(b"\xff" * 4096)  # the start of the kept bytes no longer matches the source
        t = await engine.copy("jive", "/a", "onsala", "/b", policy="never")
    assert t.state == "done" and t.bytes_via_client == SIZE, t
    assert sha256(out / "b") == expect
    assert etfs_files(out) == []


async def test_server_transfer_into_the_destination_removes_relay_leftovers(pair: Cluster) -> None:
    expect = make_file(pair["jive"].export / "a", SIZE)
    out = pair["onsala"].export
    async with open_engine(pair.client_config()) as engine:
        await broken_relay(engine)
        assert etfs_files(out) == [".b.etfs-relay", ".b.etfs-relay.id"]
        t = await engine.copy("jive", "/a", "onsala", "/b", policy="always")
    assert t.kind == "third-party" and t.state == "done", t
    assert sha256(out / "b") == expect
    assert etfs_files(out) == []


def test_relay_names() -> None:
    assert relay_part_name("/tmp/x.bin") == "/tmp/.x.bin.etfs-relay"
    assert relay_id_name("/x") == "/.x.etfs-relay.id"
