"""Thin trio adapter: a `Connection` plus the trio stream that carries its bytes."""

from __future__ import annotations

import trio

from . import messages as m
from .connection import NEED_DATA, Connection, Role, encode_frame

RECEIVE_CHUNK = 1024 * 1024


class MessageStream:
    """Sends and receives whole messages on a trio stream; one sender at a time."""

    def __init__(self, stream: trio.abc.Stream, role: Role) -> None:
        self.stream = stream
        self.conn = Connection(role)
        self._send_lock = trio.Lock()
        # A send interrupted mid-frame (cancelled, timed out) leaves the peer inside a frame:
        # nothing more can be sent on this stream.
        self.broken = False

    async def send(self, msg: m.Message) -> None:
        data = self.conn.send(msg)
        async with self._send_lock:
            if self.broken:
                raise trio.BrokenResourceError("an earlier send was interrupted in the middle of a frame")
            try:
                await self.stream.send_all(data)
            except BaseException:
                self.broken = True
                raise

    async def send_farewell(self, msg: m.Err) -> None:
        """Send a final `Err` even when the state machine already considers the connection dead
        (after a fatal framing error the peer should still learn why it is being dropped)."""
        data = encode_frame(msg)
        async with self._send_lock:
            await self.stream.send_all(data)

    async def receive(self) -> m.Message | None:
        """The next message, or None when the peer closed cleanly.

        Raises `RemoteProtocolError` on garbage; with ``fatal=False`` the caller may go on.
        """
        while True:
            event = self.conn.next_event()
            if event is not NEED_DATA:
                assert event is None or isinstance(event, m.Message)
                return event
            data = await self.stream.receive_some(RECEIVE_CHUNK)
            self.conn.receive_data(bytes(data))

    async def aclose(self) -> None:
        self.conn.close()
        await self.stream.aclose()
