"""TLS on both connections: control (client <-> server) and data (server <-> server).

Two real servers with certificates from one test CA (trustme); each verifies the other's
data port with `tls.ca_file`.  A plaintext data hello to a TLS data port gets nowhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme
from harness.server import ServerProcess, make_key, write_server_yaml

from etfs.client import Pool
from etfs.config import ClientConfig, ServerEntry, TLSClientOptions
from etfs.protocol import data as d
from etfs.transfer.engine import TransferEngine


@contextlib.contextmanager
def tls_servers(
    tmp_path: Path, transfer: dict[str, str] | None = None
) -> Iterator[tuple[dict[str, ServerProcess], ClientConfig, trustme.CA]]:
    """jive and onsala with certificates of one test CA (``transfer``: server.yaml extras)."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    make_key(tmp_path / "u.key")
    servers: dict[str, ServerProcess] = {}
    try:
        yield _start(tmp_path, ca, ca_file, servers, transfer)
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture
def tls_pair(tmp_path: Path) -> Iterator[tuple[dict[str, ServerProcess], ClientConfig, trustme.CA]]:
    with tls_servers(tmp_path) as pair:
        yield pair


def _start(
    tmp_path: Path,
    ca: trustme.CA,
    ca_file: Path,
    servers: dict[str, ServerProcess],
    transfer: dict[str, str] | None = None,
) -> tuple[dict[str, ServerProcess], ClientConfig, trustme.CA]:
    for name in ("jive", "onsala"):
        d_ = tmp_path / name
        (d_ / "export" / "tmp").mkdir(parents=True)
        pem = d_ / "server.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        cfg = write_server_yaml(
            d_ / "server.yaml",
            name=name,
            exports={
                name: {"path": str(d_ / "export"), "acl": [{"who": "u", "path": "/", "rights": ["all"]}]}
            },
            users={"u": {"key_file": str(tmp_path / "u.key")}},
            extra={
                "tls": {"cert_file": str(pem), "key_file": str(pem), "ca_file": str(ca_file)},
                **({"transfer": transfer} if transfer else {}),
            },
        )
        servers[name] = ServerProcess(cfg, d_).start()
    tls = TLSClientOptions(ca_file=ca_file, server_hostname="127.0.0.1")
    config = ClientConfig(
        file=tmp_path / "mountpoints.yaml",
        root=tmp_path / "root",
        servers={
            n: ServerEntry(n, (("127.0.0.1", s.control_port),), "u", tmp_path / "u.key", tls=tls)
            for n, s in servers.items()
        },
    )
    return servers, config, ca


@pytest.mark.parametrize("direction", ["pull", "push"])
async def test_transfer_over_tls(
    tls_pair: tuple[dict[str, ServerProcess], ClientConfig, trustme.CA], direction: str
) -> None:
    servers, config, _ = tls_pair
    src = servers["jive"].config.parent / "export" / "tmp" / "f"
    data = os.urandom(9 * 2**20 + 5)
    src.write_bytes(data)
    async with trio.open_nursery() as nursery:
        pool = Pool(config, nursery)
        t = await TransferEngine(pool, config).copy(
            "jive", "/tmp/f", "onsala", "/tmp/f", streams=3, direction=direction
        )
        assert t.state == "done" and t.bytes_via_client == 0
        nursery.cancel_scope.cancel()
    got = (servers["onsala"].config.parent / "export" / "tmp" / "f").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def test_limited_transfer_over_tls(tmp_path: Path) -> None:
    """transfer.bwlimit on both servers: the source paces its TLS sends, the destination its
    TLS reads (both through the buffer, hashed there); 12 MiB at 8 MiB/s takes ~1.5 s."""
    with tls_servers(tmp_path, transfer={"bwlimit": "8M"}) as (servers, config, _):
        data = os.urandom(12 * 2**20)
        (servers["jive"].config.parent / "export" / "tmp" / "f").write_bytes(data)
        async with trio.open_nursery() as nursery:
            pool = Pool(config, nursery)
            t0 = trio.current_time()
            t = await TransferEngine(pool, config).copy("jive", "/tmp/f", "onsala", "/tmp/f", streams=3)
            took = trio.current_time() - t0
            assert t.state == "done" and t.digest
            nursery.cancel_scope.cancel()
        got = (servers["onsala"].config.parent / "export" / "tmp" / "f").read_bytes()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert 1.1 <= took <= 3.5, took


def test_plaintext_data_hello_is_refused(
    tls_pair: tuple[dict[str, ServerProcess], ClientConfig, trustme.CA],
) -> None:
    servers, _, ca = tls_pair
    port = servers["jive"].data_port
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(d.encode(d.DataHello(kind="pull", token=b"x" * 40, transfer_id="t", stream=0)))
        try:
            reply = s.recv(100)
        except (ConnectionResetError, TimeoutError):
            reply = b""
        # A TLS server answers garbage with a TLS alert record (type 21) or just closes.
        assert reply == b"" or reply[:1] == b"\x15", reply
    # With TLS and the CA, the same port speaks (and refuses the unknown key properly).
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        s.sendall(d.OPEN.pack(d.MAGIC, b"k" * 16, b"n" * 16))
        got = b""
        while len(got) < d.GREETING.size and (chunk := s.recv(d.GREETING.size - len(got))):
            got += chunk
        magic, status, _, _ = d.GREETING.unpack(got)
        assert (magic, status) == (d.MAGIC, d.GREET_UNKNOWN)
