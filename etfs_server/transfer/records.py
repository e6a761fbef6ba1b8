"""What a destination remembers: transfer records (for status and cancel), and next to a
part file its restart record (what it is part of) and journal (which blocks are good).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from etfs.common.safefile import write_atomic
from etfs.protocol import messages as m
from etfs.protocol.transfer import CopyMode, Direction, FailureCode, TransferState

log = logging.getLogger(__name__)

KEEP_RECORDS = 2000  # finished transfer records kept (in memory and in state_dir)


@dataclass
class Record:
    """The persisted state of one transfer on the destination."""

    id: str
    source: str
    destination: str
    export: str
    path: str
    user: str = ""  # who ordered it: only they may watch, cancel or list it
    state: TransferState = TransferState.QUEUED
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_resent: int = 0
    streams: int = 1
    direction: Direction = Direction.PULL
    mode: CopyMode = CopyMode.NEW
    digest: str = ""
    reason: str = ""
    errno: int = 0
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    code: FailureCode = FailureCode.NONE

    def fail(self, code: int, reason: str, failure: FailureCode) -> None:
        """Failed, keeping the first reason given (a cancel's reason outlives the errors it causes)."""
        self.state = TransferState.FAILED
        if not self.errno:
            self.errno, self.code = code, failure
        self.reason = self.reason or reason

    def info(self) -> m.TransferInfo:
        # TransferInfo is this record minus what only the server needs (export, path, user).
        return m.TransferInfo(**{name: getattr(self, name) for name in m.TransferInfo.__struct_fields__})


class RecordStore:
    """Transfer records as JSON files under ``state_dir/transfers`` (written atomically)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "transfers"
        self.dir.mkdir(parents=True, exist_ok=True)

    def save(self, rec: Record) -> None:
        write_atomic(self.dir / f"{rec.id}.json", msgspec.json.encode(rec), 0o600)

    def remove(self, transfer_id: str) -> None:
        (self.dir / f"{transfer_id}.json").unlink(missing_ok=True)

    def load_all(self) -> list[Record]:
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(msgspec.json.decode(p.read_bytes(), type=Record))
            except (OSError, msgspec.MsgspecError) as exc:
                log.warning("ignoring unreadable transfer record %s: %s", p, exc)
        return out


class RestartRecord(msgspec.Struct, frozen=True):
    """What a part file is part of: resume only when all of this still matches."""

    source: str
    source_path: str
    size: int
    mtime_ns: int
    block_size: int
    transfer_id: str
    source_ino: int = 0  # same size and mtime is not enough: rsync -t can replace a file

    def same_source(self, other: RestartRecord) -> bool:
        return (self.source, self.source_path, self.size, self.mtime_ns, self.source_ino) == (
            other.source,
            other.source_path,
            other.size,
            other.mtime_ns,
            other.source_ino,
        )
