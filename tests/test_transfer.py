"""Server-to-server transfers between real `etfs_server` processes on loopback.

Streams x directions, modes, edge sizes, many concurrent transfers, capabilities, local
and relay copies.  Faults (killed servers or clients, corrupted blocks, full disks, a
changing source) are in `test_transfer_faults.py`; namespaces in `test_netns.py`.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import msgspec
import pytest
import trio
from harness.transfers import MIB, Cluster, Node, leftovers, make_file, open_engine, sha256

from etfs.client import RemoteError
from etfs.protocol import messages as m
from etfs.transfer.engine import ClientTransfer, TransferFailed

pytestmark = pytest.mark.timeout(120)


SMALL_BLOCK = 256 * 1024


@pytest.fixture
def pair(cluster: Cluster) -> Cluster:
    cluster.add("jive")
    cluster.add("onsala")
    return cluster


def check_done(dst: Node, path: str, t: ClientTransfer, expect_sha: str, src_file: Path) -> None:
    """Identical bytes, xattrs, a 'done' record, no leftovers."""
    out = dst.export / path.lstrip("/")
    assert out.stat().st_size == src_file.stat().st_size
    assert sha256(out) == expect_sha
    assert t.state == "done", t
    digest = os.getxattr(out, "user.etfs.digest").decode()
    assert digest == t.digest and digest.startswith("xxh3-64-tree:")
    assert os.getxattr(out, "user.etfs.transfer_id").decode() == t.server_transfer_id
    rec = dst.record(t.server_transfer_id)
    assert rec["state"] == "done", rec
    assert rec["bytes_done"] == rec["bytes_total"] == src_file.stat().st_size
    assert rec["digest"] == digest
    assert leftovers(dst.export) == []


@pytest.mark.parametrize("direction", ["pull", "push"])
@pytest.mark.parametrize("streams", [1, 4, 8])
async def test_streams_and_directions(pair: Cluster, streams: int, direction: str) -> None:
    src = pair["jive"].export / "big"
    size = 24 * MIB + 12345
    expect = make_file(src, size, seed=streams)
    async with open_engine(pair.client_config(block_size=MIB)) as engine:
        t = await engine.copy("jive", "/big", "onsala", "/copy", streams=streams, direction=direction)
    assert t.kind == "third-party" and t.bytes_via_client == 0
    assert t.streams == streams and t.direction == direction
    check_done(pair["onsala"], "/copy", t, expect, src)
    rec = pair["onsala"].record(t.server_transfer_id)
    assert rec["streams"] == streams and rec["direction"] == direction and rec["bytes_resent"] == 0
    for n in pair.nodes.values():
        n.proc.assert_healthy()


async def test_reverse_and_default_block_size(pair: Cluster) -> None:
    """onsala -> jive with the default 8 MiB blocks, both directions of the pair work."""
    src = pair["onsala"].export / "f"
    expect = make_file(src, 3 * 8 * MIB + 1)
    async with open_engine(pair.client_config()) as engine:
        t = await engine.copy("onsala", "/f", "jive", "/g")
    check_done(pair["jive"], "/g", t, expect, src)


# --- modes -----------------------------------------------------------------------------------------------
async def test_mode_new_refuses_existing(pair: Cluster) -> None:
    make_file(pair["jive"].export / "src", 2 * MIB)
    existing = pair["onsala"].export / "dst"
    existing.write_bytes(b"keep me")
    before = existing.stat()
    async with open_engine(pair.client_config()) as engine:
        with pytest.raises(TransferFailed) as exc:
            await engine.copy("jive", "/src", "onsala", "/dst", mode="new")
        assert exc.value.errno == errno.EEXIST
        # The relay honours it too.
        with pytest.raises(TransferFailed) as exc:
            await engine.copy("jive", "/src", "onsala", "/dst", mode="new", policy="never")
        assert exc.value.errno == errno.EEXIST
        # New onto a name that does not exist works.
        t = await engine.copy("jive", "/src", "onsala", "/fresh", mode="new")
        assert t.state == "done"
    assert existing.read_bytes() == b"keep me"
    after = existing.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert leftovers(pair["onsala"].export) == []


async def test_mode_overwrite(pair: Cluster) -> None:
    src = pair["jive"].export / "src"
    expect = make_file(src, 5 * MIB + 7)
    dst = pair["onsala"].export / "dst"
    dst.write_bytes(b"x" * (9 * MIB))  # longer than the source: must not keep a tail
    async with open_engine(pair.client_config(block_size=MIB)) as engine:
        t = await engine.copy("jive", "/src", "onsala", "/dst", mode="overwrite")
    check_done(pair["onsala"], "/dst", t, expect, src)


async def test_mode_resume_of_complete_part(pair: Cluster) -> None:
    """mode resume with no part file is an ordinary copy."""
    src = pair["jive"].export / "src"
    expect = make_file(src, 3 * MIB)
    async with open_engine(pair.client_config(block_size=MIB)) as engine:
        t = await engine.copy("jive", "/src", "onsala", "/dst", mode="resume")
    check_done(pair["onsala"], "/dst", t, expect, src)


async def test_same_server_copy_keeps_times_and_skips(pair: Cluster) -> None:
    """A same-server copy stamps the source's mtime when asked, so skip-existing skips next time."""
    src = pair["jive"].export / "src"
    expect = make_file(src, 3 * MIB)
    dst = pair["jive"].export / "dst"
    async with open_engine(pair.client_config(block_size=MIB)) as engine:
        t1 = await engine.copy("jive", "/src", "jive", "/dst", preserve_times=True)
        assert t1.kind == "local" and t1.state == "done"
        assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns and sha256(dst) == expect
        t2 = await engine.copy("jive", "/src", "jive", "/dst", mode="skip-existing")
        assert t2.state == "skipped", t2


async def test_mode_skip_existing(pair: Cluster) -> None:
    src = pair["jive"].export / "src"
    expect = make_file(src, 3 * MIB)
    dst = pair["onsala"].export / "dst"
    async with open_engine(pair.client_config(block_size=MIB)) as engine:
        t1 = await engine.copy("jive", "/src", "onsala", "/dst", preserve_times=True)
        assert t1.state == "done"
        assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
        ino = dst.stat().st_ino
        # Same size and mtime: skipped, nothing moved.
        t2 = await engine.copy("jive", "/src", "onsala", "/dst", mode="skip-existing")
        assert t2.state == "skipped", t2
        assert dst.stat().st_ino == ino
        assert pair["onsala"].record(t2.server_transfer_id)["state"] == "skipped"
        # Relay path also skips.
        t3 = await engine.copy("jive", "/src", "onsala", "/dst", mode="skip-existing", policy="never")
        assert t3.state == "skipped", t3
        # Different mtime (same size): copied again, and skip-existing sets the source's mtime.
        os.utime(dst, ns=(1_000_000_000, 1_000_000_000))
        dst.write_bytes(dst.read_bytes()[:-1] + b"\0")  # same size, different content
        os.utime(dst, ns=(1_000_000_000, 1_000_000_000))
        t4 = await engine.copy("jive", "/src", "onsala", "/dst", mode="skip-existing")
        assert t4.state == "done", t4
        assert sha256(dst) == expect
        assert dst.stat().st_mtime_ns == src.stat().st_mtime_ns
        # Different size (same mtime): copied.
        with dst.open("ab") as f:
            f.write(b"more")
        os.utime(dst, ns=(src.stat().st_mtime_ns, src.stat().st_mtime_ns))
        t5 = await engine.copy("jive", "/src", "onsala", "/dst", mode="skip-existing")
        assert t5.state == "done", t5
        assert sha256(dst) == expect
    assert leftovers(pair["onsala"].export) == []


# --- sizes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size",
    [0, 1, SMALL_BLOCK - 1, SMALL_BLOCK, SMALL_BLOCK + 1, 5 * SMALL_BLOCK, 5 * SMALL_BLOCK + 1],
    ids=["empty", "one-byte", "block-1", "one-block", "block+1", "n-blocks", "n-blocks+1"],
)
@pytest.mark.parametrize("direction", ["pull", "push"])
async def test_edge_sizes(pair: Cluster, size: int, direction: str) -> None:
    src = pair["jive"].export / "f"
    expect = make_file(src, size, seed=size)
    async with open_engine(pair.client_config(block_size=SMALL_BLOCK, streams=4)) as engine:
        t = await engine.copy("jive", "/f", "onsala", "/g", direction=direction)
    check_done(pair["onsala"], "/g", t, expect, src)


async def test_many_concurrent_transfers(pair: Cluster) -> None:
    n = 32
    hashes = {
        i: make_file(pair["jive"].export / "in" / f"f{i}", 100_000 + 37_000 * i, seed=i) for i in range(n)
    }
    (pair["onsala"].export / "out").mkdir()
    results: dict[int, ClientTransfer] = {}
    async with open_engine(pair.client_config(block_size=SMALL_BLOCK, streams=2)) as engine:

        async def one(i: int) -> None:
            results[i] = await engine.copy(
                "jive", f"/in/f{i}", "onsala", f"/out/f{i}", direction="push" if i % 2 else "pull"
            )

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)
    assert len(results) == n
    for i, t in results.items():
        assert t.state == "done", t
        assert sha256(pair["onsala"].export / "out" / f"f{i}") == hashes[i]
    recs = pair["onsala"].records()
    assert sum(1 for r in recs.values() if r["state"] == "done") == n
    assert leftovers(pair["onsala"].export) == []
    # Known: for a file of fewer blocks than streams the destination uses fewer streams than the
    # source opens for a push; a surplus connection arriving after the end is refused (logged).
    for node in pair.nodes.values():
        node.proc.assert_healthy(r"push refused: unknown transfer")


# --- other kinds of copy ---------------------------------------------------------------------------------
async def test_local_copy(pair: Cluster) -> None:
    src = pair["jive"].export / "a"
    expect = make_file(src, 3 * MIB + 5)
    async with open_engine(pair.client_config()) as engine:
        t = await engine.copy("jive", "/a", "jive", "/b")
        assert t.kind == "local" and t.state == "done" and t.bytes_done == src.stat().st_size
        with pytest.raises(TransferFailed) as exc:
            await engine.copy("jive", "/a", "jive", "/b", mode="new")
        assert exc.value.errno == errno.EEXIST
    assert sha256(pair["jive"].export / "b") == expect
    assert leftovers(pair["jive"].export) == []


async def test_relay_policy_never(pair: Cluster) -> None:
    src = pair["jive"].export / "a"
    size = 5 * MIB + 3
    expect = make_file(src, size)
    async with open_engine(pair.client_config()) as engine:
        t = await engine.copy("jive", "/a", "onsala", "/b", policy="never")
    assert t.kind == "relay" and t.state == "done"
    assert t.bytes_via_client == size
    assert sha256(pair["onsala"].export / "b") == expect
    assert leftovers(pair["onsala"].export) == []


async def test_missing_source(pair: Cluster) -> None:
    async with open_engine(pair.client_config()) as engine:
        for policy in ("always", "never"):
            with pytest.raises(TransferFailed) as exc:
                await engine.copy("jive", "/nope", "onsala", "/b", policy=policy)
            assert exc.value.errno == errno.ENOENT
    assert not (pair["onsala"].export / "b").exists()
    assert leftovers(pair["onsala"].export) == []


# --- capabilities ----------------------------------------------------------------------------------------
async def _start_with(engine_cfg: Cluster, cap: m.Capability, dst_path: str) -> m.TransferInfo:
    """Order onsala to receive ``cap`` (pull) and wait for the end of it."""
    async with open_engine(engine_cfg.client_config()) as engine:
        dst = engine.pool["onsala"]
        # A capability names its transfer: the order carries its id.
        started = await dst.call(
            m.TransferStart(
                capability=cap, source_name="jive", path=dst_path, streams=2, transfer_id=cap.transfer_id
            ),
        )
        with trio.fail_after(30):
            while True:
                info = await dst.call(m.TransferWait(transfer_id=started.transfer_id))
                if info.state in ("done", "failed"):
                    return info


async def _offer(cluster: Cluster, server: str, path: str, ttl: float = 300.0) -> m.Capability:
    async with open_engine(cluster.client_config()) as engine:
        cap = await engine.pool[server].call(m.TransferOffer(path=path, ttl=ttl))
        host = "127.0.0.1"
        return msgspec.structs.replace(cap, data_host=cap.data_host or host)


async def test_expired_capability(pair: Cluster) -> None:
    make_file(pair["jive"].export / "f", MIB)
    cap = await _offer(pair, "jive", "/f", ttl=0.01)  # the server makes it 1 s
    assert cap.expires - time.time() <= 1.5
    # Expiry is wall-clock time and the subject of this test: let it pass.
    await trio.sleep(max(0.0, cap.expires - time.time()) + 0.1)
    info = await _start_with(pair, cap, "/out")
    assert info.state == "failed" and info.errno == errno.EACCES, info
    assert "expired" in info.reason
    assert not (pair["onsala"].export / "out").exists()
    assert leftovers(pair["onsala"].export) == []


async def test_foreign_and_tampered_capability(cluster: Cluster) -> None:
    for name in ("jive", "onsala", "other"):
        cluster.add(name)
    make_file(cluster["jive"].export / "f", MIB)
    make_file(cluster["other"].export / "f", MIB)
    # Signed by "other", presented to jive's data port (as if jive had issued it).
    foreign = await _offer(cluster, "other", "/f")
    foreign = msgspec.structs.replace(foreign, data_port=cluster["jive"].data_port)
    # A real jive capability with one byte of the signed body changed.
    good = await _offer(cluster, "jive", "/f")
    token = bytearray(good.token)
    token[5] ^= 0x01
    tampered = msgspec.structs.replace(good, token=bytes(token))
    # (from another capability: each names its own transfer, and a transfer id is used once)
    other = await _offer(cluster, "jive", "/f")
    truncated = msgspec.structs.replace(other, token=other.token[:10])
    for i, cap in enumerate((foreign, tampered, truncated)):
        info = await _start_with(cluster, cap, f"/out{i}")
        assert info.state == "failed" and info.errno == errno.EACCES, info
        assert not (cluster["onsala"].export / f"out{i}").exists()
    assert leftovers(cluster["onsala"].export) == []
    # A good one works (a fresh one: the failed transfers above used up `good`'s transfer id).
    info = await _start_with(cluster, await _offer(cluster, "jive", "/f"), "/ok")
    assert info.state == "done", info


async def test_offer_refuses_directory(pair: Cluster) -> None:
    (pair["jive"].export / "dir").mkdir()
    async with open_engine(pair.client_config()) as engine:
        with pytest.raises(RemoteError) as exc:
            await engine.pool["jive"].call(m.TransferOffer(path="/dir"))
        assert exc.value.errno == errno.EISDIR
