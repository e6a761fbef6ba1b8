"""Authentication (HMAC challenge-response, replay, mutual proof, timeout, TLS) and ACLs, against a
real `etfs-server` process on loopback."""

from __future__ import annotations

import errno
import os
import ssl
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import trio
import trustme
from harness.server import RawClient, ServerProcess, Setup, standard_setup

from etfs.client.connection import ConnectionLost, Endpoint, RemoteError, ServerClient, TLSError
from etfs.protocol import auth
from etfs.protocol import messages as m
from etfs.protocol.connection import Role
from etfs.protocol.trio_stream import MessageStream


# --- authentication --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Setup]]:
    setup = standard_setup(tmp_path_factory.mktemp("auth"), extra={"handshake_timeout": 0.5})
    sp = ServerProcess(setup.config, setup.dir)
    try:
        sp.start()
        yield sp, setup
    finally:
        sp.stop()
    sp.assert_healthy(r"authentication failed", r"handshake timed out", r"protocol error")


async def test_good_login(auth_server: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    sp, setup = auth_server
    c = sp.client(nursery, "alice", setup.keys["alice"])
    await c.call(m.Ping())  # its reply is checked to be None (m.decode_reply)
    welcome = await c.welcome()
    assert welcome.data_port == sp.data_port
    await c.aclose()


async def test_unknown_user(auth_server: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    sp, setup = auth_server
    c = sp.client(nursery, "mallory", setup.keys["alice"])
    with pytest.raises(RemoteError) as ei:
        await c.call(m.Ping())
    assert ei.value.errno == errno.EACCES
    await sp.wait_for_log(r"authentication failed for user 'mallory' \(unknown user\)")


async def test_wrong_key(auth_server: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    sp, setup = auth_server
    c = sp.client(nursery, "alice", setup.keys["bob"])
    with pytest.raises(RemoteError) as ei:
        await c.call(m.Ping())
    assert ei.value.errno == errno.EACCES
    await sp.wait_for_log(r"authentication failed for user 'alice' \(wrong key\)")


async def test_unknown_export(auth_server: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    sp, setup = auth_server
    c = sp.client(nursery, "alice", setup.keys["alice"], export="nope")
    with pytest.raises(RemoteError) as ei:
        await c.call(m.Ping())
    assert ei.value.errno == errno.ENOENT


async def test_replayed_prove_is_refused(auth_server: tuple[ServerProcess, Setup]) -> None:
    sp, setup = auth_server
    # Connection 1: a genuine login, recording the client's Hello and Prove.
    first = await RawClient.connect(sp.control_port)
    nonce = auth.new_nonce()
    hello = m.Hello(m.PROTOCOL_VERSION, "alice", "", nonce)
    await first.send(hello)
    ch = await first.receive()
    assert isinstance(ch, m.Challenge)
    prove = m.Prove(auth.client_proof(setup.keys["alice"], ch.nonce, nonce, "alice", ""))
    await first.send(prove)
    assert isinstance(await first.receive(), m.Welcome)
    await first.aclose()
    # Connection 2: an eavesdropper replays both messages verbatim.
    second = await RawClient.connect(sp.control_port)
    try:
        await second.send(hello)
        ch2 = await second.receive()
        assert isinstance(ch2, m.Challenge) and ch2.nonce != ch.nonce
        await second.send(prove)
        reply = await second.receive()
        assert isinstance(reply, m.Err) and reply.errno == errno.EACCES
        assert await second.receive() is None  # and the connection is closed
    finally:
        await second.aclose()


async def test_wrong_protocol_version(auth_server: tuple[ServerProcess, Setup]) -> None:
    sp, _ = auth_server
    raw = await RawClient.connect(sp.control_port)
    try:
        await raw.send(m.Hello(99, "alice", "", auth.new_nonce()))
        reply = await raw.receive()
        assert isinstance(reply, m.Err) and reply.errno == errno.EPROTONOSUPPORT
    finally:
        await raw.aclose()


async def test_request_before_auth_gets_error_and_nothing_else(
    auth_server: tuple[ServerProcess, Setup],
) -> None:
    sp, _ = auth_server
    raw = await RawClient.connect(sp.control_port)
    try:
        await raw.send_body(
            msgspec.msgpack.encode(
                {"t": "call", "id": 1, "req": {"t": "stat", "path": "/private/secret.txt"}}
            )
        )
        reply = await raw.receive()
        assert isinstance(reply, m.Err) and reply.errno == errno.EPROTO and reply.id == 0
        assert await raw.receive() is None
    finally:
        await raw.aclose()


async def test_silent_client_dropped_after_handshake_timeout(
    auth_server: tuple[ServerProcess, Setup],
) -> None:
    sp, _ = auth_server
    silent = await RawClient.connect(sp.control_port)
    half = await RawClient.connect(sp.control_port)
    try:
        await half.send(m.Hello(m.PROTOCOL_VERSION, "alice", "", auth.new_nonce()))
        assert isinstance(await half.receive(), m.Challenge)
        start = trio.current_time()
        assert await silent.receive(timeout=5) is None  # closed by the server (timeout 0.5 s)
        assert await half.receive(timeout=5) is None  # never sent Prove: dropped too
        assert trio.current_time() - start < 3
    finally:
        await silent.aclose()
        await half.aclose()
    await sp.wait_for_log(r"handshake timed out")


async def fake_server(listener: trio.SocketListener, key: bytes) -> None:
    """Accepts one client and runs the server side of the handshake with ``key``."""
    stream = await listener.accept()
    async with stream:
        ms = MessageStream(stream, Role.SERVER)
        hello = await ms.receive()
        assert isinstance(hello, m.Hello)
        sn = auth.new_nonce()
        await ms.send(m.Challenge(m.PROTOCOL_VERSION, sn, "impostor"))
        prove = await ms.receive()
        assert isinstance(prove, m.Prove)
        # Accept anything and "prove" with the wrong key.
        await ms.send(m.Welcome(auth.server_proof(key, sn, hello.nonce, hello.user, hello.export), 1, ""))
        await trio.sleep(1)


async def test_client_detects_server_with_wrong_key(nursery: trio.Nursery) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(fake_server, listeners[0], b"w" * 32)
    ep = Endpoint("fake", (("127.0.0.1", port),), "alice", b"r" * 32, connect_timeout=5)
    c = ServerClient(ep, nursery)
    with pytest.raises(RemoteError) as ei:
        await c.call(m.Ping())
    assert ei.value.errno == errno.EACCES
    assert "could not prove" in str(ei.value)
    await listeners[0].aclose()


async def test_client_accepts_fake_server_with_right_key(nursery: trio.Nursery) -> None:
    """The control for the test above: the same fake server with the right key is accepted."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(fake_server, listeners[0], b"r" * 32)
    c = ServerClient(Endpoint("fake", (("127.0.0.1", port),), "alice", b"r" * 32), nursery)
    welcome = await c.welcome()
    assert welcome.data_port == 1
    await c.aclose()
    await listeners[0].aclose()


# --- TLS -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Setup, trustme.CA]]:
    base = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    tls = {
        "cert_file": str(base / "server.pem"),
        "key_file": str(base / "server.pem"),
        "ca_file": str(base / "ca.pem"),
    }
    setup = standard_setup(base, extra={"tls": tls})
    sp = ServerProcess(setup.config, setup.dir)
    try:
        sp.start()
        yield sp, setup, ca
    finally:
        sp.stop()
    # TLS failures of the negative tests are logged at INFO ("connection lost"), nothing worse.
    sp.assert_healthy(r"handshake timed out")


async def test_tls_works(tls_server: tuple[ServerProcess, Setup, trustme.CA], nursery: trio.Nursery) -> None:
    sp, setup, ca = tls_server
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    c = sp.client(nursery, "alice", setup.keys["alice"], ssl_context=ctx)
    opened = await c.call(m.Create(path="/tmp/tls.txt", mode=0o644, flags=os.O_RDWR))
    assert await c.call(m.Write(handle=opened.handle, offset=0, data=b"over tls")) == 8
    assert await c.call(m.Read(handle=opened.handle, offset=0, size=100)) == b"over tls"
    await c.call(m.Close(handle=opened.handle))
    assert (setup.export / "tmp" / "tls.txt").read_bytes() == b"over tls"
    await c.aclose()


async def test_tls_client_without_ca_fails_cleanly(
    tls_server: tuple[ServerProcess, Setup, trustme.CA], nursery: trio.Nursery
) -> None:
    sp, setup, ca = tls_server
    c = sp.client(nursery, "alice", setup.keys["alice"], ssl_context=ssl.create_default_context())
    # Refused for good (the mount reports it as a refusal, not as "unreachable").
    with pytest.raises(TLSError) as ei:
        await c.call(m.Ping())
    assert "CERTIFICATE_VERIFY_FAILED" in str(ei.value) or "certificate" in str(ei.value).lower()
    # A plaintext client against the TLS port fails cleanly, too.
    plain = sp.client(nursery, "alice", setup.keys["alice"], connect_timeout=3)
    with pytest.raises(ConnectionLost):
        await plain.call(m.Ping())
    # ...and the server is still fine for a proper client.
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    good = sp.client(nursery, "alice", setup.keys["alice"], ssl_context=ctx)
    await good.call(m.Ping())
    await good.aclose()


# --- ACL -------------------------------------------------------------------------------------------
ACL_RULES: list[dict[str, Any]] = [
    {"who": "alice", "path": "/tmp", "rights": "all"},
    {"who": "@staff", "path": "/private", "rights": ["read", "list"]},
    {"who": "@ops", "path": "/tmp/ops", "rights": ["read", "list"]},
    # bob: every right on /tmp/bob-<right> except <right> itself.
    *(
        {
            "who": "bob",
            "path": f"/tmp/bob-{right}",
            "rights": [
                r for r in ("read", "write", "list", "delete", "transfer-out", "transfer-in") if r != right
            ],
        }
        for right in ("read", "write", "list", "delete", "transfer-out", "transfer-in")
    ),
]


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Setup]]:
    setup = standard_setup(tmp_path_factory.mktemp("acl"), acl=ACL_RULES)
    for right in ("read", "write", "list", "delete", "transfer-out", "transfer-in", "ops"):
        d = setup.export / "tmp" / f"bob-{right}" if right != "ops" else setup.export / "tmp" / "ops"
        d.mkdir()
        (d / "f.txt").write_text(f"file in {d.name}\n")
    sp = ServerProcess(setup.config, setup.dir)
    try:
        sp.start()
        yield sp, setup
    finally:
        sp.stop()
    sp.assert_healthy(r"denied: user=")


async def expect_denied(
    sp: ServerProcess,
    c: ServerClient,
    req: type[m.Request[Any]],
    user: str,
    logged_path: str,
    right: str,
    /,
    **fields: object,
) -> None:
    """The request fails with EACCES and the server logs a denial naming user, path and right."""
    with pytest.raises(RemoteError) as ei:
        await c.call(req(**fields))
    assert ei.value.errno == errno.EACCES, ei.value
    line = await sp.wait_for_log(rf"WARNING .*denied: user={user} path={logged_path} right={right}$")
    assert user in line and logged_path in line and right in line


async def transfer_service_ready(c: ServerClient) -> str | None:
    """None when the server's transfer service answers TransferOffer; else why not."""
    try:
        await c.call(m.TransferOffer(path="/tmp/bob-write/f.txt"))
    except RemoteError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EIO):
            return f"the server's transfer service is not ready: {exc}"
        raise
    return None


@pytest.mark.parametrize("right", ["read", "write", "list", "delete", "transfer-out", "transfer-in"])
async def test_denial_for_each_right(
    acl_server: tuple[ServerProcess, Setup], nursery: trio.Nursery, right: str
) -> None:
    sp, setup = acl_server
    c = sp.client(nursery, "bob", setup.keys["bob"])
    d = f"/tmp/bob-{right}"
    if right in ("transfer-out", "transfer-in"):
        why = await transfer_service_ready(c)
        if why:
            pytest.skip(why)
    if right == "read":
        await expect_denied(sp, c, m.Open, "bob", f"{d}/f.txt", right, path=f"{d}/f.txt", flags=os.O_RDONLY)
        await expect_denied(sp, c, m.Checksum, "bob", f"{d}/f.txt", right, path=f"{d}/f.txt")
        # a capability lets its bearer read the file: transfer-out alone is not enough
        await expect_denied(sp, c, m.TransferOffer, "bob", f"{d}/f.txt", right, path=f"{d}/f.txt")
        # but writing is allowed
        o = await c.call(m.Open(path=f"{d}/f.txt", flags=os.O_WRONLY))
        await c.call(m.Close(handle=o.handle))
    elif right == "write":
        await expect_denied(
            sp, c, m.Create, "bob", f"{d}/new", right, path=f"{d}/new", mode=0o644, flags=os.O_RDWR
        )
        await expect_denied(sp, c, m.Mkdir, "bob", f"{d}/sub", right, path=f"{d}/sub", mode=0o755)
        await expect_denied(sp, c, m.Open, "bob", f"{d}/f.txt", right, path=f"{d}/f.txt", flags=os.O_RDWR)
        await expect_denied(sp, c, m.SetAttr, "bob", f"{d}/f.txt", right, path=f"{d}/f.txt", mode=0o600)
        assert not (setup.export / "tmp" / f"bob-{right}" / "new").exists()
        o = await c.call(m.Open(path=f"{d}/f.txt", flags=os.O_RDONLY))
        await c.call(m.Close(handle=o.handle))
    elif right == "list":
        await expect_denied(sp, c, m.List, "bob", d, right, path=d)
        assert (await c.call(m.Stat(path=f"{d}/f.txt"))).size > 0  # has read on it
    elif right == "delete":
        await expect_denied(sp, c, m.Unlink, "bob", f"{d}/f.txt", right, path=f"{d}/f.txt")
        await expect_denied(sp, c, m.Rename, "bob", f"{d}/f.txt", right, old=f"{d}/f.txt", new=f"{d}/g.txt")
        assert (setup.export / "tmp" / f"bob-{right}" / "f.txt").exists()
    elif right == "transfer-out":
        await expect_denied(sp, c, m.TransferOffer, "bob", f"{d}/f.txt", right, path=f"{d}/f.txt")
    elif right == "transfer-in":
        cap = await c.call(m.TransferOffer(path="/tmp/bob-write/f.txt"))
        await expect_denied(
            sp,
            c,
            m.TransferStart,
            "bob",
            f"{d}/copy.txt",
            right,
            capability=cap,
            source_name="x",
            path=f"{d}/copy.txt",
        )
        assert not (setup.export / "tmp" / f"bob-{right}" / "copy.txt").exists()
    await c.aclose()


async def test_default_deny(acl_server: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    sp, setup = acl_server
    c = sp.client(nursery, "bob", setup.keys["bob"])
    secret = "/private/secret.txt"
    await expect_denied(sp, c, m.Open, "bob", secret, "read", path=secret, flags=os.O_RDONLY)
    await expect_denied(sp, c, m.Stat, "bob", secret, "list", path=secret)
    await expect_denied(sp, c, m.List, "bob", "/private", "list", path="/private")
    await expect_denied(sp, c, m.List, "bob", "/", "list", path="/")
    await expect_denied(
        sp, c, m.Create, "bob", "/new.txt", "write", path="/new.txt", mode=0o644, flags=os.O_RDWR
    )
    # alice has everything under /tmp but nothing outside it except via her group
    a = sp.client(nursery, "alice", setup.keys["alice"])
    await expect_denied(sp, a, m.Create, "alice", "/x", "write", path="/x", mode=0o644, flags=os.O_RDWR)
    await expect_denied(sp, a, m.Unlink, "alice", secret, "delete", path=secret)
    assert not (setup.export / "new.txt").exists() and not (setup.export / "x").exists()
    await c.aclose()
    await a.aclose()


async def test_group_rules(acl_server: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    sp, setup = acl_server
    alice = sp.client(nursery, "alice", setup.keys["alice"])  # @staff: read+list on /private
    o = await alice.call(m.Open(path="/private/secret.txt", flags=os.O_RDONLY))
    assert await alice.call(m.Read(handle=o.handle, offset=0, size=100)) == b"export-private\n"
    page = await alice.call(m.List(path="/private"))
    assert [e.name for e in page.entries] == ["secret.txt"]
    await expect_denied(
        sp,
        alice,
        m.Open,
        "alice",
        "/private/secret.txt",
        "write",
        path="/private/secret.txt",
        flags=os.O_WRONLY,
    )
    carol = sp.client(nursery, "carol", setup.keys["carol"])  # @ops: read+list on /tmp/ops
    page = await carol.call(m.List(path="/tmp/ops"))
    assert [e.name for e in page.entries] == ["f.txt"]
    await expect_denied(sp, carol, m.Unlink, "carol", "/tmp/ops/f.txt", "delete", path="/tmp/ops/f.txt")
    await expect_denied(
        sp, carol, m.Open, "carol", "/private/secret.txt", "read", path="/private/secret.txt", flags=0
    )
    await expect_denied(sp, carol, m.List, "carol", "/tmp", "list", path="/tmp")
    bob = sp.client(nursery, "bob", setup.keys["bob"])  # in no group
    await expect_denied(sp, bob, m.List, "bob", "/tmp/ops", "list", path="/tmp/ops")
    for cl in (alice, carol, bob):
        await cl.aclose()


async def test_stat_of_acl_root_reachable(
    acl_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    """A user who may not list / can still stat the directories granted to them (and / itself)."""
    sp, setup = acl_server
    c = sp.client(nursery, "carol", setup.keys["carol"])
    assert (await c.call(m.Stat(path="/"))).mode
    assert (await c.call(m.Stat(path="/tmp"))).mode
    assert (await c.call(m.Stat(path="/tmp/ops"))).mode
    await c.aclose()
