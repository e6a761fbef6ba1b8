"""Transfers across network namespaces: servers that cannot reach each other, one-way reachability.

Topology (names unique per run, removed in the fixture's finalizer):

    client ns c --veth-- ns a (jive, the source)       c: 10.201.1.1   a: 10.201.1.2
                --veth-- ns b (onsala, the destination) c: 10.201.2.1   b: 10.201.2.2
    optional:   ns a --veth-- ns b                      a: 10.201.3.1   b: 10.201.3.2

a and b have no route to each other's client-facing subnet.  The client (a subprocess run
with ``ip netns exec c``) reaches both.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from harness.netlab import NetLab
from harness.transfers import MIB, Cluster, Node, client_spec, leftovers, make_file, run_client, sha256

from etfs.config import ClientConfig, ServerEntry, TransferDefaults

pytestmark = pytest.mark.timeout(180)

SIZE = 6 * MIB + 321


def _config(cluster: Cluster, peer_b: tuple[str, int] | None = None) -> ClientConfig:
    key = cluster.key_file
    assert key is not None
    servers = {
        "jive": ServerEntry("jive", (("10.201.1.2", 7070),), "u", key, "d"),
        "onsala": ServerEntry("onsala", (("10.201.2.2", 7070),), "u", key, "d", peer_address=peer_b),
    }
    return ClientConfig(
        file=cluster.base / "m.yaml",
        root=cluster.base / "mnt",
        servers=servers,
        transfer=TransferDefaults(streams=4, block_size=MIB),
    )


def _topology(lab: NetLab, a_to_b: bool) -> tuple[str, str, str]:
    c, a, b = lab.namespace("c"), lab.namespace("a"), lab.namespace("b")
    lab.link(c, "10.201.1.1", a, "10.201.1.2")
    lab.link(c, "10.201.2.1", b, "10.201.2.2")
    if a_to_b:
        lab.link(a, "10.201.3.1", b, "10.201.3.2")
    return c, a, b


def _server(cluster: Cluster, lab: NetLab, name: str, ns: str, data_listen: str) -> Node:
    """Server ``name`` inside ``ns``: control port 7070 on every address, data port as given."""
    return cluster.add(name, prefix=tuple(lab.prefix(ns)), listen="0.0.0.0:7070", data_listen=data_listen)


def _client(lab: NetLab, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return run_client(spec, tuple(lab.prefix(ns)))


async def test_unreachable_pair_falls_back_to_relay(netlab: NetLab, cluster: Cluster) -> None:
    lab = netlab
    c, a, b = _topology(lab, a_to_b=False)
    jive = _server(cluster, lab, "jive", a, "0.0.0.0:7071")
    onsala = _server(cluster, lab, "onsala", b, "0.0.0.0:7071")
    expect = make_file(jive.export / "f", SIZE)
    cfg = _config(cluster)

    # auto: the third-party transfer cannot connect (no route), the engine relays.
    out = _client(lab, c, client_spec(cfg, "jive", "/f", "onsala", "/auto", policy="auto"))
    assert "errno" not in out, out
    assert out["kind"] == "relay" and out["state"] == "done", out
    assert out["bytes_via_client"] == SIZE
    assert out["kinds"] == ["third-party", "relay"]
    assert sha256(onsala.export / "auto") == expect
    failed = [r for r in onsala.records().values() if r["state"] == "failed"]
    assert len(failed) == 1 and failed[0]["errno"] in (errno.ENETUNREACH, errno.EHOSTUNREACH), failed

    # always: a clear failure, nothing at the destination.
    out = _client(lab, c, client_spec(cfg, "jive", "/f", "onsala", "/always", policy="always"))
    assert out.get("errno") in (errno.ENETUNREACH, errno.EHOSTUNREACH), out
    assert "data port" in out["error"]
    assert not (onsala.export / "always").exists()

    # never: relay without trying.
    out = _client(lab, c, client_spec(cfg, "jive", "/f", "onsala", "/never", policy="never"))
    assert out["kinds"] == ["relay"] and out["bytes_via_client"] == SIZE, out
    assert sha256(onsala.export / "never") == expect
    assert leftovers(onsala.export) == []


async def test_push_when_only_the_source_can_connect(netlab: NetLab, cluster: Cluster) -> None:
    """jive's data port is only on the client-facing address, which onsala cannot reach;
    onsala's data port is reachable from jive over the a-b link: push works, pull cannot."""
    lab = netlab
    c, a, b = _topology(lab, a_to_b=True)
    jive = _server(cluster, lab, "jive", a, "10.201.1.2:7071")
    onsala = _server(cluster, lab, "onsala", b, "0.0.0.0:7071")
    expect = make_file(jive.export / "f", SIZE)
    cfg = _config(cluster, peer_b=("10.201.3.2", 7070))  # where other servers reach onsala

    out = _client(
        lab, c, client_spec(cfg, "jive", "/f", "onsala", "/pushed", direction="push", policy="always")
    )
    assert out.get("state") == "done", out
    assert out["kind"] == "third-party" and out["bytes_via_client"] == 0 and out["direction"] == "push"
    assert sha256(onsala.export / "pushed") == expect
    rec = onsala.records()[out["server_transfer_id"]]
    assert rec["state"] == "done" and rec["direction"] == "push"

    out = _client(
        lab, c, client_spec(cfg, "jive", "/f", "onsala", "/pulled", direction="pull", policy="always")
    )
    assert out.get("errno") in (errno.ENETUNREACH, errno.EHOSTUNREACH), out
    assert not (onsala.export / "pulled").exists()
    assert leftovers(onsala.export) == []
