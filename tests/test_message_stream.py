"""A request cancelled while being sent leaves its connection unusable, and says so."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from etfs.protocol.connection import Role
from etfs.protocol.trio_stream import MessageStream


def framed(stream: trio.abc.Stream) -> MessageStream:
    """A MessageStream whose frames are fixed bytes (the wire state machine is not the point)."""
    ms = MessageStream(stream, Role.CLIENT)
    ms.conn.send = lambda msg: b"frame-bytes"  # type: ignore[method-assign]
    return ms


async def test_send_cut_in_half_marks_the_stream_broken() -> None:
    # lockstep: every send waits until the peer reads, so the cancel lands inside send_all.
    client, _server = trio.testing.lockstep_stream_pair()
    ms = framed(client)
    with trio.move_on_after(0.1):
        await ms.send(None)  # type: ignore[arg-type]
    assert ms.broken
    with pytest.raises(trio.BrokenResourceError):
        await ms.send(None)  # type: ignore[arg-type]  # it would continue inside the cut frame


async def test_whole_sends_keep_the_stream_usable() -> None:
    client, server = trio.testing.memory_stream_pair()
    ms = framed(client)
    await ms.send(None)  # type: ignore[arg-type]
    await ms.send(None)  # type: ignore[arg-type]
    assert not ms.broken
    assert await server.receive_some(100) == b"frame-bytes" * 2
