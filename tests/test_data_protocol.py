"""The data-connection protocol's sans-IO machines (`etfs.protocol.data`), in memory: the
opening (greeting, proofs, hello), the source's reply, and the block exchange, with the
payload moved by the test as the real drivers move it by sendfile/splice."""

from __future__ import annotations

import errno

import pytest

from etfs.protocol import data as d

SECRET = b"s" * 32
HELLO = d.DataHello("pull", b"token", "t-1", 0, destination="/tmp/x", streams=2)


def pump(conn: d.DataMachine, peer_bytes: bytearray, *, chunk: int = 1 << 20) -> d.DataEvent:
    """The drivers' loop: feed ``conn`` at most what it asks for (and at most ``chunk`` at a
    time) from ``peer_bytes`` until it has an event; what it consumed leaves ``peer_bytes``."""
    while True:
        event = conn.next_event()
        if not isinstance(event, d.NeedData):
            return event
        n = min(conn.wanted, chunk)
        assert n > 0, "a machine waiting for nothing"
        assert len(peer_bytes) >= n, "the machine wants more than the peer sent"
        piece = bytes(peer_bytes[:n])
        del peer_bytes[:n]
        conn.receive_data(piece)


def feed(conn: d.DataMachine, peer_bytes: bytearray, chunk: int) -> None:
    """Feed all of ``peer_bytes`` that ``conn`` asks for, ``chunk`` bytes at a time at most."""
    while peer_bytes and conn.wanted:
        n = min(conn.wanted, chunk, len(peer_bytes))
        conn.receive_data(bytes(peer_bytes[:n]))
        del peer_bytes[:n]


def open_pair(secret_at_listener: bytes | None = SECRET, *, chunk: int = 1 << 20) -> d.DataEvent:
    connector = d.Connector(SECRET, HELLO)
    listener = d.Listener(lambda kid: secret_at_listener if kid == d.key_id(SECRET) else None)
    wire = bytearray(connector.data_to_send())
    assert len(wire) == d.OPEN.size  # the opener only: nothing a client chose
    assert listener.next_event() is d.NEED_DATA
    feed(listener, wire, chunk)  # the opener: the listener answers with its greeting
    back = bytearray(listener.data_to_send())
    if secret_at_listener is None:
        event = listener.next_event()
        assert isinstance(event, d.Refused)
        with pytest.raises(LookupError):
            pump(connector, back)
        return event
    assert isinstance(pump(connector, back, chunk=chunk), d.Greeted)
    wire += connector.data_to_send()
    return pump(listener, wire, chunk=chunk)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_opening_proves_both_sides_at_any_split(chunk: int) -> None:
    event = open_pair(chunk=chunk)
    assert isinstance(event, d.Opened)
    assert event.hello.kind == "pull" and event.hello.transfer_id == "t-1" and event.hello.proof
    assert event.key_id == d.key_id(SECRET)


def test_unknown_key_is_refused_without_a_mac() -> None:
    assert isinstance(open_pair(None), d.Refused)


def test_listener_with_another_secret_cannot_prove_itself() -> None:
    with pytest.raises(d.DataProtocolError, match="did not prove"):
        open_pair(b"x" * 32)


def test_listener_refuses_a_non_etfs_opener_and_bad_hellos() -> None:
    listener = d.Listener(lambda kid: SECRET)
    with pytest.raises(d.DataProtocolError, match="not an etfs data connection"):
        listener.receive_data((b"GET / HTTP/1.1\r\n" * 4)[: d.OPEN.size])
    # A proper opener, then an oversized and a malformed hello.
    for length_and_body, match in [
        (d.LENGTH.pack(d.MAX_HELLO + 1), "hello of"),
        (d.LENGTH.pack(0), "hello of"),
        (d.LENGTH.pack(3) + b"\x81\xa1t", "malformed"),
    ]:
        connector = d.Connector(SECRET, HELLO)
        listener = d.Listener(lambda kid: SECRET)
        listener.receive_data(connector.data_to_send())
        greeting = bytearray(listener.data_to_send())
        assert isinstance(pump(connector, greeting), d.Greeted)
        with pytest.raises(d.DataProtocolError, match=match):
            pump(listener, bytearray(length_and_body))
    # A hello without the connector's proof.
    connector = d.Connector(SECRET, HELLO)
    listener = d.Listener(lambda kid: SECRET)
    listener.receive_data(connector.data_to_send())
    with pytest.raises(d.DataProtocolError, match="did not prove"):
        pump(listener, bytearray(d.encode(HELLO)))


def test_connector_checks_the_greeting() -> None:
    connector = d.Connector(SECRET, HELLO)
    connector.data_to_send()
    with pytest.raises(d.DataProtocolError, match="not an etfs data port"):
        connector.receive_data(b"\0" * d.GREETING.size)
    assert connector.data_to_send() == b""  # the hello never leaves


def test_never_fed_more_than_asked_and_eof_is_a_reset() -> None:
    listener = d.Listener(lambda kid: SECRET)
    with pytest.raises(d.DataLocalError):
        listener.receive_data(b"\0" * (d.OPEN.size + 1))  # would eat into what follows
    with pytest.raises(ConnectionResetError) as ei:
        listener.receive_data(b"")
    assert ei.value.errno == errno.ECONNRESET


def test_reply_reader() -> None:
    replies: list[d.DataReady | d.DataError] = [
        d.DataReady(size=5, mtime_ns=7),
        d.DataError(errno=13, message="no", code="x"),
    ]
    for reply in replies:
        assert pump(d.ReplyReader(), bytearray(d.encode(reply)), chunk=3) == reply
    with pytest.raises(d.DataProtocolError):
        pump(d.ReplyReader(), bytearray(d.LENGTH.pack(d.MAX_HELLO + 1)))
    with pytest.raises(d.DataProtocolError, match="malformed"):
        pump(d.ReplyReader(), bytearray(d.LENGTH.pack(2) + b"\x81\x01"))


def test_block_exchange_pipelined_with_payloads_outside_the_machines() -> None:
    """Two requests in flight; the payload bytes never pass through either machine."""
    sink, source = d.BlockSink(), d.BlockSource()
    to_source = bytearray(sink.request(0, 4, digest=True) + sink.request(4, 3, digest=False))
    to_sink = bytearray()
    payload = b"abcdefg"
    for _ in range(2):
        req = pump(source, to_source)
        assert isinstance(req, d.BlockRequest)
        to_sink += source.header(req.offset, req.length)
        to_sink += payload[req.offset : req.offset + req.length]  # sendfile's part
        to_sink += source.trailer(123 if req.digest else 0)
    got = bytearray()
    for offset, length, digest in [(0, 4, 123), (4, 3, 0)]:
        header = pump(sink, to_sink, chunk=5)
        assert header == d.BlockHeader(offset, length, 0)
        assert sink.wanted == 0  # the payload is the driver's: splice/recv+write
        got += to_sink[:length]
        del to_sink[:length]
        sink.payload_received()
        assert pump(sink, to_sink) == d.Trailer(digest, 0)
    assert got == payload and not to_sink
    assert sink.wanted == 0  # nothing in flight: nothing to read
    to_source += sink.finish(end=True)
    assert pump(source, to_source) == d.Done(end=True)


def test_refused_and_stale_blocks_have_no_payload() -> None:
    sink, source = d.BlockSink(), d.BlockSource()
    to_source = bytearray(sink.request(0, 10, digest=True) + sink.request(10, 10, digest=True))
    to_sink = bytearray()
    for status in (d.STATUS_RANGE, d.STATUS_STALE):
        req = pump(source, to_source)
        assert isinstance(req, d.BlockRequest)
        to_sink += source.header(req.offset, req.length, status)
    assert pump(sink, to_sink) == d.BlockHeader(0, 0, d.STATUS_RANGE)
    assert pump(sink, to_sink) == d.BlockHeader(10, 0, d.STATUS_STALE)
    assert sink.wanted == 0 and not to_sink
    assert pump(source, bytearray(sink.finish(end=False))) == d.Done(end=False)


def test_block_order_is_enforced_on_our_side() -> None:
    source = d.BlockSource()
    source.receive_data(d.REQUEST.pack(0, 4, 0))
    source.header(0, 4)
    with pytest.raises(d.DataLocalError):
        source.header(4, 4)  # the trailer of the first block is missing
    source.trailer(0)
    with pytest.raises(d.DataLocalError):
        source.trailer(0)
    sink = d.BlockSink()
    with pytest.raises(d.DataLocalError):
        sink.payload_received()
