"""The inode table: kernel inode numbers <-> (server, export-relative path), with lookup counts.

Inode 1 is the mount root, inodes 2..N+1 are the configured servers' top directories (fixed,
never forgotten); every other inode is allocated on first sight of a path and lives while the
kernel holds a lookup reference to it (``lookup`` and readdirplus entries add one, ``forget``
takes them away).  Inode numbers are never reused, so the FUSE generation can stay 0.

Paths move with renames (`rename` rewrites a whole subtree) and are detached on unlink/rmdir
so a new file under the old name gets a new inode while the old one lives on until forgotten.

Hard links: a file the server reports with more than one link is one node for all of its
names (found by the server's inode number), so the kernel sees one inode (one ``st_ino``,
shared pages, as `tar` and `rsync -H` expect).  The node's `path` is one of its names
(requests go by path); `links` holds all names known here, and unlinking one name moves
`path` to another.  Another client (or the server's own users) may unlink or replace any of
those names without this table hearing of it, so a name is only trusted as far as the server
last confirmed it: the server showing a name as a different file takes it from the node
(`ensure`), a name it shows as the node's file becomes the one requests use, and
`drop_name` forgets a name a by-path request found gone.
"""

from __future__ import annotations

import itertools
import logging
import stat as st
import time
from dataclasses import dataclass, field

from etfs.protocol import messages as m

log = logging.getLogger(__name__)

ROOT_INODE = 1
# A logical clock of this client's changes: a server reply to a request sent before this
# client's last change of a file describes the file before that change and must not be
# cached (it would roll back a size or mtime the client knows to be newer).
_clock = itertools.count(1)


def stamp() -> int:
    """The current point of the change clock (take it before sending a request)."""
    return next(_clock)


@dataclass
class Node:
    """One inode: where it lives, how often the kernel references it, its cached attributes."""

    inode: int
    server: str  # "" for the mount root
    path: str  # export-relative, "/" for a server's top directory
    lookups: int = 0
    attr: m.Attr | None = None
    attr_expires: float = 0.0
    # False once unlinked/replaced: the node keeps its last path but no longer owns it.
    linked: bool = True
    pinned: bool = False  # root and server directories are never forgotten
    open_files: set[int] = field(default_factory=set)
    links: set[str] = field(default_factory=set)  # every name of it known here (`path` too)
    # A directory whose complete contents we know (we created it empty): the names that may
    # exist in it, valid until `names_until` (monotonic) and while the server's namespace
    # epoch is `names_epoch`.  A lookup of any other name is answered "no such file" without
    # asking the server, like a negative dentry that the kernel could not have yet.
    names: set[str] | None = None
    names_until: float = 0.0
    names_epoch: int = 0
    changed: int = 0  # `stamp` of this client's last change of the file (data, size, attributes)

    def touch(self) -> None:
        """This client changed the file: cached attributes are stale, older replies too."""
        self.changed = stamp()
        self.attr_expires = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.server, self.path)


def join(parent: str, name: str) -> str:
    """Child path of an export-relative directory path."""
    return ("/" if parent == "/" else parent + "/") + name


class InodeTable:
    """Typed mapping between inode numbers and remote paths (see the module docstring)."""

    def __init__(self, servers: list[str]) -> None:
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[tuple[str, str], int] = {}
        # (server, server inode) -> node, for multiply linked non-directories
        self._by_ino: dict[tuple[str, int], int] = {}
        root = Node(ROOT_INODE, "", "/", pinned=True)
        self._nodes[ROOT_INODE] = root
        self.server_inodes: dict[str, int] = {}
        for i, name in enumerate(servers):
            node = Node(ROOT_INODE + 1 + i, name, "/", pinned=True)
            self._nodes[node.inode] = node
            self._by_key[node.key] = node.inode
            self.server_inodes[name] = node.inode
        self._next = itertools.count(ROOT_INODE + 1 + len(servers))

    def get(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def find(self, server: str, path: str) -> Node | None:
        inode = self._by_key.get((server, path))
        return None if inode is None else self._nodes[inode]

    def ensure(self, server: str, path: str, attr: m.Attr | None = None, asked: int | None = None) -> Node:
        """The node for a path, allocating a new inode on first sight (lookup count 0); a new
        name of a multiply linked file (``attr``) joins that file's node.

        ``attr`` is what the server just said the path is, asked for at ``asked`` (a `stamp`):
        a known name of a multiply linked node that is now another file leaves that node
        (another client unlinked or replaced it), and one still naming the node's file becomes
        the name its requests use (see `confirm`)."""
        inode = self._by_key.get((server, path))
        if inode is not None:
            node = self._nodes[inode]
            if attr is None or asked is None or node.changed > asked or self.confirm(node, path, attr):
                return node
            self.drop_name(node, path)
        if attr is not None and (other := self._linked_node(server, attr)) is not None:
            self.add_name(other, path)
            return other
        node = Node(next(self._next), server, path, links={path})
        self._nodes[node.inode] = node
        self._by_key[node.key] = node.inode
        return node

    def _linked_node(self, server: str, attr: m.Attr) -> Node | None:
        if attr.nlink < 2 or st.S_ISDIR(attr.mode):
            return None
        inode = self._by_ino.get((server, attr.ino))
        node = None if inode is None else self._nodes.get(inode)
        if node is None or not node.linked or node.attr is None:
            return None
        # Servers reuse inode numbers: only a node last seen with exactly these attributes
        # (all names of one file show the same) is taken for the same file.
        a = node.attr
        if (a.size, a.mtime_ns, a.ctime_ns, a.nlink) != (attr.size, attr.mtime_ns, attr.ctime_ns, attr.nlink):
            return None
        return node

    def confirm(self, node: Node, path: str, attr: m.Attr) -> bool:
        """The server says ``path``, a known name of ``node``, is the file ``attr``: whether
        that is still the node's file.  Only names of a multiply linked node can stop being
        it: a node of one name follows its path (a file replaced there stays this inode, and
        open handles follow it, see `etfs.fs.operations.EtfsOperations.replaced`).

        A confirmed name becomes the node's `path`, since it is the one known to exist; with
        a link count of one, the node's other names are gone (unlinked elsewhere)."""
        if len(node.links) < 2 or node.attr is None:
            return True
        if attr.ino != node.attr.ino:
            return False
        node.path = path
        if attr.nlink < 2:
            for other in node.links - {path}:
                self.drop_name(node, other)
        return True

    def drop_name(self, node: Node, path: str) -> None:
        """``path`` no longer names ``node``'s file (removed or replaced elsewhere): forget it
        as one of the node's names; the node lives on under its others."""
        if self._by_key.get((node.server, path)) == node.inode:
            del self._by_key[(node.server, path)]
        self._forget_name(node, path)

    def add_name(self, node: Node, path: str) -> None:
        """``path`` is (now) also a name of ``node``'s file (a hard link)."""
        node.links.add(path)
        self._by_key[(node.server, path)] = node.inode

    def set_attr(self, node: Node, attr: m.Attr, ttl: float, asked: int) -> None:
        """Cache a server's attributes, asked for at ``asked`` (a `stamp`), unless this client
        changed the file since."""
        if node.changed > asked:
            return
        node.attr = attr
        node.attr_expires = time.monotonic() + ttl
        if attr.nlink > 1 and node.linked and node.server and not st.S_ISDIR(attr.mode):
            self._by_ino.setdefault((node.server, attr.ino), node.inode)

    def fresh_attr(self, node: Node) -> m.Attr | None:
        if node.attr is not None and time.monotonic() < node.attr_expires:
            return node.attr
        return None

    def expire(self, node: Node) -> None:
        node.attr_expires = 0.0

    @staticmethod
    def know_empty(node: Node, ttl: float, epoch: int) -> None:
        """The directory was just created empty by us: names not added later do not exist."""
        if ttl > 0:
            node.names = set()
            node.names_until = time.monotonic() + ttl
            node.names_epoch = epoch

    @staticmethod
    def known_absent(node: Node, name: str, epoch: int) -> float:
        """Seconds for which ``name`` is known not to exist in the directory (0: ask the server)."""
        names = node.names
        if names is None or name in names:
            return 0.0
        left = node.names_until - time.monotonic()
        if left <= 0 or epoch != node.names_epoch:
            node.names = None
            return 0.0
        return left

    @staticmethod
    def may_exist(node: Node, name: str) -> None:
        """A name is being created (or may have been) in the directory: ask the server about it."""
        if node.names is not None:
            node.names.add(name)

    def same_file(self, server: str, ino: int) -> list[Node]:
        """Nodes (one per name) last seen as the server file ``ino``: hard links of it."""
        return [
            n for n in self._nodes.values() if n.server == server and n.attr is not None and n.attr.ino == ino
        ]

    def forget(self, inode: int, nlookup: int) -> None:
        node = self._nodes.get(inode)
        if node is None:
            log.warning("forget of unknown inode %d", inode)
            return
        node.lookups -= nlookup
        if node.lookups < 0:
            log.warning("inode %d: lookup count went negative", inode)
            node.lookups = 0
        self.discard_if_unused(node)

    def discard_if_unused(self, node: Node) -> None:
        """Drop a node nobody references (no kernel lookups, no open files)."""
        if node.pinned or node.lookups > 0 or node.open_files:
            return
        self._nodes.pop(node.inode, None)
        for path in node.links:
            if self._by_key.get((node.server, path)) == node.inode:
                del self._by_key[(node.server, path)]
        self._drop_ino(node)

    def _drop_ino(self, node: Node) -> None:
        if node.attr is not None and self._by_ino.get((node.server, node.attr.ino)) == node.inode:
            del self._by_ino[(node.server, node.attr.ino)]

    def detach(self, server: str, path: str) -> Node | None:
        """The path is gone (unlink, rmdir, replaced by a rename): its node no longer owns it
        (a hard-linked file lives on under its other names)."""
        inode = self._by_key.pop((server, path), None)
        if inode is None:
            return None
        node = self._nodes[inode]
        self._forget_name(node, path)
        self.discard_if_unused(node)
        return node

    def _forget_name(self, node: Node, path: str) -> None:
        node.links.discard(path)
        if node.links:
            if node.path == path:
                node.path = min(node.links)
            return
        node.linked = False  # attr stays: fstat of a still-open unlinked file answers from it
        self._drop_ino(node)

    def _move_name(self, node: Node, old: str, new: str) -> None:
        node.links.discard(old)
        node.links.add(new)
        if node.path == old:
            node.path = new

    def rename(self, server: str, old: str, new: str) -> None:
        """Move a path and everything beneath it (directories keep their inodes)."""
        a = self._by_key.get((server, old))
        if a is not None and a == self._by_key.get((server, new)):
            return  # two names of one file: rename(2) does nothing
        self.detach(server, new)
        prefix = old + "/"
        moved = [
            (key, ino)
            for key, ino in self._by_key.items()
            if key[0] == server and (key[1] == old or key[1].startswith(prefix))
        ]
        for key, _ in moved:
            del self._by_key[key]
        for key, ino in moved:
            new_path = new + key[1][len(old) :]
            node = self._nodes[ino]
            self._move_name(node, key[1], new_path)
            self.expire(node)
            stale = self._by_key.get((server, new_path))
            if stale is not None and stale != ino:
                self._forget_name(self._nodes[stale], new_path)
            self._by_key[(server, new_path)] = ino

    def exchange(self, server: str, a: str, b: str) -> None:
        """RENAME_EXCHANGE: the two subtrees swap paths."""
        tmp = f"\0exchange\0{a}"
        self.rename_keep(server, a, tmp)
        self.rename_keep(server, b, a)
        self.rename_keep(server, tmp, b)

    def rename_keep(self, server: str, old: str, new: str) -> None:
        """Like `rename` without detaching the target (for exchange's temporary name)."""
        prefix = old + "/"
        moved = [
            (key, ino)
            for key, ino in self._by_key.items()
            if key[0] == server and (key[1] == old or key[1].startswith(prefix))
        ]
        for key, _ in moved:
            del self._by_key[key]
        for key, ino in moved:
            node = self._nodes[ino]
            new_path = new + key[1][len(old) :]
            self._move_name(node, key[1], new_path)
            self.expire(node)
            self._by_key[(server, new_path)] = ino
