"""Per-user bookkeeping that keeps one user (or one client) from exhausting the server.

`UserLoad` is shared by all connections of one user: how many connections and open
handles the user holds, and a capacity limiter that bounds the worker threads the user's
requests may occupy at once, so that another user's requests always find a thread.  The
numbers come from `config.Limits` (server.yaml `limits:`); every limit that is hit is
logged once per burst and answered with a clear error.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)


class LimitError(OSError):
    """A request refused because a configured limit was reached."""


class Budget:
    """A weighted semaphore for payload bytes (counted in MiB units), used in trio's thread.

    A taker gets all its units at once or waits: two takers each holding part of what they
    need, waiting for the rest, would wait forever.
    """

    def __init__(self, units: int) -> None:
        self.total = self.free = units
        self._waiters: list[trio.Event] = []

    async def take(self, units: int) -> int:
        """Wait until ``units`` are free and take them; returns what was taken (give it back)."""
        units = min(units, self.total)  # a request larger than the budget still runs, alone
        while self.free < units:
            event = trio.Event()
            self._waiters.append(event)
            await event.wait()
        self.free -= units
        return units

    def give_back(self, units: int) -> None:
        self.free = min(self.total, self.free + units)
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()


@dataclass
class UserLoad:
    max_handles: int = 4096
    max_connections: int = 64
    threads_per_user: int = 8
    handles: int = 0
    connections: int = 0
    threads: trio.CapacityLimiter | None = None
    payload_units: int = 96  # MiB of payload all the user's connections may hold at once
    _payload: Budget | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_log: float = 0.0

    def limiter(self) -> trio.CapacityLimiter:
        # Created lazily: a CapacityLimiter must be made inside trio.
        if self.threads is None:
            self.threads = trio.CapacityLimiter(self.threads_per_user)
        return self.threads

    def payload(self) -> Budget:
        if self._payload is None:
            self._payload = Budget(self.payload_units)
        return self._payload

    def _logged(self, what: str, user: str) -> None:
        now = time.monotonic()
        if now - self._last_log > 10:
            self._last_log = now
            log.warning("limit reached: user=%s %s", user, what)

    def take_handle(self, user: str) -> None:
        """Count one more open file; EMFILE past ``max_handles`` (any thread)."""
        with self._lock:
            if self.handles >= self.max_handles:
                self._logged(f"open files ({self.max_handles}, limits.handles_per_user)", user)
                raise LimitError(
                    errno.EMFILE, f"too many open files for user {user!r} (limit {self.max_handles})"
                )
            self.handles += 1

    def drop_handle(self) -> None:
        with self._lock:
            self.handles = max(0, self.handles - 1)

    def take_connection(self, user: str) -> None:
        with self._lock:
            if self.connections >= self.max_connections:
                self._logged(f"connections ({self.max_connections}, limits.connections_per_user)", user)
                raise LimitError(
                    errno.EUSERS, f"too many connections for user {user!r} (limit {self.max_connections})"
                )
            self.connections += 1

    def drop_connection(self) -> None:
        with self._lock:
            self.connections = max(0, self.connections - 1)
