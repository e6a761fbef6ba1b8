"""The sans-IO protocol: frames, handshake order, pipelining, error classes (no server process)."""

from __future__ import annotations

import errno

import msgspec
import pytest
import trio
import trio.testing

from etfs.protocol import auth
from etfs.protocol import messages as m
from etfs.protocol.connection import (
    HEADER,
    MAX_FRAME,
    NEED_DATA,
    Connection,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
    State,
    encode_frame,
)
from etfs.protocol.trio_stream import MessageStream

KEY = b"k" * 32


def drain(conn: Connection) -> list[m.Message]:
    out: list[m.Message] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is None:
            return out
        assert isinstance(ev, m.Message)
        out.append(ev)


def ready_pair() -> tuple[Connection, Connection]:
    """A client and a server `Connection` taken through the handshake by feeding bytes."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    cn, sn = auth.new_nonce(), auth.new_nonce()
    server.receive_data(client.send(m.Hello(m.PROTOCOL_VERSION, "u", "e", cn)))
    assert drain(server) == [m.Hello(m.PROTOCOL_VERSION, "u", "e", cn)]
    client.receive_data(server.send(m.Challenge(m.PROTOCOL_VERSION, sn, "srv")))
    assert [type(x) for x in drain(client)] == [m.Challenge]
    server.receive_data(client.send(m.Prove(auth.client_proof(KEY, sn, cn, "u", "e"))))
    assert [type(x) for x in drain(server)] == [m.Prove]
    client.receive_data(server.send(m.Welcome(auth.server_proof(KEY, sn, cn, "u", "e"), 1, "")))
    assert [type(x) for x in drain(client)] == [m.Welcome]
    assert client.state is State.READY and server.state is State.READY
    return client, server


# --- handshake order -------------------------------------------------------------------------------
def test_handshake_states() -> None:
    client, server = ready_pair()
    # Requests flow both ways after the handshake; a second Hello is not a request.
    server.receive_data(client.send(m.Call(7, m.Ping())))
    assert drain(server) == [m.Call(7, m.Ping())]
    with pytest.raises(LocalProtocolError):
        client.send(m.Hello(1, "u", "", b""))


def test_request_before_auth_is_fatal_on_server() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(encode_frame(m.Call(1, m.Stat("/etc/passwd"))))
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert ei.value.fatal
    # The only thing the server may still say is an error; after it the connection is closed.
    with pytest.raises(LocalProtocolError):
        server.send(m.Ok(1, None))
    err = server.send(m.Err(0, errno.EPROTO, "hello first"))
    assert server.state is State.CLOSED
    client.receive_data(err)
    assert drain(client) == [m.Err(0, errno.EPROTO, "hello first")]
    assert client.state is State.CLOSED


def test_client_refuses_to_send_request_before_auth() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(m.Call(1, m.Ping()))
    client.send(m.Hello(1, "u", "", b"n"))
    with pytest.raises(LocalProtocolError):
        client.send(m.Call(1, m.Ping()))  # still no Challenge/Welcome


def test_prove_before_challenge_and_welcome_before_prove() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame(m.Prove(b"x" * 32)))
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert ei.value.fatal
    client = Connection(Role.CLIENT)
    client.receive_data(encode_frame(m.Welcome(b"", 1, "")))
    with pytest.raises(RemoteProtocolError) as ei:
        client.next_event()
    assert ei.value.fatal


def test_server_reply_before_challenge_rejected_by_client() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(encode_frame(m.Ok(1, "surprise")))
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_handshake_message_after_ready_is_non_fatal() -> None:
    _, server = ready_pair()
    server.receive_data(encode_frame(m.Hello(1, "u", "", b"")) + encode_frame(m.Call(3, m.Ping())))
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert not ei.value.fatal
    assert drain(server) == [m.Call(3, m.Ping())]  # the connection goes on


# --- framing ---------------------------------------------------------------------------------------
def test_frames_split_at_every_byte_boundary() -> None:
    client, server = ready_pair()
    msgs: list[m.Call] = [
        m.Call(1, m.Stat("/tmp/a")),
        m.Call(2, m.Write(5, 0, bytes(range(256)) * 3)),
        m.Call(3, m.Rename("/a", "/b", noreplace=True)),
        m.Call(4, m.List("/tmp", after="x", limit=3)),
        m.Call(5, m.Ping()),
    ]
    data = b"".join(client.send(x) for x in msgs)
    for cut in range(len(data) + 1):
        fresh = Connection(Role.SERVER)
        fresh.state = State.READY
        got: list[m.Message] = []
        for part in (data[:cut], data[cut:]):
            if part:  # b"" would mean EOF
                fresh.receive_data(part)
                got += drain(fresh)
        assert got == msgs, cut
    # Byte by byte, too.
    for b in data:
        server.receive_data(bytes([b]))
    assert drain(server) == msgs


def test_eof_inside_frame_is_fatal_and_clean_eof_is_none() -> None:
    _, server = ready_pair()
    frame = encode_frame(m.Call(1, m.Ping()))
    server.receive_data(frame[:-1])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert ei.value.fatal
    _, server2 = ready_pair()
    server2.receive_data(frame[:2])
    server2.receive_data(b"")
    with pytest.raises(RemoteProtocolError):
        server2.next_event()
    _, server3 = ready_pair()
    server3.receive_data(b"")
    assert server3.next_event() is None
    assert server3.state is State.CLOSED


def test_oversized_frame_is_fatal_before_body_arrives() -> None:
    _, server = ready_pair()
    server.receive_data(HEADER.pack(MAX_FRAME + 1))  # only the header: no need to wait for 24 MiB
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert ei.value.fatal
    assert server.state is State.CLOSED
    assert server.next_event() is None


def test_small_max_frame_and_exact_limit() -> None:
    server = Connection(Role.SERVER, max_frame=64)
    server.state = State.READY
    body = msgspec.msgpack.encode({"t": "call", "id": 1, "req": {"t": "stat", "path": "/" + "a" * 30}})
    assert len(body) <= 64
    server.receive_data(HEADER.pack(len(body)) + body)
    assert drain(server) == [m.Call(1, m.Stat("/" + "a" * 30))]
    server.receive_data(HEADER.pack(65) + b"\x00" * 65)
    with pytest.raises(RemoteProtocolError):
        server.next_event()


def test_local_oversized_frame_refused() -> None:
    client, _ = ready_pair()
    with pytest.raises(LocalProtocolError):
        client.send(m.Call(1, m.Write(1, 0, b"\0" * (MAX_FRAME + 1))))


# --- malformed messages after the handshake --------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "rid"),
    [
        ({"t": "call", "id": 17, "req": {"t": "nosuchop", "path": "/x"}}, 17),
        ({"t": "call", "id": 18, "req": {"t": "stat", "path": 5}}, 18),
        ({"t": "call", "id": 19, "req": {"t": "stat"}}, 19),
        ({"t": "call", "id": 20, "req": {"t": "read", "handle": "one", "offset": 0, "size": 1}}, 20),
        ({"t": "call", "id": 21, "req": {"t": "write", "handle": 1, "offset": 0, "data": "not bytes"}}, 21),
        ({"t": "call", "id": "22", "req": {"t": "stat", "path": "/x"}}, 0),
        ({"t": "call", "id": True, "req": {"t": "stat", "path": "/x"}}, 0),
        ({"id": 23, "req": {"t": "stat", "path": "/x"}}, 23),
        ({"t": "call", "id": 24, "req": "stat"}, 24),
        ({"t": "call", "id": 25}, 25),
        # a protocol-1 request (its id inside it, no envelope): refused, still answerable
        ({"t": "stat", "id": 26, "path": "/x"}, 26),
        ([1, 2, 3], 0),
        ("just a string", 0),
    ],
)
def test_malformed_request_is_non_fatal_with_id(body: object, rid: int) -> None:
    _, server = ready_pair()
    server.receive_data(encode_frame(body) + encode_frame(m.Call(99, m.Ping())))
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert not ei.value.fatal
    assert ei.value.request_id == rid
    assert drain(server) == [m.Call(99, m.Ping())]


def test_undecodable_body_is_non_fatal() -> None:
    _, server = ready_pair()
    garbage = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    server.receive_data(HEADER.pack(len(garbage)) + garbage + encode_frame(m.Call(2, m.Ping())))
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert not ei.value.fatal and ei.value.request_id == 0
    assert drain(server) == [m.Call(2, m.Ping())]


def test_malformed_message_during_handshake_is_fatal() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(encode_frame({"t": "hello", "version": "one"}))
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert ei.value.fatal


def test_server_message_types_rejected_from_client() -> None:
    _, server = ready_pair()
    server.receive_data(encode_frame(m.Ok(5, None)))
    with pytest.raises(RemoteProtocolError) as ei:
        server.next_event()
    assert not ei.value.fatal


def test_data_after_close() -> None:
    _, server = ready_pair()
    server.close()
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"x")
    assert server.next_event() is None
    with pytest.raises(LocalProtocolError):
        server.send(m.Ok(1))


# --- over a trio stream pair -----------------------------------------------------------------------
async def fake_handshake_server(ms: MessageStream, key: bytes) -> None:
    hello = await ms.receive()
    assert isinstance(hello, m.Hello)
    nonce = auth.new_nonce()
    await ms.send(m.Challenge(m.PROTOCOL_VERSION, nonce, "mem"))
    prove = await ms.receive()
    assert isinstance(prove, m.Prove)
    assert auth.verify(auth.client_proof(key, nonce, hello.nonce, hello.user, hello.export), prove.mac)
    await ms.send(m.Welcome(auth.server_proof(key, nonce, hello.nonce, hello.user, hello.export), 9, ""))


async def client_handshake(ms: MessageStream, key: bytes) -> None:
    nonce = auth.new_nonce()
    await ms.send(m.Hello(m.PROTOCOL_VERSION, "u", "", nonce))
    ch = await ms.receive()
    assert isinstance(ch, m.Challenge)
    await ms.send(m.Prove(auth.client_proof(key, ch.nonce, nonce, "u", "")))
    wel = await ms.receive()
    assert isinstance(wel, m.Welcome)
    assert auth.verify(auth.server_proof(key, ch.nonce, nonce, "u", ""), wel.mac)


async def test_pipelined_requests_answered_out_of_order() -> None:
    a, b = trio.testing.memory_stream_pair()
    client, server = MessageStream(a, Role.CLIENT), MessageStream(b, Role.SERVER)
    n = 50

    async def serve() -> None:
        await fake_handshake_server(server, KEY)
        got: list[tuple[int, m.Stat]] = []
        for _ in range(n):
            call = await server.receive()
            assert isinstance(call, m.Call) and isinstance(call.req, m.Stat)
            got.append((call.id, call.req))
        for rid, req in reversed(got):  # answer last-first
            await server.send(m.Ok(rid, req.path))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client_handshake(client, KEY)
        for i in range(1, n + 1):
            await client.send(m.Call(i, m.Stat(f"/f{i}")))
        replies = [await client.receive() for _ in range(n)]
    assert [r.id for r in replies if isinstance(r, m.Ok)] == list(range(n, 0, -1))
    assert all(isinstance(r, m.Ok) and r.value == f"/f{r.id}" for r in replies)


async def test_message_stream_eof_and_garbage() -> None:
    a, b = trio.testing.memory_stream_pair()
    client, server = MessageStream(a, Role.CLIENT), MessageStream(b, Role.SERVER)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_handshake_server, server, KEY)
        await client_handshake(client, KEY)
    await a.send_all(HEADER.pack(3) + b"\xc1\xc1\xc1")
    with pytest.raises(RemoteProtocolError) as ei:
        await server.receive()
    assert not ei.value.fatal
    await a.send_all(encode_frame(m.Call(4, m.Ping())))
    assert await server.receive() == m.Call(4, m.Ping())
    await client.aclose()
    assert await server.receive() is None


# --- typed request -> reply pairs ------------------------------------------------------------------
def test_every_request_declares_a_reply_and_travels_in_a_call() -> None:
    for req_type in m.Request.__subclasses__():
        assert m.reply_type(req_type) is not None  # raises TypeError if undeclared
        # A Call carries it (the decoding union names every request type).
        tag = req_type.__struct_config__.tag
        body = msgspec.msgpack.encode({"t": "call", "id": 3, "req": {"t": tag}})
        try:
            call = msgspec.msgpack.decode(body, type=m.ClientMessage)
        except msgspec.ValidationError as exc:
            assert "missing required field" in str(exc), (tag, exc)  # known tag, fields lacking
        else:
            assert isinstance(call, m.Call) and type(call.req) is req_type


def test_reply_types_are_checked_and_decoded() -> None:
    attr = m.Attr(1, 0o100644, 1, 0, 0, 5, 8, 1, 2, 3)
    assert m.reply_type(m.Stat) is m.Attr and m.reply_type(m.Ping) is type(None)
    assert m.check_reply(m.Stat("/x"), attr) is attr
    assert m.check_reply(m.Ping(), None) is None
    assert m.check_reply(m.ListXattr("/x"), ["user.a"]) == ["user.a"]
    assert m.check_reply(m.TransferList(), []) == []
    for req, wrong in [
        (m.Stat("/x"), None),
        (m.Ping(), 0),
        (m.Write(1, 0, b""), True),  # a bool is no int on the wire
        (m.Read(1, 0, 1), "text"),
        (m.ListXattr("/x"), [b"user.a"]),
        (m.Open("/x", 0), attr),
    ]:
        with pytest.raises(TypeError, match=type(req).__name__):
            m.check_reply(req, wrong)
    # The client side: a reply's value as it came off the wire, decoded to the declared type.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(m.Ok(1, attr)), type=m.ServerMessage)
    assert isinstance(wire, m.Ok) and isinstance(wire.value, list)
    assert m.decode_reply(m.Stat("/x"), wire.value) == attr
    with pytest.raises(msgspec.ValidationError):
        m.decode_reply(m.Readlink("/x"), 5)
