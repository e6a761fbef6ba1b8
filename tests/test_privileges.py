"""The server's privilege model and per-operation rules (issue 9, items 1-4), with real servers.

* Users map to local accounts (`run_as`): files are created as that account, the kernel's
  permission checks apply beneath the ACL, setuid/setgid and chown need explicit rights.
* Every operation checks every right it confers: links, renames and exchanges between
  locations with different rights are EXDEV; replacing needs `delete`.
* ACL decisions hold under a rename race (the directory checked is the one used).
* Resource bounds: a huge frame before login, per-user handle limit, a user's flood does
  not delay another user.

The raw-socket attack suite in ``tests/attack/`` attacks the same server independently of the
project's protocol code; this file uses the project's client for readable assertions.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from harness.server import RawClient, ServerProcess, Setup, standard_setup

from etfs.client.connection import RemoteError, ServerClient
from etfs.protocol import messages as m

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the privilege model needs a root server")

BOB_ACL: list[dict[str, Any]] = [
    {"who": "alice", "path": "/tmp", "rights": "all"},
    {"who": "bob", "path": "/tmp/bob", "rights": "all"},
    {"who": "bob", "path": "/tmp/bob2", "rights": "all"},
    {"who": "bob", "path": "/tmp/bob3", "rights": ["read", "write", "list", "delete"]},
    {"who": "bob", "path": "/tmp/bob3/sub/out", "rights": ["transfer-out"]},
    {"who": "bob", "path": "/tmp/ro", "rights": ["read", "list"]},
    {"who": "bob", "path": "/tmp/inbox", "rights": ["write"]},
    {"who": "carol", "path": "/tmp/carol", "rights": "all"},
]


def _layout(setup: Setup) -> None:
    t = setup.export / "tmp"
    for d in ("bob", "bob2", "bob3/sub/out", "ro", "inbox", "secret", "carol", "nobody"):
        (t / d).mkdir(parents=True)
    (t / "ro" / "important.txt").write_text("IMPORTANT\n")
    (t / "inbox" / "report.txt").write_text("ALICE'S REPORT\n")
    (t / "secret" / "alice.txt").write_text("ALICE SECRET\n")
    os.chown(t / "nobody", NOBODY, NOBODY)  # carol's account may write only here


@pytest.fixture(scope="module")
def priv_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Setup]]:
    setup = standard_setup(
        tmp_path_factory.mktemp("priv"),
        acl=[*BOB_ACL, {"who": "carol", "path": "/tmp/nobody", "rights": "all"}],
        extra={
            "limits": {"handles_per_user": 50, "threads_per_user": 2},
            "users": {
                "alice": {"key_file": "alice.key", "groups": ["staff"], "may_chown": True, "may_setid": True},
                "bob": {"key_file": "bob.key"},
                "carol": {"key_file": "carol.key", "run_as": NOBODY},
            },
        },
    )
    # write_server_yaml wrote absolute key paths in "users"; the override above uses names
    # relative to the config file, which is where make_key put them.
    _layout(setup)
    sp = ServerProcess(setup.config, setup.dir)
    try:
        sp.start()
        yield sp, setup
    finally:
        sp.stop()
    sp.assert_healthy(
        r"denied:", r"refused:", r"limit reached", r"protocol error: frame of \d+ bytes exceeds"
    )


async def _client(ps: tuple[ServerProcess, Setup], nursery: trio.Nursery, user: str) -> ServerClient:
    sp, setup = ps
    return sp.client(nursery, user, setup.keys[user])


async def _touch(client: ServerClient, path: str, mode: int = 0o644) -> None:
    """Create ``path`` through the server and close it."""
    opened = await client.call(m.Create(path=path, mode=mode, flags=os.O_WRONLY))
    await client.call(m.Close(handle=opened.handle))


async def _errno(coro: object) -> int:
    try:
        await coro  # type: ignore[misc]
    except RemoteError as exc:
        assert exc.errno is not None
        return exc.errno
    raise AssertionError("the request succeeded")


# --- setuid/setgid, chown, umask, accounts ------------------------------------------------------------
async def test_setid_bits_are_dropped_without_may_setid(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    _sp, setup = priv_server
    bob = await _client(priv_server, nursery, "bob")
    await _touch(bob, "/tmp/bob/suid", 0o4755)
    s = os.stat(setup.export / "tmp/bob/suid")
    assert stat.S_IMODE(s.st_mode) == 0o755, oct(s.st_mode)
    attr = await bob.call(m.SetAttr(path="/tmp/bob/suid", mode=0o6755))
    assert stat.S_IMODE(attr.mode) == 0o755
    attr = await bob.call(m.Mkdir(path="/tmp/bob/sgid-dir", mode=0o2775))
    assert stat.S_IMODE(attr.mode) == 0o775
    # alice has may_setid: her bits stay
    alice = await _client(priv_server, nursery, "alice")
    await _touch(alice, "/tmp/alice-suid", 0o4750)
    assert stat.S_IMODE(os.stat(setup.export / "tmp/alice-suid").st_mode) == 0o4750


async def test_chown_needs_may_chown(priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    _sp, setup = priv_server
    bob = await _client(priv_server, nursery, "bob")
    await _touch(bob, "/tmp/bob/mine", 0o644)
    changes: list[dict[str, Any]] = [{"uid": 4242, "mode": 0o6755}, {"uid": 4242}, {"gid": 4242}]
    for fields in changes:
        assert await _errno(bob.call(m.SetAttr(path="/tmp/bob/mine", **fields))) == errno.EPERM
    s = os.stat(setup.export / "tmp/bob/mine")
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (0, 0, 0o644)
    # keeping the owner as it is is no change of owner
    await bob.call(m.SetAttr(path="/tmp/bob/mine", uid=0, gid=0))
    alice = await _client(priv_server, nursery, "alice")
    attr = await alice.call(m.SetAttr(path="/tmp/bob/mine", uid=4242, gid=4243))
    assert (attr.uid, attr.gid) == (4242, 4243)


async def test_created_mode_is_the_callers_not_the_server_umask(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    _sp, setup = priv_server
    bob = await _client(priv_server, nursery, "bob")
    await _touch(bob, "/tmp/bob/g-w", 0o620)
    assert stat.S_IMODE(os.stat(setup.export / "tmp/bob/g-w").st_mode) == 0o620
    attr = await bob.call(m.Mkdir(path="/tmp/bob/d777", mode=0o777))
    assert stat.S_IMODE(attr.mode) == 0o777


async def test_user_mapped_to_an_account_acts_as_it(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    _sp, setup = priv_server
    carol = await _client(priv_server, nursery, "carol")
    opened = await carol.call(m.Create(path="/tmp/nobody/hers", mode=0o600, flags=os.O_WRONLY))
    await carol.call(m.Write(handle=opened.handle, offset=0, data=b"x"))
    await carol.call(m.Close(handle=opened.handle))
    s = os.stat(setup.export / "tmp/nobody/hers")
    assert (s.st_uid, s.st_gid) == (NOBODY, NOBODY)
    # The ACL allows /tmp/carol, but that directory is root's 0755: the kernel says no.
    code = await _errno(carol.call(m.Create(path="/tmp/carol/x", mode=0o644, flags=os.O_WRONLY)))
    assert code == errno.EACCES
    assert not (setup.export / "tmp/carol/x").exists()
    # Root's other threads were not affected: bob (root) still writes.
    bob = await _client(priv_server, nursery, "bob")
    await _touch(bob, "/tmp/bob/after-carol", 0o600)
    assert os.stat(setup.export / "tmp/bob/after-carol").st_uid == 0


# --- rights conferred by links, renames, exchanges ----------------------------------------------------
async def test_hard_link_cannot_widen_rights(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    _sp, setup = priv_server
    bob = await _client(priv_server, nursery, "bob")
    code = await _errno(bob.call(m.Link(old="/tmp/ro/important.txt", new="/tmp/bob/imp")))
    assert code == errno.EXDEV
    assert not (setup.export / "tmp/bob/imp").exists()
    # planted as a transfer's part file: refused the same way
    code = await _errno(bob.call(m.Link(old="/tmp/ro/important.txt", new="/tmp/bob/.x.etfs-part")))
    assert code == errno.EXDEV
    # within one prefix a link is fine (rsync -H, tar)
    await _touch(bob, "/tmp/bob/a", 0o644)
    attr = await bob.call(m.Link(old="/tmp/bob/a", new="/tmp/bob/b"))
    assert attr.nlink == 2
    # between two prefixes with the same rights too
    await bob.call(m.Link(old="/tmp/bob/a", new="/tmp/bob2/a"))


async def test_exchange_cannot_leak_an_inbox(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    _sp, setup = priv_server
    bob = await _client(priv_server, nursery, "bob")
    await _touch(bob, "/tmp/bob/swap", 0o644)
    code = await _errno(bob.call(m.Rename(old="/tmp/bob/swap", new="/tmp/inbox/report.txt", exchange=True)))
    assert code in (errno.EACCES, errno.EXDEV)
    assert (setup.export / "tmp/inbox/report.txt").read_text() == "ALICE'S REPORT\n"
    # moving a file out of the inbox needs delete there, which bob lacks
    code = await _errno(bob.call(m.Rename(old="/tmp/inbox/report.txt", new="/tmp/bob/stolen")))
    assert code == errno.EACCES
    # moving his own file into the write-only inbox widens nothing... but loses rights: EXDEV
    # as well would be wrong; it must work like a copy does (write is all he needs there).
    code = await _errno(bob.call(m.Rename(old="/tmp/bob/swap", new="/tmp/ro/swap")))
    assert code == errno.EACCES  # no write on /tmp/ro


async def test_rename_rules(priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery) -> None:
    _sp, setup = priv_server
    bob = await _client(priv_server, nursery, "bob")
    for name in ("r1", "r2"):
        await _touch(bob, f"/tmp/bob/{name}", 0o644)
    await bob.call(m.Rename(old="/tmp/bob/r1", new="/tmp/bob2/r1"))  # same rights: fine
    await bob.call(m.Rename(old="/tmp/bob2/r1", new="/tmp/bob/r2"))  # replaces: delete on bob/r2, fine
    assert (setup.export / "tmp/bob/r2").exists() and not (setup.export / "tmp/bob2/r1").exists()
    # into the write-only inbox: the object would lose rights, that is allowed; replacing
    # alice's report needs delete there: refused, and the report is untouched.
    code = await _errno(bob.call(m.Rename(old="/tmp/bob/r2", new="/tmp/inbox/report.txt")))
    assert code == errno.EACCES
    assert (setup.export / "tmp/inbox/report.txt").read_text() == "ALICE'S REPORT\n"
    await bob.call(m.Rename(old="/tmp/bob/r2", new="/tmp/inbox/from-bob"))
    # a directory with one of bob's rules beneath it cannot move (its contents' rights would
    # change), nor can a directory move to where a rule gives it more
    code = await _errno(bob.call(m.Rename(old="/tmp/bob3/sub", new="/tmp/bob3/sub2")))
    assert code == errno.EXDEV
    await bob.call(m.Mkdir(path="/tmp/bob3/plain", mode=0o755))
    code = await _errno(bob.call(m.Rename(old="/tmp/bob3/plain", new="/tmp/bob3/sub/out/plain")))
    assert code == errno.EXDEV
    await bob.call(m.Rename(old="/tmp/bob3/plain", new="/tmp/bob3/plain2"))


async def test_acl_holds_while_a_directory_and_a_symlink_swap(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    """One connection swaps /tmp/bob/d (a directory) with /tmp/bob/l (a symlink to ../secret)
    as fast as it can; another opens /tmp/bob/d/alice.txt, creates in /tmp/bob/d and lists it.
    Whatever the timing, bob must never read alice's file or write next to it."""
    _sp, setup = priv_server
    t = setup.export / "tmp"
    (t / "bob" / "d").mkdir()
    (t / "bob" / "d" / "alice.txt").write_text("bob's own\n")
    os.symlink("../secret", t / "bob" / "l")
    swapper = await _client(priv_server, nursery, "bob")
    reader = await _client(priv_server, nursery, "bob")
    leaked: list[str] = []
    attempts = 0
    deadline = trio.current_time() + 3.0

    async def swap() -> None:
        while trio.current_time() < deadline:
            await swapper.call(m.Rename(old="/tmp/bob/d", new="/tmp/bob/l", exchange=True))

    async def read() -> None:
        nonlocal attempts
        while trio.current_time() < deadline:
            attempts += 1
            try:
                opened = await reader.call(m.Open(path="/tmp/bob/d/alice.txt", flags=os.O_RDONLY))
                data = await reader.call(m.Read(handle=opened.handle, offset=0, size=100))
                await reader.call(m.Close(handle=opened.handle))
                if b"SECRET" in data:
                    leaked.append("read")
            except RemoteError:
                pass
            try:
                await _touch(reader, "/tmp/bob/d/planted", 0o644)
            except RemoteError:
                pass

    async with trio.open_nursery() as n:
        n.start_soon(swap)
        n.start_soon(read)
    assert attempts > 50
    assert not leaked
    assert not (t / "secret" / "planted").exists()
    assert (t / "secret" / "alice.txt").read_text() == "ALICE SECRET\n"


# --- resource bounds ----------------------------------------------------------------------------------
def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_huge_frame_before_login_is_cut_short(priv_server: tuple[ServerProcess, Setup]) -> None:
    sp, setup = priv_server
    assert sp.proc is not None
    before = _rss_mib(sp.proc.pid)
    raw = await RawClient.connect(sp.control_port)
    body = b"\xdd" + (24 * 2**20).to_bytes(4, "big") + b"\x90" * (24 * 2**20)  # array of empty arrays
    try:
        await raw.send_raw(len(body).to_bytes(4, "big") + body[: 2**20])
    except trio.BrokenResourceError:
        pass
    reply = await raw.receive()  # the server says why and closes
    assert reply is None or (isinstance(reply, m.Err) and reply.errno == errno.EPROTO), reply
    assert await raw.receive() is None
    await raw.aclose()
    # a legitimate login still works at once, and the server did not grow
    t0 = time.monotonic()
    ok = await RawClient.connect(sp.control_port)
    await ok.login("alice", setup.keys["alice"])
    assert time.monotonic() - t0 < 1.0
    await ok.aclose()
    assert _rss_mib(sp.proc.pid) < before + 20


async def test_handles_per_user_are_bounded(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    _sp, _setup = priv_server
    bob = await _client(priv_server, nursery, "bob")
    await _touch(bob, "/tmp/bob/h", 0o644)
    handles = []
    code = 0
    for _ in range(60):
        try:
            handles.append((await bob.call(m.Open(path="/tmp/bob/h", flags=os.O_RDONLY))).handle)
        except RemoteError as exc:
            code = exc.errno or 0
            break
    assert code == errno.EMFILE and len(handles) == 50
    # alice is not affected
    alice = await _client(priv_server, nursery, "alice")
    opened = await alice.call(m.Open(path="/tmp/bob/h", flags=os.O_RDONLY))
    await alice.call(m.Close(handle=opened.handle))
    for h in handles:
        await bob.call(m.Close(handle=h))
    again = await bob.call(m.Open(path="/tmp/bob/h", flags=os.O_RDONLY))
    await bob.call(m.Close(handle=again.handle))


async def test_one_users_checksums_do_not_starve_another(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    """bob asks for checksums of a 1 TiB sparse file (each takes minutes); alice's Stat and a
    1 MiB Read are answered at once, and the checksums stop when bob disconnects."""
    _sp, setup = priv_server
    with open(setup.export / "tmp/bob/sparse", "wb") as f:
        f.truncate(2**40)
    (setup.export / "tmp/bob/mib").write_bytes(os.urandom(2**20))
    bob = await _client(priv_server, nursery, "bob")

    async def checksum() -> None:
        try:
            await bob.call(m.Checksum(path="/tmp/bob/sparse"))
        except Exception:
            pass

    async with trio.open_nursery() as flood:
        for _ in range(10):
            flood.start_soon(checksum)
        await trio.sleep(0.5)
        alice = await _client(priv_server, nursery, "alice")
        t0 = time.monotonic()
        await alice.call(m.Stat(path="/tmp/bob/mib"))
        opened = await alice.call(m.Open(path="/tmp/bob/mib", flags=os.O_RDONLY))
        data = await alice.call(m.Read(handle=opened.handle, offset=0, size=2**20))
        await alice.call(m.Close(handle=opened.handle))
        assert len(data) == 2**20 and time.monotonic() - t0 < 1.0
        await bob.aclose()
        flood.cancel_scope.cancel()
    # bob's threads are free again: a new connection of his is served promptly
    bob2 = await _client(priv_server, nursery, "bob")
    with trio.fail_after(5):
        opened = await bob2.call(m.Open(path="/tmp/bob/mib", flags=os.O_RDONLY))
        await bob2.call(m.Read(handle=opened.handle, offset=0, size=10))


async def test_no_rights_no_existence_probing(
    priv_server: tuple[ServerProcess, Setup], nursery: trio.Nursery
) -> None:
    """Where bob has no right, every answer is EACCES, whether the path exists or not."""
    bob = await _client(priv_server, nursery, "bob")
    for path in ("/tmp/secret/alice.txt", "/tmp/secret/no-such-dir/x", "/tmp/no-such-dir/x", "/private/x/y"):
        assert await _errno(bob.call(m.Stat(path=path))) == errno.EACCES, path
        assert await _errno(bob.call(m.Open(path=path, flags=os.O_RDONLY))) == errno.EACCES, path
        code = await _errno(bob.call(m.Create(path=path, mode=0o644, flags=os.O_WRONLY)))
        assert code == errno.EACCES, path
        code = await _errno(bob.call(m.Rename(old="/tmp/bob/none", new=path)))
        assert code == errno.EACCES, path
