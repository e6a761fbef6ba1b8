"""Issue 9 item 2: every operation checks every right it confers.

bob's rights (see `harness`): all on /tmp/bob, read+list on /tmp/ro, write on /tmp/inbox,
nothing on /tmp/secret and /private.  A link, rename or exchange that would give bob (or
leave him) a right on an object that he did not have where the object was must be refused
with EACCES or EXDEV, and the files must stay as they were.  Part and journal files that are
not fresh files of the transfer's own (a planted hard link) must never be written through.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat as st
from typing import Any

import pytest

from .harness import ALICE_REPORT, BOB_RIGHTS, AttackServer
from .rawclient import O_TRUNC, O_WRONLY, RawClient, Reply

pytestmark = pytest.mark.attack

REFUSED = (errno.EACCES, errno.EXDEV)


def _snapshot(srv: AttackServer, rel: str) -> tuple[bytes, int, int, int, list[str]]:
    p = srv.path(rel)
    s = p.lstat()
    return p.read_bytes(), st.S_IMODE(s.st_mode), s.st_uid, s.st_gid, sorted(os.listxattr(p))


def _refused(r: Reply) -> bool:
    return not r.ok and r.errno in REFUSED


# --- a hard link of a read-only file into a writable prefix ----------------------------------------
def test_hardlink_of_readonly_file_cannot_be_written(shared_server: AttackServer) -> None:
    srv = shared_server
    srv.plant("/tmp/ro/hl.txt", b"HARDLINK-ORIGINAL\n", 0o644)
    before = _snapshot(srv, "/tmp/ro/hl.txt")
    with srv.client("bob") as c:
        link = c.call("link", old="/tmp/ro/hl.txt", new="/tmp/bob/hl-link")
        # Whatever the answer, try everything the link would allow.
        op = c.call("open", path="/tmp/bob/hl-link", flags=O_WRONLY | O_TRUNC)
        if op.ok:
            c.call("write", handle=op.value["handle"], offset=0, data=b"PWNED\n")
            c.call("close", handle=op.value["handle"])
        c.call("setattr", path="/tmp/bob/hl-link", mode=0o777)
        c.call("setattr", path="/tmp/bob/hl-link", uid=1234, gid=1234)
        c.call("setxattr", path="/tmp/bob/hl-link", name="user.pwned", value=b"1")
    after = _snapshot(srv, "/tmp/ro/hl.txt")
    assert after == before, f"/tmp/ro/hl.txt changed through a hard link: {before} -> {after}"
    assert _refused(link), f"Link /tmp/ro -> /tmp/bob was not refused: {link}"


# --- a planted hard link as a part / journal / restart file ---------------------------------------
def _transfer(c: RawClient, src: str, dst: str, tid: str) -> None:
    cap = c.ok("transferoffer", path=src, ttl=60.0)
    cap["data_host"] = "127.0.0.1"
    r = c.call(
        "transferstart",
        capability=cap,
        source_name="attack",
        path=dst,
        mode="overwrite",
        streams=1,
        direction="pull",
        verify=True,
        block_size=0,
        transfer_id=tid,
        preserve_times=False,
    )
    if r.ok:
        c.wait_transfer(r.value["transfer_id"], timeout=10.0)


@pytest.mark.parametrize(
    ("how", "suffix"),
    [
        pytest.param(
            "localcopy",
            ".etfs-part",
        ),
        pytest.param(
            "transfer",
            ".etfs-part",
        ),
        pytest.param(
            "transfer",
            ".etfs-part.journal",  # passes today: the old journal is unlinked before it is created
        ),
        pytest.param(
            "transfer",
            ".etfs-part.restart",
        ),
    ],
)
def test_planted_hardlink_part_file_is_never_written(
    shared_server: AttackServer, how: str, suffix: str
) -> None:
    """A hard link to a read-only file, planted where a copy into /tmp/bob keeps its part file.

    Planted on disk (not through the server): the server must not trust any existing file there.
    """
    srv = shared_server
    tag = f"{how}{suffix.replace('.', '-')}"
    ro = f"/tmp/ro/pt-{tag}.txt"
    srv.plant(ro, b"PART-TARGET-ORIGINAL\n", 0o644)
    before = _snapshot(srv, ro)
    os.link(srv.path(ro), srv.path(f"/tmp/bob/.dst-{tag}{suffix}"))
    with srv.client("bob") as c:
        if how == "localcopy":
            c.call(
                "localcopy",
                src="/tmp/bob/src.txt",
                dst=f"/tmp/bob/dst-{tag}",
                mode="overwrite",
                preserve_times=False,
            )
        else:
            _transfer(c, "/tmp/bob/src.txt", f"/tmp/bob/dst-{tag}", f"plant-{tag}")
    after = _snapshot(srv, ro)
    assert after == before, f"{ro} changed through a planted {suffix}: {before[0]!r} -> {after[0][:60]!r}"


# --- Rename(exchange) out of a write-only inbox -----------------------------------------------------
def test_exchange_does_not_leak_inbox(shared_server: AttackServer) -> None:
    srv = shared_server
    srv.plant("/tmp/inbox/report-x.txt", ALICE_REPORT, 0o640)
    with srv.client("bob") as c:
        c.write_file("/tmp/bob/bait.txt", b"bob's bait\n")
        r = c.call(
            "rename", old="/tmp/bob/bait.txt", new="/tmp/inbox/report-x.txt", noreplace=False, exchange=True
        )
        got = c.call("open", path="/tmp/bob/bait.txt", flags=0)
        data = b""
        if got.ok:
            data = c.read(got.value["handle"], 0, 4096)
            c.call("close", handle=got.value["handle"])
    assert b"ALICE-REPORT" not in data, "bob read alice's report out of the write-only inbox"
    assert srv.path("/tmp/inbox/report-x.txt").read_bytes() == ALICE_REPORT
    assert _refused(r), f"exchange /tmp/bob <-> /tmp/inbox was not refused: {r}"


# --- the table: link / rename / exchange between every two prefixes --------------------------------
PREFIXES = ["/tmp/bob", "/tmp/ro", "/tmp/inbox", "/tmp/secret", "/private"]
SHORT = {
    "/tmp/bob": "bob",
    "/tmp/ro": "ro",
    "/tmp/inbox": "inbox",
    "/tmp/secret": "secret",
    "/private": "private",
}


def may_succeed(op: str, a: str, b: str) -> bool:
    """True when bob has the rights the operation needs and it gives him no right he lacked."""
    ra, rb = BOB_RIGHTS[a], BOB_RIGHTS[b]
    if op == "link":  # the object keeps its name in a and gains one in b
        return "read" in ra and "write" in rb and rb <= ra
    if op == "rename":  # the object moves from a to b
        return "delete" in ra and "write" in rb and rb <= ra
    # exchange: x moves a -> b and y moves b -> a
    return {"delete", "write"} <= ra and {"delete", "write"} <= rb and ra == rb


CASES = [
    pytest.param(
        op,
        a,
        b,
        id=f"{op}-{SHORT[a]}-{SHORT[b]}",
    )
    for op, (a, b) in itertools.product(("link", "rename", "exchange"), itertools.permutations(PREFIXES, 2))
]


@pytest.mark.parametrize(("op", "a", "b"), CASES)
def test_acl_table(shared_server: AttackServer, op: str, a: str, b: str) -> None:
    srv = shared_server
    tag = f"tbl-{op}-{SHORT[a]}-{SHORT[b]}"
    src, dst = f"{a}/{tag}-x", f"{b}/{tag}-y"
    srv.plant(src, b"X in " + a.encode() + b"\n")
    if op == "exchange":
        srv.plant(dst, b"Y in " + b.encode() + b"\n")
    before = {p: srv.path(p).read_bytes() if srv.path(p).exists() else None for p in (src, dst)}
    with srv.client("bob") as c:
        if op == "link":
            r = c.call("link", old=src, new=dst)
        else:
            r = c.call("rename", old=src, new=dst, noreplace=False, exchange=op == "exchange")
    if may_succeed(op, a, b):
        return  # confers nothing new: the server may do it or refuse it
    after = {p: srv.path(p).read_bytes() if srv.path(p).exists() else None for p in (src, dst)}
    gained = BOB_RIGHTS[a] ^ BOB_RIGHTS[b] if op == "exchange" else BOB_RIGHTS[b] - BOB_RIGHTS[a]
    assert not r.ok, (
        f"{op} {src} -> {dst} succeeded; it gives bob {sorted(gained)} (or needs rights he lacks)"
    )
    assert r.errno in REFUSED, (
        f"{op} {src} -> {dst}: refused with errno {r.errno} ({r.message}), not EACCES/EXDEV"
    )
    assert after == before, f"{op} {src} -> {dst} was refused but changed the files: {before} -> {after}"


# --- setattr and xattrs where bob may not write ------------------------------------------------------
SETATTRS: dict[str, tuple[str, dict[str, Any]]] = {
    "chmod": ("setattr", {"mode": 0o777}),
    "chown": ("setattr", {"uid": 1234, "gid": 1234}),
    "truncate": ("setattr", {"size": 0}),
    "utime": ("setattr", {"mtime_ns": 0, "atime_ns": 0}),
    "setxattr": ("setxattr", {"name": "user.pwned", "value": b"1"}),
    "removexattr": ("removexattr", {"name": "user.keep"}),
}


@pytest.mark.parametrize("prefix", ["/tmp/ro", "/tmp/secret", "/private"])
@pytest.mark.parametrize("what", list(SETATTRS))
def test_setattr_table(shared_server: AttackServer, prefix: str, what: str) -> None:
    srv = shared_server
    rel = f"{prefix}/sa-{what}.txt"
    p = srv.plant(rel, b"SETATTR-ORIGINAL\n", 0o640)
    os.setxattr(p, "user.keep", b"keep")
    before = _snapshot(srv, rel), p.stat().st_mtime_ns
    kind, fields = SETATTRS[what]
    with srv.client("bob") as c:
        r = c.call(kind, path=rel, **fields)
    after = _snapshot(srv, rel), p.stat().st_mtime_ns
    assert not r.ok and r.errno in REFUSED, f"{what} on {rel}: {r}"
    assert after == before
