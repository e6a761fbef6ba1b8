"""Bandwidth limits and the cap on concurrent transfers, on real servers and a real mount.

Times are real wall-clock times with wide margins (the machine is shared): 24 MiB at
8 MiB/s must take about 3 s, and never less than the limit allows.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from harness.mount import Env
from harness.transfers import MIB, Cluster, make_file, open_engine, sha256
from test_cp_mounts import digest, random_file, status
from test_etfs_cp import etfs

from etfs.config import PairOverride
from etfs.transfer.engine import ClientTransfer, TransferEngine

pytestmark = pytest.mark.timeout(120)


RATE = "8M"
SIZE = 24 * MIB
# 24 MiB at 8 MiB/s is 3 s (less one 0.1 s burst); a loaded 2-core VM may add a second.
LIMITED = (2.2, 4.5)


def test_etfs_cp_bwlimit(etfs_env: Env) -> None:
    """`etfs cp --bwlimit 8M` between two servers takes as long as the limit says."""
    e = etfs_env
    src = e.export("jive") / "tmp" / "bw.bin"
    random_file(src, SIZE, seed=41)
    m = ["--mount", str(e.mount.root)]
    t0 = time.monotonic()
    r = etfs(e, "cp", *m, "--bwlimit", RATE, "--streams", "4", "jive:/tmp/bw.bin", "onsala:/tmp/bw.bin")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert digest(e.export("onsala") / "tmp" / "bw.bin") == digest(src)
    assert LIMITED[0] <= took <= LIMITED[1], took
    [t] = [t for t in status(e) if t["destination"] == "onsala:/tmp/bw.bin"]
    assert t["state"] == "done" and t["bytes_via_client"] == 0

    # Push: the source sends in both directions, so the limit holds the same way.
    t0 = time.monotonic()
    r = etfs(e, "cp", *m, "--bwlimit", "8192k", "--push", "jive:/tmp/bw.bin", "onsala:/tmp/bw-push.bin")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert digest(e.export("onsala") / "tmp" / "bw-push.bin") == digest(src)
    assert LIMITED[0] <= took <= LIMITED[1], took

    # Unlimited: the same copy works, and much faster than the limit would allow.
    t0 = time.monotonic()
    r = etfs(e, "cp", *m, "jive:/tmp/bw.bin", "onsala:/tmp/bw-free.bin")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert digest(e.export("onsala") / "tmp" / "bw-free.bin") == digest(src)
    assert took < LIMITED[0], took


def test_etfs_cp_bwlimit_local_files(etfs_env: Env, tmp_path: Path) -> None:
    """A local file copied to a server through the mount honours --bwlimit too."""
    e = etfs_env
    local = tmp_path / "local.bin"
    random_file(local, 6 * MIB, seed=43)
    t0 = time.monotonic()
    r = etfs(e, "cp", "--mount", str(e.mount.root), "--bwlimit", "4M", str(local), "onsala:/tmp/")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert digest(e.export("onsala") / "tmp" / "local.bin") == digest(local)
    assert 1.1 <= took <= 3.5, took


@pytest.mark.parametrize("bad", ["fast", "50Mb", "1k", "-3M"])
def test_etfs_cp_bad_bwlimit(etfs_env: Env, bad: str) -> None:
    e = etfs_env
    r = etfs(e, "cp", "--mount", str(e.mount.root), f"--bwlimit={bad}", "jive:/tmp/x", "onsala:/tmp/x")
    assert r.returncode == 2
    assert r.stderr.startswith("etfs: --bwlimit:") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


async def copy_two(engine: TransferEngine, **kw: Any) -> tuple[list[ClientTransfer], float]:
    """Two copies of 12 MiB at once (jive -> onsala); their records and the time both took."""
    done: list[ClientTransfer] = []

    async def one(i: int, direction: str) -> None:
        done.append(await engine.copy("jive", f"/half{i}", "onsala", f"/out{i}", direction=direction, **kw))

    t0 = time.monotonic()
    async with trio.open_nursery() as n:
        n.start_soon(one, 0, "pull")
        n.start_soon(one, 1, "push")
    return done, time.monotonic() - t0


def two_halves(c: Cluster) -> list[str]:
    return [make_file(c["jive"].export / f"half{i}", SIZE // 2, seed=i) for i in range(2)]


@pytest.mark.parametrize("side", ["bwlimit_out", "bwlimit_in"])
async def test_server_cap_shared_by_transfers(cluster: Cluster, side: str) -> None:
    """server.yaml transfer.bwlimit_out (source) / bwlimit_in (destination): all transfers together."""
    cluster.add("jive", transfer={side: RATE} if side == "bwlimit_out" else None)
    cluster.add("onsala", transfer={side: RATE} if side == "bwlimit_in" else None)
    expect = two_halves(cluster)
    async with open_engine(cluster.client_config(block_size=MIB)) as engine:
        done, took = await copy_two(engine)
    assert [t.state for t in done] == ["done", "done"]
    for i in range(2):
        assert sha256(cluster["onsala"].export / f"out{i}") == expect[i]
    assert LIMITED[0] <= took <= LIMITED[1], took
    for node in cluster.nodes.values():
        node.proc.assert_healthy()


@pytest.mark.parametrize("verify", [True, False])
async def test_paced_read_send_and_recv_write(cluster: Cluster, verify: bool) -> None:
    """The other sender and receiver (read+send, recv+write: the bytes pass through the buffer
    and are hashed there) under limits on both sides: same bytes, same digests, the limit held."""
    cluster.add("jive", transfer={"bwlimit_out": "16M", "sender": "read_send"})
    cluster.add("onsala", transfer={"bwlimit_in": RATE, "receiver": "recv_write"})
    expect = two_halves(cluster)
    async with open_engine(cluster.client_config(block_size=MIB)) as engine:
        done, took = await copy_two(engine, verify=verify)
    assert [t.state for t in done] == ["done", "done"]
    assert all(bool(t.digest) == verify for t in done)
    for i in range(2):
        assert sha256(cluster["onsala"].export / f"out{i}") == expect[i]
    assert LIMITED[0] <= took <= LIMITED[1], took


async def test_pair_limit_shared_by_transfers(cluster: Cluster) -> None:
    """mountpoints.yaml `pairs: [{source, destination, bwlimit}]` caps the pair's transfers together."""
    cluster.add("jive")
    cluster.add("onsala")
    expect = two_halves(cluster)
    config = cluster.client_config(block_size=MIB)
    pair = PairOverride("jive", "onsala", bwlimit=8 * MIB)
    async with open_engine(type(config)(**{**config.__dict__, "pairs": (pair,)})) as engine:
        done, took = await copy_two(engine)
        assert [t.state for t in done] == ["done", "done"]
        assert LIMITED[0] <= took <= LIMITED[1], took
        # The other direction is another pair: not limited.
        make_file(cluster["onsala"].export / "back", SIZE, seed=5)
        t0 = time.monotonic()
        await engine.copy("onsala", "/back", "jive", "/back")
        assert time.monotonic() - t0 < LIMITED[0]
    for i in range(2):
        assert sha256(cluster["onsala"].export / f"out{i}") == expect[i]


async def test_relay_honours_limits(cluster: Cluster) -> None:
    """A copy through the client (third_party: never) is held to the limit as well."""
    cluster.add("jive")
    cluster.add("onsala")
    expect = make_file(cluster["jive"].export / "r", 12 * MIB, seed=9)
    async with open_engine(cluster.client_config(third_party="never")) as engine:
        t0 = time.monotonic()
        t = await engine.copy("jive", "/r", "onsala", "/r", bwlimit=8 * MIB)
        took = time.monotonic() - t0
    assert t.kind == "relay" and t.state == "done"
    assert sha256(cluster["onsala"].export / "r") == expect
    assert 1.1 <= took <= 3.5, took


@pytest.mark.parametrize("direction", ["pull", "push"])
async def test_concurrency_cap_queues(cluster: Cluster, direction: str) -> None:
    """transfer.max_active: 1 -> the second copy waits "queued" (in status and in the server's
    records), then completes.  A short data_timeout shows a queued push does not get its data
    connections before it runs (they would time out idle)."""
    cluster.add("jive", transfer={"bwlimit_out": RATE, "data_timeout": 1})  # the first copy: ~1.5 s
    cluster.add("onsala", transfer={"max_active": 1, "data_timeout": 1})
    expect = two_halves(cluster)
    seen_status: set[str] = set()
    seen_records: set[str] = set()
    async with open_engine(cluster.client_config(block_size=MIB, direction=direction)) as engine:
        done: list[ClientTransfer] = []

        async def one(i: int) -> None:
            done.append(await engine.copy("jive", f"/half{i}", "onsala", f"/out{i}"))

        async def watch() -> None:
            overlaps = 0
            while len(done) < 2:
                seen_status.update(t["state"] for t in engine.status())  # what `etfs status` prints
                records = [r["state"] for r in cluster["onsala"].records().values()]
                seen_records.update(records)
                # The server's records decide (the client's view of a finished transfer can lag by
                # one poll); a record file read mid-change is forgiven once, not twice in a row.
                overlaps = overlaps + 1 if records.count("running") > 1 else 0
                if overlaps >= 2:
                    raise AssertionError(f"two transfers ran at once: {records}")
                await trio.sleep(0.05)

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            n.start_soon(one, 0)
            await trio.sleep(0.3)
            n.start_soon(one, 1)
    assert [t.state for t in done] == ["done", "done"]
    assert "queued" in seen_status and "queued" in seen_records
    for i in range(2):
        assert sha256(cluster["onsala"].export / f"out{i}") == expect[i]
    for node in cluster.nodes.values():
        node.proc.assert_healthy()
