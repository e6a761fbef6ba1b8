"""Escape attempts against a real server: nothing outside the export (or outside the ACL grant) is
ever read, written, created, renamed, linked or even stat'ed.

Layout (see `server_helpers.standard_setup`): ``<base>/export`` is exported as ``main``;
alice has every right on ``/tmp``, bob on ``/tmp/bob`` only.  ``<base>/outside`` holds
``sentinel.txt`` and an empty ``canary/`` directory that must stay as they are.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from harness.server import ServerProcess, Setup, standard_setup

from etfs import _sendfile_cffi as native
from etfs.client.connection import RemoteError, ServerClient
from etfs.protocol import messages as m

SENTINEL = b"SENTINEL\n"
ESCAPE_ERRNOS = {errno.EACCES, errno.ENOENT}


@dataclass
class Env:
    sp: ServerProcess
    setup: Setup
    tmp: Path  # <export>/tmp on the server's disk

    @property
    def outside(self) -> Path:
        return self.setup.outside


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    setup = standard_setup(
        tmp_path_factory.mktemp("trav"),
        acl=[
            {"who": "alice", "path": "/tmp", "rights": "all"},
            {"who": "bob", "path": "/tmp/bob", "rights": "all"},
        ],
    )
    tmp = setup.export / "tmp"
    out = setup.outside
    (tmp / "bob").mkdir()
    (tmp / "file.txt").write_text("inside\n")
    # Symlinks planted by someone with shell access (the client can make them too, see below).
    os.symlink(out / "sentinel.txt", tmp / "abs")
    os.symlink(out, tmp / "absdir")
    os.symlink("../../outside", tmp / "rel")
    os.symlink("c2", tmp / "c1")
    os.symlink("c3", tmp / "c2")
    os.symlink("../../outside", tmp / "c3")
    os.symlink(out / "canary", tmp / "canarylink")
    os.symlink(out / "canary" / "created.txt", tmp / "dangle")
    os.symlink("/proc/self/root", tmp / "procroot")
    os.symlink("/", tmp / "slash")
    os.symlink("../../private", tmp / "bob" / "sneaky")  # inside the export, outside bob's grant
    os.symlink("../../private/secret.txt", tmp / "bob" / "sneakyfile")
    sp = ServerProcess(setup.config, setup.dir)
    try:
        sp.start()
        yield Env(sp, setup, tmp)
    finally:
        sp.stop()
    sp.assert_healthy(r"denied: user=", r"bad request")


def outside_state(out: Path) -> dict[str, Any]:
    s = (out / "sentinel.txt").stat()
    return {
        "listing": sorted(p.name for p in out.iterdir()),
        "canary": sorted(p.name for p in (out / "canary").iterdir()),
        "sentinel": (out / "sentinel.txt").read_bytes(),
        "mode": s.st_mode,
        "nlink": s.st_nlink,
        "mtime": s.st_mtime_ns,
        "xattrs": os.listxattr(out / "sentinel.txt"),
    }


def assert_outside_untouched(env: Env) -> None:
    st = outside_state(env.outside)
    assert st["listing"] == ["canary", "sentinel.txt"]
    assert st["canary"] == []
    assert st["sentinel"] == SENTINEL
    assert st["nlink"] == 1
    assert st["xattrs"] in ([], ["user.secret"])


@pytest.fixture
async def alice(env: Env, nursery: trio.Nursery) -> Any:
    c = env.sp.client(nursery, "alice", env.setup.keys["alice"])
    yield c
    await c.aclose()
    assert_outside_untouched(env)


async def fails(
    c: ServerClient, req: type[m.Request[Any]], allowed: set[int] = ESCAPE_ERRNOS, **fields: Any
) -> int:
    """The request must fail with one of ``allowed``; returns the errno."""
    try:
        value: Any = await c.call(req(**fields))
    except RemoteError as exc:
        assert exc.errno in allowed, f"{req.__name__}{fields}: {exc}"
        return exc.errno or 0
    pytest.fail(f"{req.__name__}{fields} succeeded: {value!r}")


# Each case: (description, request type, fields).  All are issued by alice, who has every right
# on /tmp, so only confinement stops them.
RD = os.O_RDONLY
CASES: list[tuple[str, type[m.Request[Any]], dict[str, Any]]] = [
    ("dotdot leading", m.Open, {"path": "/../outside/sentinel.txt", "flags": RD}),
    ("dotdot after tmp", m.Open, {"path": "/tmp/../../outside/sentinel.txt", "flags": RD}),
    ("dotdot into private (ACL)", m.Open, {"path": "/tmp/../private/secret.txt", "flags": RD}),
    ("dotdot relative form", m.Stat, {"path": "tmp/../../outside"}),
    ("dot-dotdot mix", m.List, {"path": "/tmp/./.././.."}),
    ("dotdot last", m.List, {"path": "/tmp/.."}),
    ("dotdot many", m.Stat, {"path": "/tmp/" + "../" * 40 + "etc/passwd"}),
    ("double slash dotdot", m.Open, {"path": "//tmp//..//..//outside/sentinel.txt", "flags": RD}),
    ("url-encoded dots literal", m.Open, {"path": "/tmp/%2e%2e/%2e%2e/outside/sentinel.txt", "flags": RD}),
    ("url-encoded slash literal", m.Stat, {"path": "/tmp/..%2f..%2foutside%2fsentinel.txt"}),
    ("overlong utf8 as text literal", m.Stat, {"path": "/tmp/%c0%ae%c0%ae/outside"}),
    ("unicode one-dot leaders literal", m.Stat, {"path": "/tmp/\u2024\u2024/\u2024\u2024/outside"}),
    ("backslashes literal", m.Open, {"path": "/tmp/..\\..\\outside\\sentinel.txt", "flags": RD}),
    ("NUL byte", m.Open, {"path": "/tmp/file.txt\0/../../outside/sentinel.txt", "flags": RD}),
    ("NUL byte create", m.Create, {"path": "/tmp/x\0y", "mode": 0o644, "flags": os.O_RDWR}),
    ("absolute symlink to file", m.Open, {"path": "/tmp/abs", "flags": RD}),
    ("absolute symlink checksum", m.Checksum, {"path": "/tmp/abs"}),
    ("absolute symlink truncate", m.Open, {"path": "/tmp/abs", "flags": os.O_WRONLY | os.O_TRUNC}),
    ("absolute symlink dir open", m.Open, {"path": "/tmp/absdir/sentinel.txt", "flags": RD}),
    ("absolute symlink dir stat", m.Stat, {"path": "/tmp/absdir/sentinel.txt"}),
    ("absolute symlink dir list", m.List, {"path": "/tmp/absdir"}),
    ("relative symlink out", m.Open, {"path": "/tmp/rel/sentinel.txt", "flags": RD}),
    ("relative symlink out list", m.List, {"path": "/tmp/rel/canary"}),
    ("symlink chain", m.Open, {"path": "/tmp/c1/sentinel.txt", "flags": RD}),
    ("symlink chain stat", m.Stat, {"path": "/tmp/c1/sentinel.txt"}),
    (
        "symlinked parent create",
        m.Create,
        {"path": "/tmp/canarylink/new.txt", "mode": 0o644, "flags": os.O_RDWR},
    ),
    ("symlinked parent mkdir", m.Mkdir, {"path": "/tmp/canarylink/newdir", "mode": 0o755}),
    ("symlinked parent symlink", m.Symlink, {"path": "/tmp/canarylink/l", "target": "x"}),
    ("symlinked parent unlink", m.Unlink, {"path": "/tmp/absdir/sentinel.txt"}),
    ("symlinked parent rmdir", m.Rmdir, {"path": "/tmp/absdir/canary"}),
    ("symlinked parent setattr", m.SetAttr, {"path": "/tmp/absdir/sentinel.txt", "mode": 0o777}),
    ("symlinked parent truncate", m.SetAttr, {"path": "/tmp/absdir/sentinel.txt", "size": 0}),
    ("hard link from outside", m.Link, {"old": "/tmp/absdir/sentinel.txt", "new": "/tmp/hl"}),
    ("hard link dotdot", m.Link, {"old": "/../outside/sentinel.txt", "new": "/tmp/hl2"}),
    ("hard link into outside", m.Link, {"old": "/tmp/file.txt", "new": "/tmp/canarylink/hl"}),
    ("rename into symlinked dir", m.Rename, {"old": "/tmp/file.txt", "new": "/tmp/canarylink/file.txt"}),
    ("rename out of symlinked dir", m.Rename, {"old": "/tmp/absdir/sentinel.txt", "new": "/tmp/stolen"}),
    (
        "rename exchange with outside",
        m.Rename,
        {"old": "/tmp/file.txt", "new": "/tmp/absdir/sentinel.txt", "exchange": True},
    ),
    ("create through dangling symlink", m.Create, {"path": "/tmp/dangle", "mode": 0o644, "flags": os.O_RDWR}),
    (
        "create excl through dangling symlink",
        m.Create,
        {"path": "/tmp/dangle", "mode": 0o644, "flags": os.O_RDWR | os.O_EXCL},
    ),
    ("magic link /proc/self/root", m.Open, {"path": "/tmp/procroot/etc/hostname", "flags": RD}),
    ("magic link list", m.List, {"path": "/tmp/procroot"}),
    ("proc path inside export", m.Open, {"path": "/proc/self/root/etc/passwd", "flags": RD}),
    ("symlink to /", m.Open, {"path": "/tmp/slash/etc/passwd", "flags": RD}),
    ("getxattr via symlink", m.GetXattr, {"path": "/tmp/abs", "name": "user.secret"}),
    ("getxattr via symlinked dir", m.GetXattr, {"path": "/tmp/absdir/sentinel.txt", "name": "user.secret"}),
    (
        "setxattr via symlinked dir",
        m.SetXattr,
        {"path": "/tmp/absdir/sentinel.txt", "name": "user.x", "value": b"1"},
    ),
    ("readlink via symlinked dir", m.Readlink, {"path": "/tmp/absdir/sentinel.txt"}),
    ("transfer offer via symlinked dir", m.TransferOffer, {"path": "/tmp/absdir/sentinel.txt"}),
    ("local copy from outside", m.LocalCopy, {"src": "/tmp/absdir/sentinel.txt", "dst": "/tmp/copied.txt"}),
    ("local copy to outside", m.LocalCopy, {"src": "/tmp/file.txt", "dst": "/tmp/canarylink/copied.txt"}),
]


# Cases where another errno is the honest answer and still proves nothing was reached: a List of a
# symlink is ENOTDIR (never listed through), O_EXCL on an existing (dangling) symlink is EEXIST,
# and the xattrs of a final symlink are the link's own (it has none: ENODATA).
EXTRA_ERRNOS = {
    "absolute symlink dir list": {errno.ENOTDIR},
    "magic link list": {errno.ENOTDIR},
    "create excl through dangling symlink": {errno.EEXIST},
    "getxattr via symlink": {errno.ENODATA},
}


@pytest.mark.parametrize(("what", "req", "fields"), CASES, ids=[c[0] for c in CASES])
async def test_escape_attempt(
    env: Env, alice: ServerClient, what: str, req: type[m.Request[Any]], fields: dict[str, Any]
) -> None:
    os.setxattr(env.outside / "sentinel.txt", "user.secret", b"do-not-leak")
    await fails(alice, req, ESCAPE_ERRNOS | EXTRA_ERRNOS.get(what, set()), **fields)
    assert (env.tmp / "file.txt").read_text() == "inside\n"
    assert not (env.tmp / "hl").exists() and not (env.tmp / "stolen").exists()
    assert not (env.tmp / "copied.txt").exists()


async def test_symlink_ops_on_link_itself_do_not_reach_target(env: Env, alice: ServerClient) -> None:
    """Operations that act on a symlink itself are fine, but must never act on its outside target."""
    # readlink just returns the stored text
    assert await alice.call(m.Readlink(path="/tmp/abs")) == str(env.outside / "sentinel.txt")
    # lstat: the link, not the sentinel
    attr = await alice.call(m.Stat(path="/tmp/abs"))
    assert attr.ino != (env.outside / "sentinel.txt").stat().st_ino
    # chmod / utime / truncate / setxattr through the final symlink: fail or touch only the link
    changes: list[dict[str, Any]] = [{"mode": 0o777}, {"mtime_ns": 5, "atime_ns": 5}, {"size": 0}]
    for fields in changes:
        try:
            await alice.call(m.SetAttr(path="/tmp/abs", **fields))
        except RemoteError as exc:
            assert exc.errno in (errno.EACCES, errno.ELOOP, errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL), exc
    for name in ("user.x",):
        try:
            await alice.call(m.SetXattr(path="/tmp/abs", name=name, value=b"1"))
        except RemoteError as exc:
            assert exc.errno in (errno.EACCES, errno.EPERM, errno.EOPNOTSUPP), exc
    try:
        value = await alice.call(m.GetXattr(path="/tmp/abs", name="user.secret"))
        pytest.fail(f"read the outside file's xattr through a symlink: {value!r}")
    except RemoteError as exc:
        assert exc.errno in (errno.EACCES, errno.ENODATA, errno.EPERM, errno.EOPNOTSUPP), exc
    try:
        names = await alice.call(m.ListXattr(path="/tmp/abs"))
        assert "user.secret" not in names
    except RemoteError as exc:
        assert exc.errno in (errno.EACCES, errno.EPERM, errno.EOPNOTSUPP), exc
    s = (env.outside / "sentinel.txt").stat()
    assert s.st_mode & 0o777 != 0o777 and s.st_mtime_ns != 5 and s.st_size == len(SENTINEL)
    # hard-linking the symlink makes another symlink, never a second name for the sentinel
    try:
        await alice.call(m.Link(old="/tmp/abs", new="/tmp/abs-hardlink"))
    except RemoteError as exc:
        assert exc.errno in (errno.EACCES, errno.EPERM), exc
    else:
        assert (env.tmp / "abs-hardlink").is_symlink()
        await alice.call(m.Unlink(path="/tmp/abs-hardlink"))
    assert (env.outside / "sentinel.txt").stat().st_nlink == 1
    # renaming the symlink moves the link, not the target
    await alice.call(m.Rename(old="/tmp/abs", new="/tmp/abs2"))
    await alice.call(m.Rename(old="/tmp/abs2", new="/tmp/abs"))
    assert (env.tmp / "abs").is_symlink()


async def test_client_made_symlinks_are_confined(env: Env, alice: ServerClient) -> None:
    """Symlinks created over the protocol are stored as data and never followed out."""
    await alice.call(m.Symlink(path="/tmp/mine", target=str(env.outside)))
    await alice.call(m.Symlink(path="/tmp/mine-rel", target="../../outside/canary"))
    await alice.call(m.Symlink(path="/tmp/mine-dangle", target=str(env.outside / "canary" / "x")))
    await fails(alice, m.Open, path="/tmp/mine/sentinel.txt", flags=RD)
    await fails(alice, m.Create, path="/tmp/mine-rel/x", mode=0o644, flags=os.O_RDWR)
    await fails(alice, m.Create, path="/tmp/mine-dangle", mode=0o644, flags=os.O_RDWR)
    await fails(alice, m.Mkdir, path="/tmp/mine-rel/d", mode=0o755)
    for name in ("mine", "mine-rel", "mine-dangle"):
        await alice.call(m.Unlink(path=f"/tmp/{name}"))


async def test_symlink_cannot_widen_acl(env: Env, nursery: trio.Nursery) -> None:
    """bob may do anything under /tmp/bob, but a symlink there into /private gives him nothing."""
    bob = env.sp.client(nursery, "bob", env.setup.keys["bob"])
    await fails(bob, m.Open, path="/tmp/bob/sneaky/secret.txt", flags=RD)
    await fails(bob, m.Stat, path="/tmp/bob/sneaky/secret.txt")
    await fails(bob, m.Checksum, path="/tmp/bob/sneaky/secret.txt")
    await fails(bob, m.List, ESCAPE_ERRNOS | {errno.ENOTDIR}, path="/tmp/bob/sneaky")
    await fails(bob, m.Open, path="/tmp/bob/sneakyfile", flags=RD)
    await fails(bob, m.Unlink, path="/tmp/bob/sneaky/secret.txt")
    await fails(bob, m.Create, path="/tmp/bob/sneaky/planted.txt", mode=0o644, flags=os.O_RDWR)
    await fails(bob, m.Rename, old="/tmp/bob/sneaky/secret.txt", new="/tmp/bob/got.txt")
    await fails(bob, m.TransferOffer, path="/tmp/bob/sneaky/secret.txt")
    # he can make his own symlink to it, too: still nothing
    await bob.call(m.Symlink(path="/tmp/bob/mine", target="../../private"))
    await fails(bob, m.Open, path="/tmp/bob/mine/secret.txt", flags=RD)
    await bob.call(m.Unlink(path="/tmp/bob/mine"))
    assert (env.setup.export / "private" / "secret.txt").read_text() == "export-private\n"
    assert sorted(p.name for p in (env.setup.export / "private").iterdir()) == ["secret.txt"]
    # a symlink within his own grant still works
    await bob.call(m.Mkdir(path="/tmp/bob/real", mode=0o755))
    await bob.call(m.Symlink(path="/tmp/bob/alias", target="real"))
    o = await bob.call(m.Create(path="/tmp/bob/alias/f.txt", mode=0o644, flags=os.O_RDWR))
    await bob.call(m.Close(handle=o.handle))
    assert (env.tmp / "bob" / "real" / "f.txt").exists()
    await bob.aclose()


# --- the race ---------------------------------------------------------------------------------------
async def test_swap_race(env: Env, alice: ServerClient) -> None:
    """A thread keeps swapping /tmp/race/d (a real directory) with a symlink to the outside
    directory while the client hammers open/stat/create/mkdir/list under d for ~2 s."""
    race = env.tmp / "race"
    race.mkdir()
    (race / "d").mkdir()
    (race / "d" / "sentinel.txt").write_text("inside-race\n")
    os.symlink(env.outside, race / "other")
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        dfd = os.open(race, os.O_RDONLY | os.O_DIRECTORY)
        try:
            while not stop.is_set():
                native.renameat2(dfd, "d", dfd, "other", 2)  # RENAME_EXCHANGE: atomic swap
                swaps += 1
        finally:
            os.close(dfd)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    counts = {"ok": 0, "denied": 0}
    leaked: list[str] = []

    async def attempt(fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            await fn()
            counts["ok"] += 1
        except RemoteError as exc:
            assert exc.errno in (errno.EACCES, errno.ENOENT, errno.EEXIST, errno.ENOTDIR), exc
            counts["denied"] += 1

    async def worker(w: int) -> None:
        i = 0
        deadline = trio.current_time() + 2.0
        while trio.current_time() < deadline:
            i += 1

            async def read() -> None:
                o = await alice.call(m.Open(path="/tmp/race/d/sentinel.txt", flags=RD))
                try:
                    data = await alice.call(m.Read(handle=o.handle, offset=0, size=100))
                finally:
                    await alice.call(m.Close(handle=o.handle))
                if data != b"inside-race\n":
                    leaked.append(f"read {data!r}")

            async def stat() -> None:
                a = await alice.call(m.Stat(path="/tmp/race/d/sentinel.txt"))
                if a.ino == (env.outside / "sentinel.txt").stat().st_ino:
                    leaked.append("stat reached the outside sentinel")

            async def create(i: int = i) -> None:
                o = await alice.call(m.Create(path=f"/tmp/race/d/new-{w}-{i}", mode=0o644, flags=os.O_RDWR))
                await alice.call(m.Close(handle=o.handle))

            async def mkdir(i: int = i) -> None:
                await alice.call(m.Mkdir(path=f"/tmp/race/d/dir-{w}-{i}", mode=0o755))

            async def listing() -> None:
                page = await alice.call(m.List(path="/tmp/race/d"))
                if any(e.name == "canary" for e in page.entries):
                    leaked.append("listed the outside directory")

            async def checksum() -> None:
                await alice.call(m.Checksum(path="/tmp/race/d/sentinel.txt"))

            for fn in (read, stat, create, mkdir, listing, checksum):
                await attempt(fn)

    start = time.monotonic()
    try:
        async with trio.open_nursery() as nursery:
            for w in range(8):
                nursery.start_soon(worker, w)
    finally:
        stop.set()
        await trio.to_thread.run_sync(thread.join)
    elapsed = time.monotonic() - start
    print(f"race: {swaps} swaps, {counts} in {elapsed:.1f}s")
    assert not leaked, leaked
    assert swaps > 100 and counts["ok"] > 10 and counts["denied"] > 10, (swaps, counts)
    assert_outside_untouched(env)


async def test_paths_longer_than_path_max(env: Env, alice: ServerClient) -> None:
    """An export-relative path past PATH_MAX works like a short one (the server resolves it in
    chunks); a symlink deep in such a path is never followed, and ``..`` stays refused."""
    parts = [f"{i:03d}" + "d" * 197 for i in range(22)]  # 22 x 201 bytes: 4422 in all
    path = "/tmp/deep"
    await alice.call(m.Mkdir(path=path, mode=0o755))
    for p in parts:
        path += "/" + p
        await alice.call(m.Mkdir(path=path, mode=0o755))
    assert len(path) > 4096
    f = path + "/f.txt"
    o = await alice.call(m.Create(path=f, mode=0o644, flags=os.O_RDWR))
    await alice.call(m.Write(handle=o.handle, offset=0, data=b"deep\n"))
    await alice.call(m.Close(handle=o.handle))
    assert (await alice.call(m.Stat(path=f))).size == 5
    o = await alice.call(m.Open(path=f, flags=RD))
    assert await alice.call(m.Read(handle=o.handle, offset=0, size=100)) == b"deep\n"
    await alice.call(m.Close(handle=o.handle))
    await alice.call(m.Rename(old=f, new=path + "/g.txt"))
    assert [e.name for e in (await alice.call(m.List(path=path))).entries] == ["g.txt"]
    # On disk: where the client said, walked with dir fds (the absolute path is too long to name).
    fd = os.open(env.tmp / "deep", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for p in parts:
            nfd = os.open(p, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.listdir(fd) == ["g.txt"]
        # Symlinks planted deep inside (beyond the first chunk) are not followed: one pointing
        # out, and one to a sibling directory (resolving it beneath its own directory would
        # stay inside the export, but the real path the ACL sees would then be wrong).
        os.symlink(str(env.outside), "out", dir_fd=fd)
        os.mkdir("sub", dir_fd=fd)
        os.symlink("sub", "alias", dir_fd=fd)
    finally:
        os.close(fd)
    await fails(alice, m.Open, path=path + "/out/sentinel.txt", flags=RD)
    await fails(alice, m.Create, path=path + "/out/planted.txt", mode=0o644, flags=os.O_RDWR)
    await fails(alice, m.Stat, path=path + "/../" + parts[-1] + "/g.txt")
    await fails(alice, m.Create, {errno.EACCES}, path=path + "/alias/x.txt", mode=0o644, flags=os.O_RDWR)
    assert (await alice.call(m.Stat(path=path + "/sub"))).mode & 0o170000 == 0o040000  # the real one works
