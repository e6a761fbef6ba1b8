"""Transfers under faults: corrupted blocks, cut connections, killed servers and clients,
a full destination disk, a source that changes.

Mid-transfer faults use a rate-limited `Proxy` on the source's data port, so "half way" is
a condition to wait for (bytes through the proxy), never a sleep.  The same proxy counts
the block bytes actually sent, which bounds what a resumed copy re-sends.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import trio
from harness.process import wait_until
from harness.transfers import (
    MIB,
    Cluster,
    Node,
    client_command,
    client_spec,
    leftovers,
    make_file,
    open_engine,
    proxied_source,
    sha256,
)

from etfs.protocol import messages as m
from etfs.protocol.transfer import FailureCode
from etfs.transfer.engine import ClientTransfer, TransferFailed

pytestmark = pytest.mark.timeout(120)


BLOCK = 512 * 1024
SIZE = 40 * MIB
RATE = 20 * MIB  # bytes/s through the proxy: a 40 MiB copy takes ~2 s
MAX_RESENT = 0.08  # a resumed copy may re-send at most this fraction of the file
REFETCH_WARNING = r"digest mismatch|re-fetching"


@pytest.fixture
def pair(cluster: Cluster) -> Cluster:
    cluster.add("jive")
    cluster.add("onsala")
    return cluster


def assert_identical(dst: Node, path: str, expect: str, t: ClientTransfer) -> None:
    out = dst.export / path.lstrip("/")
    assert sha256(out) == expect
    assert t.state == "done", t
    assert os.getxattr(out, "user.etfs.transfer_id").decode() == t.server_transfer_id
    assert dst.record(t.server_transfer_id)["state"] == "done"
    assert leftovers(dst.export) == []


def part_files(dst: Node, name: str) -> set[str]:
    return {p.name for p in dst.export.glob(f".{name}.etfs-part*")}


# --- digest mismatch and cut connections -----------------------------------------------------------------
@pytest.mark.parametrize("sender", ["read_send", "sendfile"])
async def test_corrupted_block_is_refetched(cluster: Cluster, sender: str) -> None:
    cluster.add("jive", transfer={"sender": sender})
    cluster.add("onsala")
    expect = make_file(cluster["jive"].export / "f", 8 * MIB + 99)
    with proxied_source(cluster["jive"], corrupt_block=5) as proxy:
        async with open_engine(cluster.client_config(block_size=BLOCK, streams=2)) as engine:
            t = await engine.copy("jive", "/f", "onsala", "/g", policy="always")
    assert proxy.corrupted == 1 and proxy.connections == 2 and not proxy.errors
    assert_identical(cluster["onsala"], "/g", expect, t)
    rec = cluster["onsala"].record(t.server_transfer_id)
    assert rec["bytes_resent"] >= BLOCK, rec
    assert t.bytes_resent == rec["bytes_resent"]
    assert any("mismatch" in ln for ln in cluster["onsala"].proc.log_lines("WARNING"))
    cluster["onsala"].proc.assert_healthy(REFETCH_WARNING)
    cluster["jive"].proc.assert_healthy()


async def test_cut_stream_blocks_go_to_the_others(pair: Cluster) -> None:
    expect = make_file(pair["jive"].export / "f", 12 * MIB)
    # 24 blocks over 4 streams: some stream carries at least 6 (3 MiB), so a cut after 2 MiB
    # always happens (3 MiB + 1234 did not when the streams came out exactly even).
    with proxied_source(pair["jive"], cut_after=2 * MIB + 1234) as proxy:
        async with open_engine(pair.client_config(block_size=BLOCK, streams=4)) as engine:
            t = await engine.copy("jive", "/f", "onsala", "/g", policy="always")
    assert proxy.cuts == 1
    assert_identical(pair["onsala"], "/g", expect, t)


async def test_all_streams_cut_fails_and_resumes(pair: Cluster) -> None:
    """Every data connection cut: the transfer fails, keeps its part file, and a rerun resumes."""
    expect = make_file(pair["jive"].export / "f", 12 * MIB)
    with proxied_source(pair["jive"], cut_after=2 * MIB, cut_count=2) as proxy:
        async with open_engine(pair.client_config(block_size=BLOCK, streams=2)) as engine:
            with pytest.raises(TransferFailed):
                await engine.copy("jive", "/f", "onsala", "/g", policy="always")
            assert part_files(pair["onsala"], "g")
            assert not (pair["onsala"].export / "g").exists()
            first = proxy.block_bytes
            t = await engine.copy("jive", "/f", "onsala", "/g", mode="resume", policy="always")
    assert_identical(pair["onsala"], "/g", expect, t)
    # Lost at the cut: per stream the block being received plus, with 2 requests pipelined,
    # one whose data passed the proxy but whose digest trailer did not.
    assert proxy.block_bytes - first <= 12 * MIB - first + 2 * 2 * BLOCK


async def test_verified_resume_refetches_blocks_of_an_unverified_run(pair: Cluster) -> None:
    """Blocks journaled by a --no-verify run carry no digest: a verified resume fetches them
    again instead of publishing a digest it never checked."""
    expect = make_file(pair["jive"].export / "f", 12 * MIB)
    with proxied_source(pair["jive"], cut_after=2 * MIB, cut_count=2) as proxy:
        async with open_engine(pair.client_config(block_size=BLOCK, streams=2)) as engine:
            with pytest.raises(TransferFailed):
                await engine.copy("jive", "/f", "onsala", "/g", policy="always", verify=False)
            first = proxy.block_bytes
            assert first >= 2 * MIB
            t = await engine.copy("jive", "/f", "onsala", "/g", mode="resume", policy="always")
    assert_identical(pair["onsala"], "/g", expect, t)
    assert proxy.block_bytes - first >= 12 * MIB, "unverified blocks were trusted"
    assert "resuming with 0 of" in pair["onsala"].proc.log()


# --- resume after a killed server or client --------------------------------------------------------------
def _check_resent(proxy_total: int, size: int) -> None:
    resent = proxy_total - size
    assert resent <= MAX_RESENT * size, f"re-sent {resent} bytes of {size} ({resent / size:.1%})"


@pytest.mark.parametrize("victim", ["source", "destination"])
async def test_resume_after_server_killed(pair: Cluster, victim: str) -> None:
    src, dst = pair["jive"], pair["onsala"]
    expect = make_file(src.export / "big", SIZE)
    node = src if victim == "source" else dst
    with proxied_source(src, rate=RATE, stall_at=int(SIZE * 0.4)) as proxy:
        cfg = pair.client_config(block_size=BLOCK, streams=2)
        failures: list[BaseException] = []
        async with open_engine(cfg) as engine:

            async def run() -> None:
                try:
                    await engine.copy("jive", "/big", "onsala", "/copy", policy="always")
                except TransferFailed as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await wait_until(lambda: proxy.block_bytes >= SIZE * 0.4, 30, "40% through the proxy")
                node.kill()
                proxy.resume()
        assert len(failures) == 1, "the copy should fail when a server is killed"
        assert not (dst.export / "copy").exists()
        assert part_files(dst, "copy") == {
            ".copy.etfs-part",
            ".copy.etfs-part.restart",
            ".copy.etfs-part.journal",
        }
        first = proxy.block_bytes
        node.restart()
        if victim == "destination":
            # The restarted destination marked the interrupted record failed, with a reason.
            recs = [r for r in dst.records().values() if r["state"] == "failed"]
            assert recs and "restarted" in recs[0]["reason"]
        proxy.rate = None
        async with open_engine(cfg) as engine:  # a fresh client: no reconnect back-off to wait for
            t = await engine.copy("jive", "/big", "onsala", "/copy", mode="resume", policy="always")
    second = proxy.block_bytes - first
    assert_identical(dst, "/copy", expect, t)
    assert second < 0.7 * SIZE, f"the rerun sent {second} bytes: it did not resume"
    _check_resent(first + second, SIZE)
    assert any("resuming with" in ln for ln in dst.proc.log().splitlines())


async def test_resume_after_client_task_cancelled(pair: Cluster) -> None:
    src, dst = pair["jive"], pair["onsala"]
    expect = make_file(src.export / "big", SIZE)
    with proxied_source(src, rate=RATE, stall_at=int(SIZE * 0.4)) as proxy:
        cfg = pair.client_config(block_size=BLOCK, streams=2)
        async with open_engine(cfg) as engine:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: engine.copy("jive", "/big", "onsala", "/copy", policy="always"))
                await wait_until(lambda: proxy.block_bytes >= SIZE * 0.4, 30, "40% through the proxy")
                nursery.cancel_scope.cancel()
            proxy.resume()
            (ct,) = engine.transfers.values()
            assert ct.state == "cancelled"
            # The destination stopped the transfer and kept what it had.
            await wait_until(
                lambda: dst.records().get(ct.server_transfer_id, {}).get("state") == "failed",
                10,
                "the destination to stop the transfer",
            )
            assert len(part_files(dst, "copy")) == 3
            first = proxy.block_bytes
            proxy.rate = None
            t = await engine.copy("jive", "/big", "onsala", "/copy", mode="resume", policy="always")
    second = proxy.block_bytes - first
    assert_identical(dst, "/copy", expect, t)
    _check_resent(first + second, SIZE)


async def test_resume_after_client_process_killed(pair: Cluster) -> None:
    src, dst = pair["jive"], pair["onsala"]
    expect = make_file(src.export / "big", SIZE)
    with proxied_source(src, rate=RATE, stall_at=int(SIZE * 0.4)) as proxy:
        cfg = pair.client_config(block_size=BLOCK, streams=2)
        spec = client_spec(cfg, "jive", "/big", "onsala", "/copy", policy="always")
        proc = subprocess.Popen(client_command(spec), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            await wait_until(lambda: proxy.block_bytes >= SIZE * 0.4, 30, "40% through the proxy")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            proxy.resume()
        # The control connection vanished: the destination stops the transfer, keeps part + journal.
        await wait_until(
            lambda: any(
                r["state"] == "failed" and "disconnected" in r["reason"] for r in dst.records().values()
            ),
            10,
            "the destination to notice the vanished client",
        )
        assert len(part_files(dst, "copy")) == 3
        first = proxy.block_bytes
        proxy.rate = None
        async with open_engine(cfg) as engine:
            t = await engine.copy("jive", "/big", "onsala", "/copy", mode="resume", policy="always")
    second = proxy.block_bytes - first
    assert_identical(dst, "/copy", expect, t)
    _check_resent(first + second, SIZE)


async def test_overwrite_does_not_resume_a_different_source(pair: Cluster) -> None:
    """A part file of another source file (other size/mtime) is not reused."""
    src, dst = pair["jive"], pair["onsala"]
    make_file(src.export / "big", 12 * MIB, seed=1)
    with proxied_source(src, cut_after=3 * MIB, cut_count=1) as proxy:
        async with open_engine(pair.client_config(block_size=BLOCK, streams=1)) as engine:
            with pytest.raises(TransferFailed):
                await engine.copy("jive", "/big", "onsala", "/copy", policy="always")
            assert len(part_files(dst, "copy")) == 3
            expect = make_file(src.export / "big", 12 * MIB + 1, seed=2)  # a different file now
            first = proxy.block_bytes
            t = await engine.copy("jive", "/big", "onsala", "/copy", mode="resume", policy="always")
    assert_identical(dst, "/copy", expect, t)
    assert proxy.block_bytes - first == 12 * MIB + 1  # everything sent again


# --- disk full ---------------------------------------------------------------------------------------------
async def test_disk_full_before_start(cluster: Cluster, tmpfs: Callable[[Path, str], None]) -> None:
    cluster.add("jive")
    dst = cluster.add("onsala", pre_start=lambda p: tmpfs(p, "20m"))
    make_file(cluster["jive"].export / "big", 30 * MIB)
    async with open_engine(cluster.client_config(block_size=MIB)) as engine:
        with pytest.raises(TransferFailed) as exc:
            await engine.copy("jive", "/big", "onsala", "/copy", policy="always")
    assert exc.value.errno == errno.ENOSPC, exc.value
    assert list(dst.export.iterdir()) == []


async def test_disk_full_during_transfer(cluster: Cluster, tmpfs: Callable[[Path, str], None]) -> None:
    """Two copies that each fit but not together: ENOSPC mid-write, never a complete-looking file;
    the one that failed keeps part file and journal (when blocks arrived) for a re-run."""
    cluster.add("jive")
    dst = cluster.add("onsala", pre_start=lambda p: tmpfs(p, "20m"))
    hashes = {i: make_file(cluster["jive"].export / f"f{i}", 13 * MIB, seed=i) for i in range(2)}
    results: dict[int, ClientTransfer | TransferFailed] = {}
    async with open_engine(cluster.client_config(block_size=BLOCK, streams=2)) as engine:

        async def one(i: int) -> None:
            try:
                results[i] = await engine.copy("jive", f"/f{i}", "onsala", f"/g{i}", policy="always")
            except TransferFailed as exc:
                results[i] = exc

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(one, i)
    failed = [r for r in results.values() if isinstance(r, TransferFailed)]
    assert failed, "20 MiB cannot hold 26 MiB"
    for i, r in results.items():
        out = dst.export / f"g{i}"
        if isinstance(r, TransferFailed):
            assert r.errno == errno.ENOSPC and r.code == FailureCode.NO_SPACE, r
            assert not out.exists()
            assert part_files(dst, f"g{i}") in (
                set(),
                {f".g{i}.etfs-part{x}" for x in ("", ".restart", ".journal")},
            )
        else:
            assert r.state == "done" and sha256(out) == hashes[i]
            assert part_files(dst, f"g{i}") == set()


async def test_disk_full_keeps_part_and_journal_for_the_rerun(
    cluster: Cluster, tmpfs: Callable[[Path, str], None]
) -> None:
    """Disk full at 50%: the transfer fails with ENOSPC (typed "no-space" in its status), keeps
    part file and journal; once there is space, the same copy re-sends only what was missing."""
    src = cluster.add("jive")
    dst = cluster.add("onsala", pre_start=lambda p: tmpfs(p, "24m"))
    size = 16 * MIB
    expect = make_file(src.export / "big", size)
    with proxied_source(src, stall_at=size // 2) as proxy:
        async with open_engine(cluster.client_config(block_size=BLOCK, streams=2)) as engine:
            async with trio.open_nursery() as nursery:
                failure: list[TransferFailed] = []

                async def copy() -> None:
                    with pytest.raises(TransferFailed) as exc:
                        await engine.copy("jive", "/big", "onsala", "/copy", policy="always")
                    failure.append(exc.value)

                nursery.start_soon(copy)
                await wait_until(lambda: proxy.block_bytes >= size // 2, 30, "half of the copy")
                # Someone else fills the disk while the copy waits for its second half.
                with open(dst.export / "filler", "wb") as f:
                    with pytest.raises(OSError) as full:
                        while True:
                            f.write(b"\0" * MIB)
                            f.flush()
                    assert full.value.errno == errno.ENOSPC
                proxy.resume()
            (exc,) = failure
            assert exc.errno == errno.ENOSPC and exc.code == FailureCode.NO_SPACE, exc
            [rec] = [r for r in dst.records().values() if r["destination"].endswith(":/copy")]
            assert rec["state"] == "failed" and rec["errno"] == errno.ENOSPC and rec["code"] == "no-space", (
                rec
            )
            assert part_files(dst, "copy") == {
                ".copy.etfs-part",
                ".copy.etfs-part.restart",
                ".copy.etfs-part.journal",
            }
            assert not (dst.export / "copy").exists()
            # Space again: the same copy resumes from the journal.
            (dst.export / "filler").unlink()
            first = proxy.block_bytes
            t = await engine.copy("jive", "/big", "onsala", "/copy", mode="resume", policy="always")
    second = proxy.block_bytes - first
    assert_identical(dst, "/copy", expect, t)
    assert second < 0.6 * size, f"the re-run re-sent {second} of {size} bytes"


# --- the source changes ------------------------------------------------------------------------------------
async def test_source_changed_after_capability(pair: Cluster) -> None:
    src = pair["jive"].export / "f"
    make_file(src, 4 * MIB)
    async with open_engine(pair.client_config()) as engine:
        cap = await engine.pool["jive"].call(m.TransferOffer(path="/f"))
        cap = msgspec.structs.replace(cap, data_host=cap.data_host or "127.0.0.1")
        with src.open("ab") as f:
            f.write(b"appended after the capability was issued")
        dstc = engine.pool["onsala"]
        started = await dstc.call(m.TransferStart(capability=cap, source_name="jive", path="/g", streams=2))
        with trio.fail_after(20):
            while (info := await dstc.call(m.TransferWait(transfer_id=started.transfer_id))).state not in (
                "done",
                "failed",
            ):
                pass
    assert info.state == "failed" and info.errno == errno.ESTALE, info
    assert not (pair["onsala"].export / "g").exists()
    assert leftovers(pair["onsala"].export) == []


@pytest.mark.parametrize("change", ["rewrite", "append", "truncate"])
async def test_source_changed_during_transfer(pair: Cluster, change: str) -> None:
    src = pair["jive"].export / "big"
    make_file(src, SIZE)
    with proxied_source(pair["jive"], rate=RATE, stall_at=int(SIZE * 0.3)) as proxy:
        failures: list[TransferFailed] = []
        async with open_engine(pair.client_config(block_size=BLOCK, streams=2)) as engine:

            async def run() -> None:
                try:
                    await engine.copy("jive", "/big", "onsala", "/copy", policy="always")
                except TransferFailed as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await wait_until(lambda: proxy.block_bytes >= SIZE * 0.3, 30, "30% through the proxy")
                with src.open("r+b") as f:
                    if change == "rewrite":
                        f.seek(SIZE - 100)
                        f.write(b"X" * 10)
                    elif change == "append":
                        f.seek(0, os.SEEK_END)
                        f.write(b"more")
                    else:
                        f.truncate(SIZE // 2)
                proxy.resume()
    assert len(failures) == 1, "a source that changed mid-transfer must fail the copy"
    assert failures[0].errno == errno.ESTALE, failures[0]
    assert not (pair["onsala"].export / "copy").exists()
    assert leftovers(pair["onsala"].export) == []
