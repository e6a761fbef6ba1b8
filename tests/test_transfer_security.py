"""Attacks on transfers (issue 9, items 4-6), from a data-port client of the tests' own
(`raw_pull`, `raw_data_open`: struct, hmac and msgpack maps) and with protocol-level orders.

* A capability means one transfer: bound to its transfer id and destination by its first
  data connection, used up when the transfer ends (done or failed); no reuse.
* Servers are no client's proxy: a server sends nothing a client chose to a listener that
  has not proven it is an etfs data port, link-local and multicast peers are refused by
  default, and every way of not reaching a data port gives one and the same error.
* Connections trickling bytes into the data port do not starve a real transfer.
"""

from __future__ import annotations

import errno
import re
import time
from typing import Any

import msgspec
import pytest
import trio
from harness.process import wait_until
from harness.transfers import (
    MIB,
    Cluster,
    Recorder,
    make_file,
    open_engine,
    proxied_source,
    raw_data_open,
    raw_pull,
    sha256,
)

from etfs.client import RemoteError
from etfs.protocol import messages as m
from etfs.transfer.engine import TransferEngine
from etfs_server.peers import PeerPolicy, PeerRefused, parse_entry

MARK = b"CLIENT-CHOSEN-7f3a9c"  # must never reach a listener that did not prove itself


@pytest.fixture
def pair(cluster: Cluster) -> Cluster:
    cluster.add("jive")
    cluster.add("onsala")
    return cluster


async def _offer(engine: TransferEngine, path: str, host: str = "127.0.0.1") -> m.Capability:
    cap = await engine.pool["jive"].call(m.TransferOffer(path=path))
    return msgspec.structs.replace(cap, data_host=host)


async def _start(engine: TransferEngine, cap: m.Capability, path: str, **kw: Any) -> m.TransferStarted:
    fields: dict[str, Any] = {"source_name": "jive", "path": path, "transfer_id": cap.transfer_id}
    fields.update(kw)
    return await engine.pool["onsala"].call(m.TransferStart(capability=cap, **fields))


async def _end(engine: TransferEngine, transfer_id: str) -> m.TransferInfo:
    with trio.fail_after(30):
        while True:
            info = await engine.pool["onsala"].call(m.TransferWait(transfer_id=transfer_id))
            if info.state in ("done", "failed"):
                return info


# --- a capability means one transfer ----------------------------------------------------------------------
async def test_capability_is_used_up_when_its_transfer_is_done(pair: Cluster) -> None:
    expect = make_file(pair["jive"].export / "f", 3 * MIB)
    port = pair["jive"].data_port
    async with open_engine(pair.client_config()) as engine:
        cap = await _offer(engine, "/f")
        # Before any transfer: the raw client with the capability and its secret is served.
        # (This binds the capability to the raw client's destination...)
        assert raw_pull(port, cap, streams=2)["t"] == "ready"
        # ...so a transfer of the same capability into onsala is refused by the source.
        info = await _end(engine, (await _start(engine, cap, "/g")).transfer_id)
        assert info.state == "failed" and info.errno == errno.EACCES and info.code == "capability-refused"
        assert "another destination" in info.reason, info

        cap = await _offer(engine, "/f")
        started = await _start(engine, cap, "/h", streams=2)
        assert (await _end(engine, started.transfer_id)).state == "done"
        assert sha256(pair["onsala"].export / "h") == expect
        # The transfer is over: the same capability opens nothing any more.
        for hello in ({}, {"destination": "onsala:/h"}, {"transfer_id": "another-id"}):
            reply = raw_pull(port, cap, **hello)
            assert reply["t"] == "error" and reply["errno"] == errno.EACCES, reply
            assert reply["code"] == "capability-refused" and "block" not in reply, reply
        # A new transfer id on the destination is refused there, the same id is taken.
        with pytest.raises(RemoteError) as exc:
            await _start(engine, cap, "/i", transfer_id="bobs-own-transfer")
        assert exc.value.errno == errno.EINVAL
        with pytest.raises(RemoteError) as exc:
            await _start(engine, cap, "/i")
        assert exc.value.errno == errno.EEXIST
    assert not (pair["onsala"].export / "i").exists()


async def test_capability_is_bound_while_running_and_used_up_when_failed(pair: Cluster) -> None:
    make_file(pair["jive"].export / "f", 8 * MIB)
    port = pair["jive"].data_port
    with proxied_source(pair["jive"], stall_at=2 * MIB) as proxy:
        async with open_engine(pair.client_config()) as engine:
            cap = await _offer(engine, "/f", host="127.0.0.2")  # through the proxy, which stalls
            started = await _start(engine, cap, "/g", streams=2, block_size=MIB)
            await wait_until(lambda: proxy.block_bytes >= 2 * MIB, 20, "the transfer to be under way")
            # While it runs: no other transfer id, no other destination, no third connection.
            for hello, why in (
                ({"transfer_id": "another-id"}, "another transfer"),
                ({"destination": "onsala:/elsewhere"}, "another destination"),
                ({"destination": "onsala:/g", "streams": 2}, "all its data connections"),
            ):
                reply = raw_pull(port, cap, **hello)
                assert reply["t"] == "error" and why in reply["message"], (hello, reply)
            await engine.pool["onsala"].call(m.TransferCancel(transfer_id=started.transfer_id))
            proxy.resume()
            info = await _end(engine, started.transfer_id)
            assert info.state == "failed" and info.code == "cancelled", info
            # Failed is over, too.
            await wait_until(
                lambda: "used up" in raw_pull(port, cap, destination="onsala:/g")["message"],
                10,
                "the capability to be used up",
            )
            reply = raw_pull(port, cap, destination="onsala:/g")
            assert "used up" in reply["message"], reply


async def test_a_secret_is_needed_to_open_a_data_connection(pair: Cluster) -> None:
    make_file(pair["jive"].export / "f", MIB)
    async with open_engine(pair.client_config()) as engine:
        cap = await _offer(engine, "/f")
    # The token alone (the secret guessed): the port does not even greet.
    assert (
        raw_pull(pair["jive"].data_port, msgspec.structs.replace(cap, secret=b"guess" * 6))["t"] == "unknown"
    )
    # The right secret, but a hello without the proof: closed without a reply.
    hello = {
        "kind": "pull",
        "token": cap.token,
        "transfer_id": cap.transfer_id,
        "stream": 0,
        "proof": b"x" * 32,
    }
    sock = raw_data_open(pair["jive"].data_port, cap.secret, hello)
    assert sock is not None
    with sock:
        sock.settimeout(5)
        assert sock.recv(100) == b""


# --- servers are no client's proxy ----------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["pull", "push"])
async def test_nothing_client_chosen_reaches_a_non_etfs_listener(pair: Cluster, direction: str) -> None:
    make_file(pair["jive"].export / "f", MIB)
    chatty = Recorder(answer=b"HTTP/1.0 200 OK\r\nServer: not-etfs\r\n\r\n" + b"x" * 64)
    silent = Recorder()
    closed = Recorder()
    closed.close()  # a port nobody listens on (connection refused)
    reasons = {}
    try:
        async with open_engine(pair.client_config()) as engine:
            for name, target in (("chatty", chatty), ("silent", silent), ("closed", closed)):
                cap = await _offer(engine, "/f")
                if direction == "pull":
                    # The client points the destination at the listener, with bytes of its choice.
                    forged = msgspec.structs.replace(
                        cap, data_port=target.port, token=MARK * 3, secret=MARK, path="/" + MARK.decode()
                    )
                    started = await _start(engine, forged, "/" + MARK.decode(), source_name=MARK.decode())
                    info = await _end(engine, started.transfer_id)
                    assert info.state == "failed", info
                    reasons[name] = (info.errno, info.code, info.reason.replace(str(target.port), "PORT"))
                else:
                    # The client points the source at the listener with a ticket of its choice.
                    await engine.pool["jive"].call(
                        m.TransferPush(
                            capability=cap, ticket=MARK * 2, host="127.0.0.1", port=target.port, streams=2
                        ),
                    )
                    log = pair["jive"].proc
                    await log.wait_for_log(rf"push of /f, stream 1: .*:{target.port}", timeout=15)
                    line = [
                        ln for ln in log.log().splitlines() if f":{target.port}" in ln and "push of" in ln
                    ][-1]
                    reasons[name] = (
                        0,
                        "",
                        re.sub(r"^.*?push of /f, stream \d", "push", line).replace(str(target.port), "PORT"),
                    )
    finally:
        chatty.close()
        silent.close()
    # What the listeners received: at most the 40-byte opener, never anything the client chose.
    got = chatty.received + silent.received
    assert got, "the server never connected"
    for data in got:
        assert len(data) <= 40 and data[:8] in (b"", b"ETFSDAT2"[: len(data)]), data
        assert MARK not in data and MARK[:8] not in data
    # One answer for every way of not finding a data port: nothing maps the network.
    assert len(set(reasons.values())) == 1, reasons
    (reason,) = set(reasons.values())
    assert "no etfs data port answered at 127.0.0.1:PORT" in reason[2], reason
    if direction == "pull":
        assert reason[:2] == (errno.EHOSTUNREACH, "peer-unreachable"), reason


async def test_link_local_and_multicast_peers_are_refused_by_default(pair: Cluster) -> None:
    make_file(pair["jive"].export / "f", MIB)
    async with open_engine(pair.client_config()) as engine:
        for host in ("169.254.169.254", "fe80::1", "224.0.0.1", "0.0.0.0"):
            cap = await _offer(engine, "/f", host=host)
            with pytest.raises(RemoteError) as exc:
                await _start(engine, cap, "/g")
            assert exc.value.errno == errno.EACCES and "transfer.peers" in str(exc.value), exc.value
            with pytest.raises(RemoteError) as exc:
                await engine.pool["jive"].call(
                    m.TransferPush(capability=cap, ticket=b"t" * 24, host=host, port=80, streams=1)
                )
            assert exc.value.errno == errno.EACCES, exc.value


def test_peer_policy_special_addresses() -> None:
    default = PeerPolicy()
    for host in ("127.0.0.1", "10.1.2.3", "192.0.2.7", "::1", "2001:db8::1"):
        default.check_host(host)
    for host in (
        "169.254.169.254",
        "fe80::1",
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "::",
        "::ffff:169.254.169.254",
    ):
        with pytest.raises(PeerRefused):
            default.check_host(host)
    wide = PeerPolicy((parse_entry("0.0.0.0/0"),))
    wide.check_host("10.0.0.1")
    with pytest.raises(PeerRefused):
        wide.check_host("169.254.169.254")  # a wide entry does not list the special ones
    own = PeerPolicy((parse_entry("169.254.10.0/24"),))
    own.check_host("169.254.10.5")
    with pytest.raises(PeerRefused):
        own.check_host("169.254.169.254")


# --- the data port under a trickle -----------------------------------------------------------------------
async def test_trickling_connections_do_not_starve_a_transfer(pair: Cluster) -> None:
    """300 connections sending a byte now and then (before: a real transfer failed after 32 s)."""
    expect = make_file(pair["jive"].export / "f", 8 * MIB)
    port = pair["jive"].data_port
    async with trio.open_nursery() as nursery:

        async def trickle() -> None:
            try:
                s = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            async with s:
                try:
                    for _ in range(120):
                        await s.send_all(b"E")
                        await trio.sleep(0.5)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

        for _ in range(300):
            nursery.start_soon(trickle)
        await trio.sleep(1.0)
        async with open_engine(pair.client_config(block_size=MIB, streams=4)) as engine:
            t0 = time.monotonic()
            with trio.fail_after(30):
                t = await engine.copy("jive", "/f", "onsala", "/g", policy="always")
            took = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    assert t.state == "done" and sha256(pair["onsala"].export / "g") == expect
    assert took < 10, f"the transfer took {took:.1f} s under the trickle"
    await pair["jive"].proc.wait_for_log("evicted the oldest", timeout=5)
