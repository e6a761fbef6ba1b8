"""Regression tests for review findings in the transfer service (real servers on loopback)."""

from __future__ import annotations

import errno

import msgspec
import pytest
import trio
from harness.transfers import MIB, Cluster, make_file, open_engine, proxied_source, raw_data_open, sha256

from etfs.client import Pool, RemoteError
from etfs.common.excgroups import single_errors
from etfs.protocol import messages as m
from etfs.transfer.engine import TransferFailed


@pytest.fixture
def pair(cluster: Cluster) -> Cluster:
    cluster.add("jive")
    cluster.add("onsala")
    return cluster


async def _offer(engine_pool: Pool, path: str) -> m.Capability:
    cap = await engine_pool["jive"].call(m.TransferOffer(path=path))
    return msgspec.structs.replace(cap, data_host="127.0.0.1")


async def test_two_transfers_into_one_file_are_serialized(pair: Cluster) -> None:
    """They would share the part file: the second is refused (EBUSY) while the first runs."""
    a = make_file(pair["jive"].export / "a", 24 * MIB, seed=1)
    make_file(pair["jive"].export / "b", 24 * MIB, seed=2)
    # The proxy stops after 4 MiB until resumed: the first copy cannot end before the second starts.
    with proxied_source(pair["jive"], rate=20 * MIB, stall_at=4 * MIB) as proxy:
        async with open_engine(pair.client_config(block_size=MIB, streams=2)) as engine:
            result = {}

            async def first() -> None:
                result["a"] = await engine.copy("jive", "/a", "onsala", "/x")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                with trio.fail_after(20):
                    while not any(t.state == "running" for t in engine.transfers.values()):
                        await trio.sleep(0.02)
                cap = await _offer(engine.pool, "/b")
                try:
                    with pytest.raises(RemoteError) as exc:
                        await engine.pool["onsala"].call(
                            m.TransferStart(capability=cap, source_name="jive", path="/x")
                        )
                    assert exc.value.errno == errno.EBUSY
                finally:
                    proxy.resume()
    assert result["a"].state == "done"
    assert sha256(pair["onsala"].export / "x") == a


async def test_transfer_ids_cannot_name_files(pair: Cluster) -> None:
    make_file(pair["jive"].export / "f", MIB)
    async with open_engine(pair.client_config()) as engine:
        cap = await _offer(engine.pool, "/f")
        for bad in ("../escaped", "../../escaped", "../../../escaped", "a/b", "x" * 65, "."):
            with pytest.raises(RemoteError) as exc:
                await engine.pool["onsala"].call(
                    m.TransferStart(capability=cap, source_name="jive", path="/g", transfer_id=bad),
                )
            assert exc.value.errno == errno.EINVAL
    # Had an id been used as a file name, escaped* would now lie somewhere under the cluster.
    assert not list(pair.base.rglob("escaped*"))


async def test_other_users_transfers_are_invisible(pair: Cluster) -> None:
    make_file(pair["jive"].export / "f", MIB)
    async with open_engine(pair.client_config()) as engine:
        t = await engine.copy("jive", "/f", "onsala", "/g")
        dst = engine.pool["onsala"]
        # Same user: visible.
        info = await dst.call(m.TransferWait(transfer_id=t.server_transfer_id, timeout=0))
        assert info.state == "done"
    # The record's owner is stored; a different owner name is "no such transfer".
    rec = pair["onsala"].record(t.server_transfer_id)
    assert rec["user"] and rec["state"] == "done"


async def test_surplus_push_connections_do_not_hurt_the_server(pair: Cluster) -> None:
    """More data connections than streams with a valid ticket: refused, server keeps serving."""
    make_file(pair["jive"].export / "f", 8 * MIB)
    async with open_engine(pair.client_config(block_size=MIB, streams=1, direction="push")) as engine:
        cap = await _offer(engine.pool, "/f")
        started = await engine.pool["onsala"].call(
            m.TransferStart(capability=cap, source_name="jive", path="/g", direction="push", streams=1),
        )
        socks = []
        try:
            for i in range(4):  # the channel holds one; the rest must be refused cleanly
                hello = {
                    "kind": "push",
                    "token": started.ticket,
                    "transfer_id": started.transfer_id,
                    "stream": i,
                }
                s = raw_data_open(pair["onsala"].data_port, started.ticket, hello)
                assert s is not None, "the destination does not know its own ticket"
                socks.append(s)
            await engine.pool["onsala"].call(m.TransferCancel(transfer_id=started.transfer_id))
        finally:
            for s in socks:
                s.close()
        # Still alive and serving.
        t = await engine.copy("jive", "/f", "onsala", "/h", direction="pull")
        assert t.state == "done"
    pair["onsala"].proc.assert_healthy(r"push refused|data connection from|stream \d|failed")


def test_single_errors_unwraps_oserrors_only() -> None:
    with pytest.raises(FileNotFoundError):
        with single_errors():
            raise BaseExceptionGroup("g", [FileNotFoundError(2, "gone"), ValueError("x")])
    with pytest.raises(BaseExceptionGroup):
        with single_errors():
            raise BaseExceptionGroup("g", [KeyboardInterrupt()])


async def test_silent_source_fails_the_transfer_in_bounded_time(cluster: Cluster) -> None:
    """A source that stops sending (no RST, no FIN) must not hang the transfer or the cp."""
    cluster.add("jive")
    cluster.add("onsala", transfer={"data_timeout": 1.0})
    make_file(cluster["jive"].export / "f", 32 * MIB)
    with proxied_source(cluster["jive"], rate=8 * MIB) as proxy:
        async with open_engine(
            cluster.client_config(block_size=MIB, streams=2, third_party="always")
        ) as engine:
            failures: list[OSError] = []

            async def run() -> None:
                try:
                    await engine.copy("jive", "/f", "onsala", "/g")
                except OSError as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                with trio.fail_after(20):
                    while proxy.block_bytes < 2 * MIB:
                        await trio.sleep(0.02)
                proxy.stall()
                t0 = trio.current_time()
                with trio.fail_after(15):
                    while not failures:
                        await trio.sleep(0.05)
                assert trio.current_time() - t0 < 10
            proxy.resume()
    assert failures and failures[0].errno == errno.ETIMEDOUT, failures
    assert not (cluster["onsala"].export / "g").exists()


@pytest.mark.parametrize("direction", ["pull", "push"])
async def test_peers_allow_list_limits_data_connections(cluster: Cluster, direction: str) -> None:
    """transfer.peers: a server opens data connections only to listed networks (the address
    comes from the client, so without the list any host:port could be reached)."""
    # The side that connects out: the destination when pulling, the source when pushing.
    outbound = "onsala" if direction == "pull" else "jive"
    for name in ("jive", "onsala"):
        cluster.add(name, transfer={"peers": ["192.0.2.0/24"]} if name == outbound else None)
    make_file(cluster["jive"].export / "f", 3 * MIB)
    async with open_engine(cluster.client_config(block_size=MIB)) as engine:
        with pytest.raises(TransferFailed) as exc:
            with trio.fail_after(30):
                await engine.copy("jive", "/f", "onsala", "/g", direction=direction, policy="always")
    assert exc.value.errno == errno.EACCES, exc.value
    assert "transfer.peers" in str(exc.value), exc.value
    assert not (cluster["onsala"].export / "g").exists()


async def test_peers_allow_list_lets_listed_networks_through(cluster: Cluster) -> None:
    for name in ("jive", "onsala"):
        cluster.add(name, transfer={"peers": ["127.0.0.0/8", "::1"]})
    expect = make_file(cluster["jive"].export / "f", 3 * MIB)
    async with open_engine(cluster.client_config(block_size=MIB)) as engine:
        for direction in ("pull", "push"):
            t = await engine.copy(
                "jive", "/f", "onsala", f"/{direction}", direction=direction, policy="always"
            )
            assert t.state == "done" and t.bytes_via_client == 0
            assert sha256(cluster["onsala"].export / direction) == expect
