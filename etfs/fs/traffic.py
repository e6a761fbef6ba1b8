"""Bytes programs read and wrote through the mount, per server (`etfs status` shows them).

Copies that applications make with plain read/write (`rsync`, `gio copy`, a `cp` the kernel
does not hand to the daemon as `copy_file_range`) pass through the client by design; these
counters say how much did.  Server-to-server transfers never add to them (their bytes do
not pass here); relays count in their transfer's ``bytes_via_client`` instead.
One mount per daemon process, so one module-level `MOUNT_IO`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class MountIO:
    """Per-server byte counters of reads and writes served through the mount's open files."""

    def __init__(self) -> None:
        self.read: dict[str, int] = {}
        self.written: dict[str, int] = {}

    def add_read(self, server: str, n: int) -> None:
        self.read[server] = self.read.get(server, 0) + n

    def add_written(self, server: str, n: int) -> None:
        self.written[server] = self.written.get(server, 0) + n

    def as_dict(self, servers: list[str]) -> dict[str, dict[str, int]]:
        """{server: {"read": N, "written": N}} for every server named (0 when none went through)."""
        return {s: {"read": self.read.get(s, 0), "written": self.written.get(s, 0)} for s in servers}


MOUNT_IO = MountIO()
