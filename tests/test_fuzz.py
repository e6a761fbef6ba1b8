"""Hypothesis fuzzing of the frame decoder (sans-IO) and of a live server's request handling.

Decoder: random bytes, truncated valid frames and mutated valid frames fed to `Connection` in
every role and state; only `ProtocolError` subclasses may escape.  Live server: after logging in,
send one random / malformed / oversized / unknown-type / truncated frame; it must be answered with
an `Err` carrying EPROTO (and the request id when there is one), or, for fatal framing errors,
the connection is closed -- and the server keeps serving other clients (checked after every
example with a fresh connection).  The number of cases run is printed in the terminal summary.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from harness.server import RawClient, ServerProcess, Setup, standard_setup
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etfs.protocol import messages as m
from etfs.protocol.connection import (
    HEADER,
    MAX_FRAME,
    NEED_DATA,
    Connection,
    ProtocolError,
    RemoteProtocolError,
    Role,
    State,
    encode_frame,
)

DECODER_EXAMPLES = int(os.environ.get("ETFS_FUZZ_DECODER_EXAMPLES", "400"))
LIVE_EXAMPLES = int(os.environ.get("ETFS_FUZZ_LIVE_EXAMPLES", "100"))
COUNTS: dict[str, int] = {}


def count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


def counts_text() -> str:
    total = sum(COUNTS.values())
    return f"fuzz cases run: {total} ({', '.join(f'{k}={v}' for k, v in sorted(COUNTS.items()))})"


class _CountReporter:
    """Registered at run time: prints the fuzz case counts in the terminal summary (also with -q)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if COUNTS:
            terminalreporter.write_line(counts_text())


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    pm = request.config.pluginmanager
    if not pm.has_plugin("etfs-fuzz-counts"):
        pm.register(_CountReporter(), "etfs-fuzz-counts")
    yield
    print(counts_text())  # also in the captured output / junit


# --- strategies ------------------------------------------------------------------------------------
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
REQUEST_TAGS: list[str] = sorted(str(t.__struct_config__.tag) for t in m.Request.__subclasses__())
ALL_TAGS = [*REQUEST_TAGS, "call", "hello", "prove", "challenge", "welcome", "ok", "err"]


def calls(request: st.SearchStrategy[m.Request[Any]], max_id: int = 100) -> st.SearchStrategy[m.Call]:
    return st.builds(m.Call, id=st.integers(1, max_id), req=request)


valid_messages: st.SearchStrategy[m.Message] = st.one_of(
    calls(st.builds(m.Ping), 2**40),
    calls(st.builds(m.Stat, path=st.text(max_size=30)), 2**40),
    calls(st.builds(m.Write, handle=st.integers(0, 9), offset=st.integers(0, 9), data=st.binary())),
    calls(st.builds(m.Rename, old=st.text(max_size=9), new=st.text(max_size=9))),
    calls(st.builds(m.List, path=st.text(max_size=9), after=st.text(max_size=5))),
    st.builds(m.Hello, version=st.integers(0, 3), user=st.text(), export=st.text(), nonce=st.binary()),
    st.builds(m.Prove, mac=st.binary()),
    st.builds(m.Ok, id=st.integers(0, 100), value=msgpack_values),
    st.builds(m.Err, id=st.integers(0, 100), errno=st.integers(0, 200), message=st.text(max_size=20)),
    st.builds(m.Challenge, version=st.integers(0, 3), nonce=st.binary(), server=st.text(max_size=9)),
)


def feed_all(conn: Connection, chunks: list[bytes]) -> None:
    """Feed chunks and drain events; only ProtocolError may escape, and only as documented."""
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except RemoteProtocolError:
            return  # data after close
        while True:
            try:
                ev = conn.next_event()
            except RemoteProtocolError as exc:
                assert isinstance(exc.request_id, int) and exc.request_id >= 0
                if exc.fatal or conn.state is State.CLOSED:
                    return
                continue
            if ev is NEED_DATA or ev is None:
                break
            assert isinstance(ev, m.Message)


def new_conn(role: Role, state: State) -> Connection:
    c = Connection(role, max_frame=4096)
    c.state = state
    return c


roles = st.sampled_from(list(Role))
states = st.sampled_from([State.HANDSHAKE, State.AUTH, State.READY])


def split_points(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return [c for c in out if c]


# --- decoder fuzz ----------------------------------------------------------------------------------
@settings(max_examples=DECODER_EXAMPLES, deadline=None)
@given(role=roles, state=states, data=st.binary(max_size=300), eof=st.booleans())
def test_decoder_random_bytes(role: Role, state: State, data: bytes, eof: bool) -> None:
    count("decoder-random")
    conn = new_conn(role, state)
    try:
        feed_all(conn, [data, b""] if eof else [data])
    except ProtocolError:
        pass


@settings(max_examples=DECODER_EXAMPLES, deadline=None)
@given(role=roles, state=states, body=st.binary(max_size=200))
def test_decoder_random_bodies_in_valid_frames(role: Role, state: State, body: bytes) -> None:
    count("decoder-random-body")
    conn = new_conn(role, state)
    try:
        feed_all(conn, [HEADER.pack(len(body)) + body + encode_frame(m.Call(1, m.Ping()))])
    except ProtocolError:
        pass


@settings(max_examples=DECODER_EXAMPLES, deadline=None)
@given(
    role=roles,
    state=states,
    msgs=st.lists(valid_messages, min_size=1, max_size=4),
    cut=st.integers(min_value=0),
    splits=st.lists(st.integers(min_value=0), max_size=5),
)
def test_decoder_truncated_frames(
    role: Role, state: State, msgs: list[m.Message], cut: int, splits: list[int]
) -> None:
    count("decoder-truncated")
    data = b"".join(encode_frame(x) for x in msgs)
    data = data[: cut % (len(data) + 1)]
    conn = new_conn(role, state)
    try:
        feed_all(conn, [*split_points(data, splits), b""])
    except ProtocolError:
        pass


@settings(max_examples=DECODER_EXAMPLES, deadline=None)
@given(
    role=roles,
    state=states,
    msgs=st.lists(valid_messages, min_size=1, max_size=3),
    mutations=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6),
    splits=st.lists(st.integers(min_value=0), max_size=3),
)
def test_decoder_mutated_frames(
    role: Role, state: State, msgs: list[m.Message], mutations: list[tuple[int, int]], splits: list[int]
) -> None:
    count("decoder-mutated")
    data = bytearray(b"".join(encode_frame(x) for x in msgs))
    for pos, value in mutations:
        data[pos % len(data)] = value
    conn = new_conn(role, state)
    try:
        feed_all(conn, [*split_points(bytes(data), splits), b""])
    except ProtocolError:
        pass


@settings(max_examples=DECODER_EXAMPLES // 2, deadline=None)
@given(
    tag=st.sampled_from(ALL_TAGS), fields=st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6)
)
def test_decoder_wrong_fields_are_nonfatal_after_handshake(tag: str, fields: dict[str, Any]) -> None:
    count("decoder-wrong-fields")
    body = msgspec.msgpack.encode({**fields, "t": tag})
    conn = new_conn(Role.SERVER, State.READY)
    conn.receive_data(HEADER.pack(len(body)) + body + encode_frame(m.Call(77, m.Ping())))
    events: list[Any] = []
    try:
        events.append(conn.next_event())
    except RemoteProtocolError as exc:
        assert not exc.fatal  # framing intact: one bad message never kills a ready connection
        rid = fields.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool) and 0 < rid < 2**63:
            assert exc.request_id == rid
    assert conn.next_event() == m.Call(77, m.Ping())


# --- live server fuzz ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Setup]]:
    setup = standard_setup(tmp_path_factory.mktemp("fuzz"))
    sp = ServerProcess(setup.config, setup.dir)
    try:
        sp.start()
        yield sp, setup
    finally:
        sp.stop()
    sp.assert_healthy(r"bad request", r"protocol error")


def is_valid_client_message(body: bytes) -> bool:
    try:
        msgspec.msgpack.decode(body, type=m.ClientMessage)
    except (msgspec.MsgspecError, ValueError):
        return False
    return True


@st.composite
def bad_frames(draw: st.DrawFn) -> tuple[str, bytes, int | None]:
    """(kind, bytes to send, expected request id or None when the connection must close)."""
    kind = draw(
        st.sampled_from(
            ["random-body", "unknown-type", "wrong-fields", "handshake-msg", "oversized", "truncated"]
        )
    )
    if kind == "oversized":
        length = draw(st.integers(MAX_FRAME + 1, 2**32 - 1))
        return kind, HEADER.pack(length) + draw(st.binary(max_size=50)), None
    if kind == "truncated":
        frame = encode_frame(draw(valid_messages))
        return kind, bytes(frame[: draw(st.integers(1, len(frame) - 1))]), None
    if kind == "handshake-msg":
        msg = draw(st.sampled_from([m.Hello(1, "alice", "", b"n"), m.Prove(b"x" * 32)]))
        return kind, bytes(encode_frame(msg)), 0
    rid = draw(st.integers(1, 2**40))
    if kind == "random-body":
        body = draw(st.binary(min_size=0, max_size=200))
        expect = 0
    elif kind == "unknown-type":
        tag = draw(st.text(max_size=12).filter(lambda t: t not in ALL_TAGS))
        fields = draw(st.dictionaries(st.text(max_size=8), msgpack_values, max_size=4))
        body = msgspec.msgpack.encode({**fields, "t": tag, "id": rid})
        expect = rid
    else:
        tag = draw(st.sampled_from(REQUEST_TAGS))
        fields = draw(
            st.dictionaries(
                st.sampled_from(["path", "handle", "offset", "size", "data", "old"]), msgpack_values
            )
        )
        body = msgspec.msgpack.encode({"t": "call", "id": rid, "req": {**fields, "t": tag}})
        expect = rid
    if is_valid_client_message(body):  # rare: a well-formed request is not what this test is about
        body = msgspec.msgpack.encode({"t": "call", "id": rid, "req": {"t": "stat", "path": 0}})
        expect = rid
    if kind == "random-body":
        # undecodable bodies give 0; a random map that happens to carry a valid id gives that id
        try:
            raw = msgspec.msgpack.decode(body)
            rid0 = raw.get("id") if isinstance(raw, dict) else None
            expect = rid0 if isinstance(rid0, int) and not isinstance(rid0, bool) and 0 < rid0 < 2**63 else 0
        except (msgspec.MsgspecError, ValueError):  # ValueError: non-UTF-8 str
            expect = 0
    return kind, HEADER.pack(len(body)) + body, expect


@settings(
    max_examples=LIVE_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=bad_frames())
async def test_live_server_bad_frames(
    live: tuple[ServerProcess, Setup], case: tuple[str, bytes, int | None]
) -> None:
    kind, data, expect = case
    count(f"live-{kind}")
    sp, setup = live
    key = setup.keys["alice"]
    raw = await RawClient.connect(sp.control_port)
    try:
        await raw.login("alice", key)
        await raw.send_raw(data)
        if kind == "truncated":
            await raw.stream.send_eof()
            reply = await raw.receive()  # a farewell error for the half frame, then closed
            assert reply is None or (
                isinstance(reply, m.Err) and reply.id == 0 and reply.errno == errno.EPROTO
            )
            if reply is not None:
                assert await raw.receive() is None
        else:
            reply = await raw.receive()
            assert isinstance(reply, m.Err), (kind, reply)
            assert reply.errno == errno.EPROTO, reply
            if expect is None:  # fatal: farewell error, then closed
                assert reply.id == 0
                assert await raw.receive() is None
            else:
                assert reply.id == expect, (reply, expect)
                await raw.send(m.Call(424242, m.Ping()))  # the same connection goes on
                assert await raw.receive() == m.Ok(424242, None)
    finally:
        await raw.aclose()
    # Another client is served fine after every example.
    other = await RawClient.connect(sp.control_port)
    try:
        await other.login("alice", key)
        await other.send(m.Call(1, m.Stat("/tmp")))
        reply = await other.receive()
        assert isinstance(reply, m.Ok), reply
    finally:
        await other.aclose()
    assert sp.alive()
