"""`EtfsOperations`: the pyfuse3 request handlers of the etfs mount.

The mount root lists the configured servers as directories; below them every inode stands
for (server, export-relative path) (see `inodes`).  Handlers talk to servers through the
`Pool`'s pipelined `ServerClient`s and never block the trio loop.

Error habit (as in S3QL): handlers raise only `pyfuse3.FUSEError`.  The code inside them lets
`OSError` (`RemoteError`/`ConnectionLost` carry the server's or the transport's errno) travel
up, and the `_edge` decorator converts it in this one place; anything else is a bug, logged
with its traceback and answered with EIO.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from etfs import copyrange, identities
from etfs.client import ConnectionLost, Pool, ServerClient
from etfs.config import ClientConfig
from etfs.protocol import messages as m

from .handles import OpenFile
from .inodes import ROOT_INODE, InodeTable, Node, join, stamp

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

LIST_PAGE = 1000
BLKSIZE = 1024 * 1024  # st_blksize: makes cp and friends use 1 MiB buffers
ETFS_XATTRS = ("user.etfs.server", "user.etfs.path", "user.etfs.checksum")
# Requests that are safe to repeat after the connection reset under them.
_IDEMPOTENT = (m.Stat, m.List, m.Readlink, m.StatFs, m.GetXattr, m.ListXattr, m.SetAttr, m.Checksum)


def _edge(
    fn: Callable[Concatenate[EtfsOperations, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[EtfsOperations, P], Coroutine[Any, Any, R]]:
    """Convert every error leaving a handler into `pyfuse3.FUSEError` (the only place that does)."""

    @functools.wraps(fn)
    async def handler(self: EtfsOperations, /, *args: P.args, **kwargs: P.kwargs) -> R:
        # The caller's uid picks the etfs identity of the request (`EtfsOperations._client`);
        # handlers without a request context act only through their handle's identity.
        uid = next((a.uid for a in args if isinstance(a, pyfuse3.RequestContext)), identities.NO_CALLER)
        token = identities.caller.set(uid)
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code == errno.ECONNRESET:
                code = errno.EIO  # applications understand EIO for a broken transport
            log.debug("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(code) from None
        except UnicodeError:
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except trio.TooSlowError:
            raise pyfuse3.FUSEError(errno.ETIMEDOUT) from None
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            identities.caller.reset(token)

    return handler


@dataclass
class DirHandle:
    """An open directory: the listing snapshot fetched page by page (offsets index into it)."""

    node: Node
    caller: int | None = None  # the uid that opened it: its identity lists the directory
    entries: list[m.Entry] = field(default_factory=list)
    asked: list[int] = field(default_factory=list)  # per entry: `stamp` when its page was asked for
    after: str = ""
    more: bool = True


def _changed_elsewhere(old: m.Attr, new: m.Attr) -> bool:
    return (old.size, old.mtime_ns, old.ctime_ns) != (new.size, new.mtime_ns, new.ctime_ns)


def _fs_name(name: bytes) -> str:
    return name.decode("utf-8")


class EtfsOperations(pyfuse3.Operations):
    """The filesystem (see the module docstring)."""

    supports_dot_lookup = False
    enable_writeback_cache = False  # write-behind is ours: the server's size must stay truthful
    enable_acl = False

    def __init__(self, config: ClientConfig, pool: Pool, nursery: trio.Nursery) -> None:
        super().__init__()
        self.config = config
        self.pool = pool
        self._nursery = nursery
        self.table = InodeTable(list(config.servers))
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, DirHandle] = {}
        self._fh = itertools.count(1)
        self._started_ns = time.time_ns()
        self._uid = os.geteuid()
        self._gid = os.getegid()
        # Set by the daemon's services (`etfs.daemon.services`); until then, and on a mount
        # without it, every request acts as the mount's identity.
        self.identities: identities.Identities | None = None

    # --- API for the copy hook and the daemon -------------------------------------------------
    def file_handle(self, fh: int) -> OpenFile:
        """The open file behind a kernel file handle (KeyError if there is none)."""
        return self._files[fh]

    async def sync_inode(self, inode: int) -> None:
        """Send every open file's pending writes of an inode to its server."""
        node = self.table.get(inode)
        if node is not None:
            await self._flush_inode(node)

    def replaced(self, inode: int) -> None:
        """The inode's server file was replaced under its path (a copy renamed onto it): open
        handles follow the new file, caches here and in the kernel are dropped."""
        node = self.table.get(inode)
        if node is not None:
            for fh in list(node.open_files):
                if (f := self._files.get(fh)) is not None:
                    f.replaced()
        self.invalidate(inode)

    def invalidate(self, inode: int) -> None:
        """Forget cached attributes of an inode here and in the kernel (data too).

        The kernel notification runs in a worker thread from a task: called synchronously
        from a handler touching that inode it could wait for that very handler.
        """
        node = self.table.get(inode)
        if node is not None:
            node.touch()
            for fh in node.open_files:
                f = self._files.get(fh)
                if f is not None:
                    f.drop_readahead()
        self._nursery.start_soon(self._notify_kernel, inode)

    async def _notify_kernel(self, inode: int, attr_only: bool = False) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, attr_only)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTCONN):  # kernel does not know it / unmounted
                log.debug("invalidate_inode(%d): %s", inode, exc)
        except Exception:  # pyfuse3 raises RuntimeError-like errors after unmount
            log.debug("invalidate_inode(%d) failed", inode, exc_info=True)

    # --- helpers ------------------------------------------------------------------------------
    def _client(self, server: str) -> ServerClient:
        """The client of ``server`` for the current request's caller (`identities.caller`):
        the caller's own etfs identity, the mount's, or EACCES (see `etfs.identities`)."""
        if self.identities is None:
            return self.pool[server]
        return self.identities.client(server, identities.caller.get())

    def _epoch(self, server: str) -> int:
        """The namespace epoch of ``server`` over every identity's client."""
        if self.identities is None:
            return self.pool[server].namespace_epoch
        return self.identities.epoch(server)

    async def _call(self, server: str, req: m.Request[T]) -> T:
        client = self._client(server)
        # call_own: the names this filesystem creates are tracked by `_creating`.
        try:
            return await client.call_own(req)
        except ConnectionLost as exc:
            if exc.errno != errno.ECONNRESET or type(req) not in _IDEMPOTENT:
                raise
        return await client.call_own(req)

    def _node(self, inode: int) -> Node:
        node = self.table.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _remote(self, inode: int) -> Node:
        """A node below a server directory (or the server directory itself) that its path
        still names: requests go by path, and an unlinked file's path may name another file."""
        node = self._node(inode)
        if not node.server:
            raise pyfuse3.FUSEError(errno.EPERM)  # the mount root is not on any server
        if not node.linked:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _dir_attr(self, nlink: int = 2) -> m.Attr:
        t = self._started_ns
        return m.Attr(0, stat.S_IFDIR | 0o755, nlink, self._uid, self._gid, 0, 0, t, t, t)

    def _entry(self, node: Node, attr: m.Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.inode
        e.generation = 0
        # A name of a file known here by several names is looked up every time: which name
        # the kernel resolved decides the path its requests go by (see `lookup`).
        e.entry_timeout = 0 if len(node.links) > 1 else self.config.cache.entry_ttl
        e.attr_timeout = self.config.cache.attr_ttl
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = 0
        size = attr.size
        blocks = attr.blocks
        if stat.S_ISREG(attr.mode):
            size = max(size, self._pending_size(node))
            # cp treats st_blocks*512 < size as sparse and never uses copy_file_range then.
            blocks = max(blocks, math.ceil(size / 512))
        e.st_size = size
        e.st_blocks = blocks
        e.st_blksize = BLKSIZE
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _pending_size(self, node: Node) -> int:
        """End of data written through open files but maybe not yet on the server."""
        end = 0
        for fh in node.open_files:
            f = self._files.get(fh)
            if f is not None and f.dirty:
                end = max(end, f.dirty_end)
        return end

    async def _flush_inode(self, node: Node, except_fh: int | None = None) -> None:
        """Make writes of every open file of an inode visible on the server."""
        for fh in list(node.open_files):
            f = self._files.get(fh)
            if f is not None and fh != except_fh and f.dirty:
                await f.sync()

    def _remember(self, node: Node, attr: m.Attr, asked: int) -> pyfuse3.EntryAttributes:
        self.table.set_attr(node, attr, self.config.cache.attr_ttl, asked)
        return self._entry(node, attr)

    async def _attr(self, node: Node) -> m.Attr:
        if node.inode == ROOT_INODE:
            return self._dir_attr(2 + len(self.config.servers))
        cached = self.table.fresh_attr(node)
        if cached is not None:
            return cached
        asked = stamp()
        if not node.linked:
            # Unlinked but still open: its path now names something else; ask by handle.
            for fh in node.open_files:
                if (f := self._files.get(fh)) is not None:
                    attr = await f.call(lambda h: m.FStat(handle=h))
                    self.table.set_attr(node, attr, 0, asked)
                    return attr
            if node.attr is not None:
                return node.attr
        if node.pinned:
            # A down or hung server's directory still exists in the root (so bind mounts and
            # `ls -l` of the root never wait for it); using its contents fails instead.
            attr_or_none: m.Attr | None = None
            with trio.move_on_after(self.config.connect_timeout):
                try:
                    attr_or_none = await self._call(node.server, m.Stat(path=node.path))
                except ConnectionLost:
                    pass
            if attr_or_none is None:
                return node.attr or self._dir_attr()
            attr = attr_or_none
        else:
            attr = await self._by_path(node, m.Stat, lambda a: a)
        self.table.set_attr(node, attr, self.config.cache.attr_ttl, asked)
        return attr

    async def _by_path(
        self,
        node: Node,
        request_at: Callable[[str], m.Request[T]],
        file_of: Callable[[T], m.Attr] | None,
        undo: Callable[[T], Coroutine[Any, Any, None]] | None = None,
    ) -> T:
        """A request by ``node``'s path (Stat, Open; ``request_at`` makes it for one path), on
        the node's own file.

        A multiply linked file is one node for all its names here, and any of them may have
        been unlinked or replaced by another client since (this table never hears of it):
        a name that is gone (ENOENT) or now another file (the reply's inode number, read by
        ``file_of``; None: a request that changed what it reached, which is not repeated on
        another name) is forgotten and the next one tried; ``undo`` releases a reply that went
        to another file (an open handle).  A node of one name simply follows its path.
        """
        while True:
            path = node.path
            several = node.linked and len(node.links) > 1
            known = node.attr.ino if node.attr is not None else None
            try:
                value = await self._call(node.server, request_at(path))
            except OSError as exc:
                if exc.errno != errno.ENOENT or not several or path not in node.links:
                    raise
                log.debug("%s:%s: gone, using another name of inode %d", node.server, path, node.inode)
                self.table.drop_name(node, path)
                continue
            if file_of is None or not several or known is None or path not in node.links:
                return value
            if file_of(value).ino == known:
                return value
            log.debug("%s:%s: another file now, using another name of %d", node.server, path, node.inode)
            self.table.drop_name(node, path)
            if undo is not None:
                await undo(value)

    def _child(self, parent: Node, name: bytes) -> tuple[str, str]:
        if not parent.server:
            raise pyfuse3.FUSEError(errno.EPERM)
        return parent.server, join(parent.path, _fs_name(name))

    def _new_entry(self, server: str, path: str, attr: m.Attr, asked: int) -> pyfuse3.EntryAttributes:
        """An entry the kernel will hold a reference to (lookup count + 1)."""
        node = self.table.ensure(server, path, attr, asked)
        node.lookups += 1
        return self._remember(node, attr, asked)

    def _parent_changed(self, parent: Node) -> None:
        parent.touch()  # its mtime, ctime and maybe nlink changed

    def _creating(self, parent: Node, name: bytes) -> tuple[str, str]:
        """`_child` for a request that creates ``name`` (before sending it: it may succeed
        on the server even when the reply is lost)."""
        server, path = self._child(parent, name)
        self.table.may_exist(parent, _fs_name(name))
        return server, path

    # --- lookup / attributes ------------------------------------------------------------------
    @_edge
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if not parent.server:
            inode = self.table.server_inodes.get(_fs_name(name))
            if inode is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            node = self._node(inode)
            node.lookups += 1
            return self._entry(node, await self._attr(node))
        server, path = self._child(parent, name)
        node_or_none = self.table.find(server, path)
        if (
            node_or_none is not None
            # One of several names: another client may have unlinked or replaced it, and the
            # server's answer makes it the name the open that follows goes by (`InodeTable.confirm`).
            and len(node_or_none.links) < 2
            and (cached := self.table.fresh_attr(node_or_none)) is not None
        ):
            node_or_none.lookups += 1
            return self._entry(node_or_none, cached)
        if parent.names is not None:
            absent_for = self.table.known_absent(parent, _fs_name(name), self._epoch(server))
            if absent_for > 0:
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = min(absent_for, self.config.cache.negative_ttl)
                return negative
        asked = stamp()
        try:
            attr = await self._call(server, m.Stat(path=path))
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0  # cached by the kernel as "does not exist" for negative_ttl
            negative.entry_timeout = self.config.cache.negative_ttl
            return negative
        return self._new_entry(server, path, attr, asked)

    @_edge
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            self.table.forget(inode, nlookup)

    @_edge
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        # Writes accepted here reach the server first, so size and mtime are those of every
        # completed write(2).
        await self._flush_inode(node)
        return self._entry(node, await self._attr(node))

    @_edge
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if not node.server or node.pinned:
            raise pyfuse3.FUSEError(errno.EPERM)
        # An unlinked (or replaced) file still open here can be truncated through a handle;
        # its other attributes are out of reach (no path).
        by_handle = None if node.linked else self._writable_handle(node, fh)
        if not node.linked and (by_handle is None or not fields.update_size):
            raise pyfuse3.FUSEError(errno.ESTALE)
        req: dict[str, Any] = {}
        if fields.update_size:
            await self._flush_inode(node)
            for ofh in node.open_files:
                f = self._files.get(ofh)
                if f is not None:
                    f.drop_readahead()
            req["size"] = attr.st_size
        if fields.update_mode:
            req["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            req["uid"] = attr.st_uid
        if fields.update_gid:
            req["gid"] = attr.st_gid
        # Times are sent as given.  pyfuse3 has already turned UTIME_NOW into the daemon's clock
        # (it does not say which it was), so `touch` stamps the client's time, as sshfs does;
        # guessing "now" from a recent value broke rsync -a / cp -p of freshly written files.
        if fields.update_atime:
            req["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            req["mtime_ns"] = attr.st_mtime_ns
        if not req:  # e.g. ctime only
            return self._entry(node, await self._attr(node))
        node.touch()
        asked = stamp()
        if by_handle is not None:
            new = await by_handle.call(lambda h: m.FTruncate(handle=h, size=attr.st_size))
        else:
            new = await self._call(node.server, m.SetAttr(path=node.path, **req))
        return self._remember(node, new, asked)

    def _writable_handle(self, node: Node, fh: int | None) -> OpenFile | None:
        """The open file to change an unlinked node through: ``fh`` if given, else any writable one."""
        candidates = [fh] if fh is not None else sorted(node.open_files)
        for c in candidates:
            f = self._files.get(c) if c is not None else None
            if f is not None and f.node is node and f.flags & os.O_ACCMODE != os.O_RDONLY:
                return f
        return None

    # --- directories --------------------------------------------------------------------------
    @_edge
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        fh = next(self._fh)
        self._dirs[fh] = DirHandle(node, identities.caller.get())
        return fh

    @_edge
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        h = self._dirs[fh]
        node = h.node
        if not node.server:
            names = list(self.config.servers)
            for i in range(start_id, len(names)):
                child = self._node(self.table.server_inodes[names[i]])
                attr = child.attr or self._dir_attr()
                if not pyfuse3.readdir_reply(token, names[i].encode(), self._entry(child, attr), i + 1):
                    return
                child.lookups += 1
            return
        if start_id == 0:  # (re)start: a fresh listing
            h.entries, h.asked, h.after, h.more = [], [], "", True
        i = start_id
        ttl = self.config.cache.dir_ttl
        while True:
            if i >= len(h.entries):
                if not h.more:
                    return
                asked = stamp()
                with identities.acting_as(h.caller):
                    page = await self._call(
                        node.server, m.List(path=node.path, after=h.after, limit=LIST_PAGE)
                    )
                h.entries.extend(page.entries)
                h.asked.extend([asked] * len(page.entries))
                h.more = page.more and bool(page.entries)
                if page.entries:
                    h.after = page.entries[-1].name
                continue
            ent = h.entries[i]
            child = self.table.ensure(node.server, join(node.path, ent.name), ent.attr, h.asked[i])
            self.table.set_attr(child, ent.attr, ttl, h.asked[i])
            if not pyfuse3.readdir_reply(token, ent.name.encode(), self._entry(child, ent.attr), i + 1):
                self.table.discard_if_unused(child)
                return
            child.lookups += 1
            i += 1

    @_edge
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_edge
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_edge
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        server, path = self._creating(parent, name)
        epoch = self._epoch(server)
        asked = stamp()
        attr = await self._call(server, m.Mkdir(path=path, mode=mode & 0o7777))
        self._parent_changed(parent)
        entry = self._new_entry(server, path, attr, asked)
        self.table.know_empty(self._node(entry.st_ino), self.config.cache.negative_ttl, epoch)
        return entry

    @_edge
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        server, path = self._child(parent, name)
        await self._call(server, m.Rmdir(path=path))
        self.table.detach(server, path)
        self._parent_changed(parent)

    @_edge
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self._node(parent_inode)
        server, path = self._child(parent, name)
        node = self.table.find(server, path)
        if node is not None and node.open_files:
            # Still open here: once unlinked its path is useless, so fstat answers from the
            # attributes it had at this moment (with its writes on the server first).
            await self._flush_inode(node)
            asked = stamp()
            self.table.set_attr(node, await self._call(server, m.Stat(path=path)), 0, asked)
        if node is not None:
            await self._settle_handles(node)
        await self._call(server, m.Unlink(path=path))
        self.table.detach(server, path)
        self._parent_changed(parent)
        if node is not None:
            await self._links_changed(node)

    @_edge
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent = self._node(parent_inode_old)
        new_parent = self._node(parent_inode_new)
        if not old_parent.server or not new_parent.server:
            raise pyfuse3.FUSEError(errno.EPERM)  # server directories cannot move
        if old_parent.server != new_parent.server:
            # The VFS then lets mv copy and unlink (the copy goes server to server).
            raise pyfuse3.FUSEError(errno.EXDEV)
        server, old = self._child(old_parent, name_old)
        _, new = self._creating(new_parent, name_new)
        if exchange := bool(flags & pyfuse3.RENAME_EXCHANGE):
            self._creating(old_parent, name_old)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        if not exchange and (target := self.table.find(server, new)) is not None:
            await self._settle_handles(target)
        await self._call(server, m.Rename(old=old, new=new, noreplace=noreplace, exchange=exchange))
        moved, replaced = self.table.find(server, old), None if exchange else self.table.find(server, new)
        if exchange:
            self.table.exchange(server, old, new)
        else:
            self.table.rename(server, old, new)
        self._parent_changed(old_parent)
        self._parent_changed(new_parent)
        for n in (moved, replaced):  # their ctime (and a replaced file's nlink) changed
            if n is not None:
                await self._links_changed(n)

    # --- links --------------------------------------------------------------------------------
    @_edge
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        server, path = self._creating(parent, name)
        asked = stamp()
        attr = await self._call(server, m.Symlink(path=path, target=os.fsdecode(target)))
        self._parent_changed(parent)
        return self._new_entry(server, path, attr, asked)

    @_edge
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._remote(inode)
        target = await self._call(node.server, m.Readlink(path=node.path))
        return os.fsencode(target)

    @_edge
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._remote(inode)
        parent = self._node(new_parent_inode)
        server, path = self._creating(parent, new_name)
        if server != node.server:
            raise pyfuse3.FUSEError(errno.EXDEV)
        node.touch()  # its nlink and ctime change
        asked = stamp()
        attr = await self._call(server, m.Link(old=node.path, new=path))
        self._parent_changed(parent)
        # One inode for all names of the file (see inodes): the kernel shares its pages.
        self.table.add_name(node, path)
        node.lookups += 1
        entry = self._remember(node, attr, asked)
        await self._links_changed(node, force=True)
        return entry

    async def _links_changed(self, node: Node, force: bool = False) -> None:
        """A name of ``node``'s file was added, removed or moved: every name of a multiply
        linked file shows the new link count and ctime.  Inodes here are per name, so the
        other names are found by the server's inode number; the kernel's cached attributes
        of them are dropped too (attributes only: no lock involved)."""
        attr = node.attr
        if attr is None or (attr.nlink < 2 and not force):
            return
        for other in self.table.same_file(node.server, attr.ino):
            other.touch()
            await self._notify_kernel(other.inode, attr_only=True)

    @_edge
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        server, path = self._creating(parent, name)
        asked = stamp()
        attr = await self._call(server, m.Mknod(path=path, mode=mode, rdev=rdev))
        self._parent_changed(parent)
        return self._new_entry(server, path, attr, asked)

    # --- files --------------------------------------------------------------------------------
    def _register(self, node: Node, flags: int, opened: m.Opened, asked: int) -> pyfuse3.FileInfo:
        client = self._client(node.server)
        generation = client.handle_generation
        fh = next(self._fh)
        self._files[fh] = OpenFile(fh, node, flags, client, opened, generation, self._nursery)
        node.open_files.add(fh)
        self.table.set_attr(node, opened.attr, self.config.cache.attr_ttl, asked)
        # keep_cache=False: each open re-reads, so changes made on the server show up.
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    @staticmethod
    def _server_flags(flags: int) -> int:
        # The kernel computes offsets for O_APPEND itself; the server must write where told
        # (write-behind may have several writes in flight, an O_APPEND fd would reorder them).
        return flags & ~os.O_APPEND

    @_edge
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._remote(inode)
        if node.pinned:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC:
            await self._flush_inode(node)
            node.touch()
        asked = stamp()
        before = node.attr
        opened = await self._by_path(
            node,
            functools.partial(m.Open, flags=self._server_flags(flags)),
            # An O_TRUNC open has truncated whatever it reached: never a second file.
            None if flags & os.O_TRUNC else lambda o: o.attr,
            functools.partial(self._close_handle, node.server),
        )
        info = self._register(node, flags, opened, asked)
        if before is not None and _changed_elsewhere(before, opened.attr):
            # Close-to-open: the file changed since the kernel got its attributes (another
            # client wrote it); the kernel would keep reading up to the old size until
            # attr_ttl ran out.  Only attributes: open itself drops the pages (keep_cache
            # False), and this invalidation takes no lock the open holds.
            await self._notify_kernel(node.inode, attr_only=True)
        return info

    @_edge
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self._node(parent_inode)
        server, path = self._creating(parent, name)
        if flags & os.O_TRUNC and (existing := self.table.find(server, path)) is not None:
            await self._flush_inode(existing)
            existing.touch()
        asked = stamp()
        opened = await self._call(
            server, m.Create(path=path, mode=mode & 0o7777, flags=self._server_flags(flags))
        )
        if opened.parent is not None and parent.changed <= asked:
            # The directory as the create left it, and nothing else of ours changed it since we
            # asked: keep these.  Replies to anything asked before now are stale: they may
            # predate the create.
            now = stamp()
            parent.changed = now
            self.table.set_attr(parent, opened.parent, self.config.cache.attr_ttl, now)
        else:
            self._parent_changed(parent)
        entry = self._new_entry(server, path, opened.attr, asked)
        node = self._node(entry.st_ino)
        return self._register(node, flags, opened, asked), entry

    @_edge
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:  # type: ignore[override]
        f = self._files[fh]
        await self._flush_inode(f.node, except_fh=fh)
        return await f.read(off, size)

    @_edge
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._files[fh]
        return await f.write(off, buf)

    @_edge
    async def flush(self, fh: int) -> None:
        f = self._files[fh]
        await f.flush()
        self.table.expire(f.node)

    @_edge
    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self._files[fh]
        # fsync(2) makes the file durable, also what other descriptors wrote into it.
        await self._flush_inode(f.node, except_fh=fh)
        await f.fsync(datasync)

    @_edge
    async def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is None:
            return
        f.node.open_files.discard(fh)
        self.table.expire(f.node)
        if f.dirty:
            await self._close(f)  # data still to send: keep close(2) honest about it
        else:
            # Usually FLUSH already sent everything; the server-side Close need not delay
            # the next file (cp -r of many small files).
            self._nursery.start_soon(self._close, f)
        self.table.discard_if_unused(f.node)

    async def _settle_handles(self, node: Node) -> None:
        """Open files of ``node`` that a copy replaced reopen now (`OpenFile.settle`)."""
        for fh in list(node.open_files):
            if (f := self._files.get(fh)) is not None:
                await f.settle()

    async def _close_handle(self, server: str, opened: m.Opened) -> None:
        """Close a server handle nothing uses (an open that reached the wrong file)."""
        try:
            await self._call(server, m.Close(handle=opened.handle))
        except OSError as exc:
            log.debug("%s: close of an unused handle: %s", server, exc)

    async def _close(self, f: OpenFile) -> None:
        try:
            await f.close()
        except OSError as exc:
            # close(2) has already returned; a late write error can only be logged.
            log.warning("%s:%s: error at release: %s", f.server, f.path, exc)

    # --- filesystem ---------------------------------------------------------------------------
    @_edge
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        # pyfuse3 does not say which inode statfs is for; the copyrange shim does (read it
        # before any await).  Below a server: that server's file system; the mount root (or
        # without the shim): the sum over reachable servers.
        node = self.table.get(copyrange.statfs_inode())
        servers = [node.server] if node is not None and node.server else list(self.config.servers)
        frsize = 4096
        total = [0, 0, 0, 0, 0]
        namemax = 255

        async def one(server: str) -> None:
            nonlocal namemax
            try:
                with trio.fail_after(self.config.connect_timeout):
                    s = await self._call(server, m.StatFs())
            except (OSError, trio.TooSlowError) as exc:
                log.debug("statfs of %s: %s", server, exc)
                return
            scale = s.frsize / frsize
            total[0] += int(s.blocks * scale)
            total[1] += int(s.bfree * scale)
            total[2] += int(s.bavail * scale)
            total[3] += s.files
            total[4] += s.ffree
            namemax = min(namemax, s.namemax)

        async with trio.open_nursery() as nursery:
            for server in servers:
                nursery.start_soon(one, server)
        out = pyfuse3.StatvfsData()
        out.f_bsize = BLKSIZE
        out.f_frsize = frsize
        out.f_blocks, out.f_bfree, out.f_bavail, out.f_files, out.f_ffree = total
        out.f_favail = total[4]
        out.f_namemax = namemax
        return out

    # --- extended attributes ------------------------------------------------------------------
    @_edge
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode)
        key = _fs_name(name)
        if not node.server or not key.startswith("user."):
            raise pyfuse3.FUSEError(errno.ENODATA)
        node = self._remote(inode)
        # Computed attributes; the server's own user.etfs.* (digest, transfer_id, source of a
        # transfer) pass through below.
        if key == "user.etfs.server":
            return node.server.encode()
        if key == "user.etfs.path":
            return node.path.encode()
        if key == "user.etfs.checksum":
            await self._flush_inode(node)
            digest = await self._call(node.server, m.Checksum(path=node.path))
            return f"xxh3-128:{digest}".encode()
        return await self._call(node.server, m.GetXattr(path=node.path, name=key))

    @_edge
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        if not self._node(inode).server:
            return []
        node = self._remote(inode)
        # The computed user.etfs.* are readable but not listed: `mv` and `cp -a` copy every
        # listed attribute (and the checksum would read the whole file).
        names = await self._call(node.server, m.ListXattr(path=node.path))
        return [n.encode() for n in names if n not in ETFS_XATTRS]

    @_edge
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._remote(inode)
        key = _fs_name(name)
        if key in ETFS_XATTRS:
            raise pyfuse3.FUSEError(errno.EPERM)  # computed etfs information is read-only
        if not key.startswith("user."):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        node.touch()  # ctime
        await self._call(node.server, m.SetXattr(path=node.path, name=key, value=value))

    @_edge
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self._remote(inode)
        key = _fs_name(name)
        if key in ETFS_XATTRS:
            raise pyfuse3.FUSEError(errno.EPERM)
        if not key.startswith("user."):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        node.touch()
        await self._call(node.server, m.RemoveXattr(path=node.path, name=key))
