"""Issue 9 item 1: the ACL decision applies to the object actually reached, under races.

Each test swaps, as fast as one of bob's connections can, a directory ``/tmp/bob/<x>d`` of his
own with a symlink ``/tmp/bob/<x>l`` that points into a prefix he has fewer rights on
(``Rename`` with ``exchange``; three plain renames if the server refuses exchange), while a
second connection of bob's repeats one request through ``/tmp/bob/<x>d/...``.  Each race runs
for `RACE_SECONDS` (bounded) and must never win: bob never reads alice's or /private's bytes,
never learns /private's names, and /tmp/ro never changes.  Every test has a server of its own
(a won race changes the layout).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from .harness import ALICE_SECRET, BOB_SOURCE, IMPORTANT, PASSWORDS, AttackServer, Deadline
from .rawclient import O_CREAT, O_EXCL, O_RDONLY, O_TRUNC, O_WRONLY, Attr, RawClient

pytestmark = pytest.mark.attack

RACE_SECONDS = 4.0
BATCH = 16  # requests pipelined per round: more attempts per second
REFUSED = (errno.EACCES, errno.EXDEV, errno.EPERM)


@dataclass
class SwapStats:
    ok: int = 0
    refused: int = 0
    other: list[str] = field(default_factory=list)


def _swapper(srv: AttackServer, a: str, b: str, stop: threading.Event, stats: SwapStats) -> None:
    """Swap ``a`` and ``b`` until ``stop``: renameat2(RENAME_EXCHANGE), else three renames."""
    with srv.client("bob") as c:
        exchange = True
        while not stop.is_set():
            if exchange:
                replies = c.pipeline(
                    [("rename", {"old": a, "new": b, "noreplace": False, "exchange": True})] * BATCH
                )
            else:
                tmp = a + ".swap"  # one after the other: pipelined renames may run in any order
                replies = [
                    c.call("rename", old=old, new=new, noreplace=False, exchange=False)
                    for old, new in ((a, tmp), (b, a), (tmp, b))
                ]
            for r in replies:
                if r.ok:
                    stats.ok += 1
                elif r.errno in REFUSED:
                    stats.refused += 1
                else:
                    stats.other.append(f"{r.errno} {r.message}")
            if exchange and stats.ok == 0 and stats.refused >= BATCH:
                exchange = False  # exchange refused outright: race with plain renames instead
            if stats.ok == 0 and stats.refused >= 64:
                return  # every way of swapping is refused: nothing to race with


def race(
    srv: AttackServer,
    tag: str,
    target: str,
    decoys: dict[str, bytes],
    attempt: Callable[[RawClient, int], str | None],
    check: Callable[[], str | None] = lambda: None,
    seconds: float = RACE_SECONDS,
) -> tuple[str | None, float, int, SwapStats]:
    """Race ``attempt`` against the swap of ``/tmp/bob/{tag}d`` and ``/tmp/bob/{tag}l -> target``.

    ``attempt(client, n)`` and ``check()`` return a description once the attack won.  Returns
    (win or None, seconds until the win, attempts, swap statistics).
    """
    srv.plant_dir(f"/tmp/bob/{tag}d")
    for name, data in decoys.items():
        srv.plant(f"/tmp/bob/{tag}d/{name}", data)
    srv.plant_symlink(f"/tmp/bob/{tag}l", target)
    stop = threading.Event()
    stats = SwapStats()
    t = threading.Thread(
        target=_swapper, args=(srv, f"/tmp/bob/{tag}d", f"/tmp/bob/{tag}l", stop, stats), daemon=True
    )
    won: str | None = None
    n = 0
    t0 = time.monotonic()
    with srv.client("bob") as victim:
        t.start()
        try:
            dl = Deadline(seconds)
            while dl and won is None and (t.is_alive() or stats.ok):
                won = attempt(victim, n) or check()
                n += 1
        finally:
            stop.set()
            t.join(10)
    won = won or check()
    return won, time.monotonic() - t0, n, stats


def _assert_never(won: str | None, elapsed: float, n: int, stats: SwapStats) -> None:
    assert not stats.other, f"unexpected swap errors: {stats.other[:5]}"
    assert stats.ok or stats.refused, "the swapper never ran"
    assert won is None, f"race won after {elapsed:.2f} s, {n} attempts, {stats.ok} swaps: {won}"


# --- read alice's file ------------------------------------------------------------------------------
def test_race_open_read_of_alice_file(fresh_server: AttackServer) -> None:
    srv = fresh_server

    def attempt(c: RawClient, n: int) -> str | None:
        opened = c.pipeline([("open", {"path": "/tmp/bob/Sd/alice.txt", "flags": O_RDONLY})] * BATCH)
        handles = [r.value["handle"] for r in opened if r.ok]
        reads = c.pipeline([("read", {"handle": h, "offset": 0, "size": 4096}) for h in handles])
        c.pipeline([("close", {"handle": h}) for h in handles])
        for r in reads:
            if r.ok and b"ALICE-SECRET" in r.value:
                return f"bob read /tmp/secret/alice.txt: {r.value[:40]!r}"
        return None

    won, elapsed, n, stats = race(srv, "S", "../secret", {"alice.txt": b"decoy\n"}, attempt)
    _assert_never(won, elapsed, n, stats)
    assert srv.path("/tmp/secret/alice.txt").read_bytes() == ALICE_SECRET


# --- write into /tmp/ro ---------------------------------------------------------------------------
def _ro_unchanged(srv: AttackServer) -> Callable[[], str | None]:
    before = sorted(p.name for p in srv.path("/tmp/ro").iterdir())

    def check() -> str | None:
        now = sorted(p.name for p in srv.path("/tmp/ro").iterdir())
        if now != before:
            return f"/tmp/ro changed: {before} -> {now}"
        data = srv.path("/tmp/ro/important.txt").read_bytes()
        if data != IMPORTANT:
            return f"/tmp/ro/important.txt changed to {data[:40]!r}"
        return None

    return check


def test_race_create_write_into_readonly(fresh_server: AttackServer) -> None:
    srv = fresh_server

    def attempt(c: RawClient, n: int) -> str | None:
        # Half new names (any file appearing in /tmp/ro is a win), half the existing one, truncated.
        creates = []
        for i in range(BATCH):
            name, flags = (
                (f"planted-{n}-{i}", O_WRONLY | O_CREAT | O_EXCL)
                if i % 2
                else ("important.txt", O_WRONLY | O_CREAT | O_TRUNC)
            )
            creates.append(("create", {"path": f"/tmp/bob/Wd/{name}", "mode": 0o644, "flags": flags}))
        handles = [r.value["handle"] for r in c.pipeline(creates) if r.ok]
        c.pipeline([("write", {"handle": h, "offset": 0, "data": b"PWNED by bob\n"}) for h in handles])
        c.pipeline([("close", {"handle": h}) for h in handles])
        return None

    won, elapsed, n, stats = race(
        srv, "W", "../ro", {"important.txt": b"decoy\n"}, attempt, check=_ro_unchanged(srv)
    )
    _assert_never(won, elapsed, n, stats)


# --- /private: stat, list, read -------------------------------------------------------------------
def test_race_stat_list_read_of_private(fresh_server: AttackServer) -> None:
    srv = fresh_server
    private_ino = srv.path("/private/passwords").stat().st_ino

    def attempt(c: RawClient, n: int) -> str | None:
        replies = c.pipeline(
            [
                ("stat", {"path": "/tmp/bob/Pd/passwords"}),
                ("list", {"path": "/tmp/bob/Pd", "after": "", "limit": 100}),
                ("open", {"path": "/tmp/bob/Pd/passwords", "flags": O_RDONLY}),
            ]
            * (BATCH // 2)
        )
        handles = []
        for st, ls, op in zip(replies[0::3], replies[1::3], replies[2::3], strict=True):
            if st.ok and Attr.of(st.value).ino == private_ino:
                return "bob stat'ed /private/passwords"
            if ls.ok and any(e[0] == "passwords" for e in ls.value["entries"]):
                return f"bob listed /private: {[e[0] for e in ls.value['entries']]}"
            if op.ok:
                handles.append(op.value["handle"])
        reads = c.pipeline([("read", {"handle": h, "offset": 0, "size": 4096}) for h in handles])
        c.pipeline([("close", {"handle": h}) for h in handles])
        for r in reads:
            if r.ok and PASSWORDS in r.value:
                return f"bob read /private/passwords: {r.value!r}"
        return None

    won, elapsed, n, stats = race(srv, "P", "../../private", {"decoy": b"decoy\n"}, attempt)
    _assert_never(won, elapsed, n, stats)


# --- LocalCopy over /tmp/ro/important.txt ---------------------------------------------------------
def test_race_localcopy_overwrites_readonly(fresh_server: AttackServer) -> None:
    srv = fresh_server

    def attempt(c: RawClient, n: int) -> str | None:
        c.call(
            "localcopy",
            src="/tmp/bob/src.txt",
            dst="/tmp/bob/Ld/important.txt",
            mode="overwrite",
            preserve_times=False,
        )
        return None

    won, elapsed, n, stats = race(
        srv, "L", "../ro", {"important.txt": b"decoy\n"}, attempt, check=_ro_unchanged(srv)
    )
    _assert_never(won, elapsed, n, stats)


# --- a transfer into /tmp/ro ----------------------------------------------------------------------
def test_race_transfer_into_readonly(fresh_server: AttackServer) -> None:
    """A pull transfer of bob's own file into ``/tmp/bob/Td/important.txt`` while Td swaps."""
    srv = fresh_server
    with srv.client("bob") as ctl:

        def attempt(c: RawClient, n: int) -> str | None:
            cap = ctl.ok("transferoffer", path="/tmp/bob/src.txt", ttl=60.0)
            cap["data_host"] = "127.0.0.1"
            r = c.call(
                "transferstart",
                capability=cap,
                source_name="attack",
                path="/tmp/bob/Td/important.txt",
                mode="overwrite",
                streams=1,
                direction="pull",
                verify=True,
                block_size=0,
                transfer_id=f"race-{n}",
                preserve_times=False,
            )
            if r.ok:
                c.wait_transfer(r.value["transfer_id"], timeout=5.0)
            return None

        won, elapsed, n, stats = race(
            srv, "T", "../ro", {"important.txt": b"decoy\n"}, attempt, check=_ro_unchanged(srv)
        )
    _assert_never(won, elapsed, n, stats)
    assert srv.path("/tmp/bob/src.txt").read_bytes() == BOB_SOURCE
