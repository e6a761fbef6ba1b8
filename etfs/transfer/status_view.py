"""How `etfs status` and `etfs cp` show transfers to humans: one set of units (binary: KiB,
MiB, GiB, as the progress bar), a status table with a header, rate, elapsed time and ETA,
the bytes that went through the client by plain read/write on the mount, and the one-line
summary `etfs cp` prints when it is done.

Pure formatting of `etfs.api` results: no I/O here, so the same text is tested without a mount.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from etfs.api import DONE, FAILED, CopyResult, Status, Transfer

log = logging.getLogger(__name__)

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
KINDS = {
    "third-party": "server to server",
    "relay": "relayed through the client",
    "local": "within one server",
    "client": "local disk <-> server (through the client)",
}


def fmt_bytes(n: float) -> str:
    """Binary units, as the progress bar: "0 B", "1023 B", "64.0 MiB"."""
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_rate(bytes_per_second: float) -> str:
    return f"{fmt_bytes(bytes_per_second)}/s"


def fmt_duration(seconds: float | None) -> str:
    """ "0:07", "12:34", "2:03:04"; "-" for unknown."""
    if seconds is None:
        return "-"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


HEADER = ("ID", "STATE", "DONE", "SIZE", "%", "RATE", "ELAPSED", "ETA", "KIND", "STREAMS", "VIA-CLIENT")


def _row(t: Transfer, now: float) -> tuple[str, ...]:
    return (
        t.id or "-",
        t.state,
        fmt_bytes(t.bytes_done),
        fmt_bytes(t.bytes_total),
        f"{100.0 * t.fraction:.1f}",
        fmt_rate(t.rate(now)),
        fmt_duration(t.elapsed(now)),
        fmt_duration(t.eta(now)),
        t.kind or t.direction or "-",
        str(t.streams),
        fmt_bytes(t.bytes_via_client),
    )


def _notes(t: Transfer, own_uid: int | None) -> str:
    notes = []
    if t.resumed_from:
        notes.append(f"resumed at {fmt_bytes(t.resumed_from)}")
    if t.uid is not None and t.uid != own_uid:  # root sees other uids' transfers too
        notes.append(f"uid {t.uid}")
    if t.reason:
        notes.append(t.reason)
    return f"  ({'; '.join(notes)})" if notes else ""


def render_status(
    status: Status, *, live_only: bool = False, now: float | None = None, own_uid: int | None = None
) -> list[str]:
    """The lines of `etfs status`: a header, one row per transfer (then its source ->
    destination and notes), and the bytes programs moved through the mount per server.
    A transfer of another uid than ``own_uid`` says whose it is."""
    now = time.time() if now is None else now
    rows = [t for t in status.transfers if t.running or not live_only]
    out: list[str] = []
    if not rows:
        out.append("no running transfers" if live_only else "no transfers")
    else:
        cells = [HEADER] + [_row(t, now) for t in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
        right = {2, 3, 4, 5, 6, 7, 9, 10}  # numbers are right-aligned
        for i, c in enumerate(cells):
            line = "  ".join(
                v.rjust(w) if k in right else v.ljust(w)
                for k, (v, w) in enumerate(zip(c, widths, strict=True))
            )
            if i == 0:
                out.append(line.rstrip() + "  TRANSFER")
            else:
                t = rows[i - 1]
                out.append(f"{line}  {t.source} -> {t.destination}{_notes(t, own_uid)}")
    if status.mount_io:
        parts = [
            f"{io.server} read {fmt_bytes(io.read)}, wrote {fmt_bytes(io.written)}" for io in status.mount_io
        ]
        out.append(
            "through the client by plain read/write on the mount (rsync, gio copy...): " + "; ".join(parts)
        )
    return out


def summary_line(results: Sequence[CopyResult], elapsed: float, links: int = 0) -> str:
    """`etfs cp`'s last line: files, bytes, rate, how they went, bytes through the client."""
    done = [r for r in results if r.outcome == DONE]
    moved = sum(
        r.transfer.bytes_done - r.transfer.resumed_from
        for r in done
        if r.transfer and r.transfer.state != "skipped"
    )
    via_client = sum(r.transfer.bytes_via_client for r in done if r.transfer)
    skipped = sum(1 for r in done if r.transfer and r.transfer.state == "skipped")
    kinds: Counter[str] = Counter(
        r.transfer.kind or "third-party" for r in done if r.transfer and r.transfer.state != "skipped"
    )
    how = ", ".join(f"{n} {KINDS.get(k, k)}" for k, n in sorted(kinds.items()))
    line = f"copied {len(done) - skipped} of {len(results)} files"
    if skipped:
        line += f" ({skipped} skipped: already there)"
    if links:
        line += f" and {links} symlinks"
    line += f", {fmt_bytes(moved)} in {elapsed:.1f} s ({fmt_rate(moved / elapsed if elapsed > 0 else 0)})"
    if how:
        line += f": {how}"
    line += f"; {fmt_bytes(via_client)} via the client"
    failed = sum(1 for r in results if r.outcome == FAILED)
    cancelled = len(results) - len(done) - failed
    if failed:
        line += f"; {failed} failed"
    if cancelled:
        line += f"; {cancelled} cancelled"
    return line


def progress_columns() -> list[Any]:
    """Columns of `etfs cp`'s rich progress bar, in the units `etfs status` uses."""
    from rich.progress import BarColumn, ProgressColumn, Task, TextColumn
    from rich.text import Text

    class Amount(ProgressColumn):
        def render(self, task: Task) -> Text:
            total = fmt_bytes(task.total) if task.total is not None else "?"
            return Text(f"{fmt_bytes(task.completed)}/{total}", style="progress.download")

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(fmt_rate(speed) if speed is not None else "?", style="progress.data.speed")

    return [TextColumn("{task.description}"), BarColumn(), Amount(), Rate()]
