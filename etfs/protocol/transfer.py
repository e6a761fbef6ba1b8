"""The transfer vocabulary shared by client and server: modes, directions, states, failure codes,
the names of the hidden files a copy works in, and the rules every copy path applies alike.

The wire carries these as plain strings (`messages.TransferStart.mode` and friends); both
sides convert at their boundary, so an unknown value is refused in one place.
"""

from __future__ import annotations

import errno
import posixpath
import re
import secrets
from enum import StrEnum

__all__ = [
    "TERMINAL",
    "CopyMode",
    "Direction",
    "FailureCode",
    "TransferState",
    "code_for_errno",
    "local_part_name",
    "noreplace",
    "parse_code",
    "part_paths",
    "relay_id_name",
    "relay_part_name",
    "same_version",
]


# Defaults both sides fall back to (server.yaml and mountpoints.yaml may change them).
# bench/lfn_bench.py (1 Gbit/s, 50 ms RTT, 0.01 % loss; docs/architecture.md section 4): 4
# streams reach what 8 and 16 do, 2 do not; 4 MiB blocks beat 1 MiB (two blocks in flight
# per stream must cover the RTT) and equal 16 MiB.
STREAMS = 4
BLOCK_SIZE = 4 * 1024 * 1024
CAPABILITY_TTL = 300.0  # seconds


class CopyMode(StrEnum):
    NEW = "new"  # fail if the destination exists (and never replace one that appears meanwhile)
    OVERWRITE = "overwrite"
    RESUME = "resume"  # overwrite, continuing a broken transfer's part file when it matches
    SKIP_EXISTING = "skip-existing"  # nothing to do when size and mtime (and digest) match


class Direction(StrEnum):
    PULL = "pull"  # the destination connects to the source's data port
    PUSH = "push"  # the source connects to the destination's data port
    LOCAL = "local"  # a same-server copy (no data connection)
    CLIENT = "client"  # relayed through the client


DATA_DIRECTIONS = (Direction.PULL, Direction.PUSH)  # what a TransferStart may ask for


class TransferState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    VERIFYING = "verifying"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


TERMINAL = frozenset(
    {TransferState.DONE, TransferState.FAILED, TransferState.SKIPPED, TransferState.CANCELLED}
)


class FailureCode(StrEnum):
    """Why a transfer failed, as a program should act on it (`TransferInfo.code`, `DataError.code`).

    The errno stays beside it (`TransferInfo.errno`); the code distinguishes what one errno
    cannot, e.g. an expired capability (worth a new one) from any other EACCES.
    """

    NONE = ""
    NO_SPACE = "no-space"  # ENOSPC / EDQUOT: part file and journal kept, a re-run resumes
    SOURCE_CHANGED = "source-changed"  # ESTALE: never committed, nothing kept
    TIMED_OUT = "timed-out"  # ETIMEDOUT
    PERMISSION = "permission"  # EACCES / EPERM
    CAPABILITY_EXPIRED = "capability-expired"
    CAPABILITY_REFUSED = "capability-refused"  # not ours, used up, bound to another transfer
    PEER_UNREACHABLE = "peer-unreachable"  # no etfs data port answered (one answer for every cause)
    CANCELLED = "cancelled"
    EXISTS = "exists"  # mode new and the destination exists
    IO = "io"  # anything else


_BY_ERRNO = {
    errno.ENOSPC: FailureCode.NO_SPACE,
    errno.EDQUOT: FailureCode.NO_SPACE,
    errno.ESTALE: FailureCode.SOURCE_CHANGED,
    errno.ETIMEDOUT: FailureCode.TIMED_OUT,
    errno.EACCES: FailureCode.PERMISSION,
    errno.EPERM: FailureCode.PERMISSION,
    errno.EHOSTUNREACH: FailureCode.PEER_UNREACHABLE,
    errno.EINTR: FailureCode.CANCELLED,
    errno.ECONNABORTED: FailureCode.CANCELLED,
    errno.EEXIST: FailureCode.EXISTS,
}


def code_for_errno(code: int) -> FailureCode:
    return _BY_ERRNO.get(code, FailureCode.IO) if code else FailureCode.NONE


def parse_code(text: str) -> FailureCode | None:
    """A code read from the wire; None for one this side does not know (a newer peer)."""
    try:
        return FailureCode(text)
    except ValueError:
        return None


# --- the hidden files of a copy in progress ----------------------------------------------------------
PART_SUFFIX = ".etfs-part"
# Every such name (server transfer part, restart record and journal; relay; local copy):
# tools that walk a tree (`etfs cp -r`) skip them.
WORK_FILE = re.compile(r"^\..*\.etfs-(part(\.journal|\.restart)?|relay(-[0-9a-f]+|\.id)?|local-[0-9a-f]+)$")


def part_paths(path: str) -> tuple[str, str, str]:
    """(part file, restart record, journal) of a server transfer, beside ``path``, all hidden."""
    parent, name = posixpath.split(path)
    base = posixpath.join(parent, f".{name}{PART_SUFFIX}")
    return base, base + ".restart", base + ".journal"


def relay_part_name(path: str) -> str:
    """The hidden part file beside ``path`` of a relay copy (its own: a server transfer may run too).

    Always the same name, so that the next copy into ``path`` finds what a broken relay left:
    it resumes it when the source is the same file (`relay_id_name` says which), removes it
    otherwise, and a successful server-to-server copy into ``path`` removes it too.
    """
    parent, name = posixpath.split(path)
    return posixpath.join(parent, f".{name}.etfs-relay")


def relay_id_name(path: str) -> str:
    """Beside the relay part file: which source file (and version) it holds the start of."""
    return relay_part_name(path) + ".id"


def local_part_name(name: str) -> str:
    """The hidden name (in the same directory) an `etfs cp` to or from a local path writes into."""
    return f".{name}.etfs-local-{secrets.token_hex(4)}"


# --- rules every copy path applies -------------------------------------------------------------------
def same_version(size: int, mtime_ns: int, other_size: int, other_mtime_ns: int) -> bool:
    """skip-existing: the destination counts as this source when size and mtime match."""
    return (size, mtime_ns) == (other_size, other_mtime_ns)


def noreplace(mode: str) -> bool:
    """The final rename must not replace a file (mode new: one may have appeared meanwhile)."""
    return mode == CopyMode.NEW
