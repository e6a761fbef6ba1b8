"""Per local user etfs identities of a shared (root) mount: what `etfs login` hands the daemon.

A root mount is used by many local users.  Each may hand the daemon their own etfs user and
key per server (`etfs login`, over the control socket, which names the caller by
``SO_PEERCRED``); the daemon logs in to every named server with them before accepting them,
and keeps them in memory only, as one connection `Pool` per uid.  `etfs logout` forgets them
(connections dropped, keys released, handles opened with them fail with EACCES from then on);
so does the end of the mount.

Which identity a request acts as (`Identities.client`):

* the daemon's own uid and root: the mount's identity (its `mountpoints.yaml`);
* a uid that logged in: its own identity, on the servers it logged in to; other servers
  answer EACCES;
* any other uid: the mount's identity (``others: mount-identity``, the default, so a
  single-user setup needs nothing) or EACCES (``others: refuse``).

The filesystem learns the caller of a request from `caller` (a context variable set around
every pyfuse3 handler that has a request context, see `etfs.fs.operations`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import logging
import os
from collections.abc import Iterator

import trio

from etfs.client import Endpoint, Pool, RemoteError, ServerClient, endpoint_for
from etfs.config import ClientConfig
from etfs.transfer.engine import TransferEngine

log = logging.getLogger(__name__)

# The local uid a filesystem request comes from; None: the daemon itself (background work).
caller: contextvars.ContextVar[int | None] = contextvars.ContextVar("etfs_caller", default=None)
# `caller` of a filesystem request that names no caller (read, write, flush, release...): it
# must act through its open file's client; a server call by path from it is refused.
NO_CALLER = -1


@contextlib.contextmanager
def acting_as(uid: int | None) -> Iterator[None]:
    """Run a block as local user ``uid`` (see `caller`)."""
    token = caller.set(uid)
    try:
        yield
    finally:
        caller.reset(token)


class Identities:
    """The mount's identity plus one logged-in identity (a `Pool`) per local uid."""

    def __init__(
        self, config: ClientConfig, pool: Pool, engine: TransferEngine, nursery: trio.Nursery
    ) -> None:
        self.config = config
        self.pool = pool
        self.engine = engine
        self._nursery = nursery
        self._pools: dict[int, Pool] = {}
        self._users: dict[int, dict[str, str]] = {}
        self._engines: dict[int, TransferEngine] = {}
        # namespace_epoch of clients already logged out, so `epoch` never goes back.
        self._retired: dict[str, int] = {}

    # --- who acts as whom -----------------------------------------------------------------------
    @staticmethod
    def privileged(uid: int | None) -> bool:
        """The daemon itself, root and the daemon's own uid act as the mount's identity."""
        return uid is None or uid == 0 or uid == os.geteuid()

    def pool_for(self, uid: int | None) -> Pool | None:
        """The pool requests of ``uid`` go through, or None if its requests are refused."""
        if self.privileged(uid):
            return self.pool
        assert uid is not None
        own = self._pools.get(uid)
        if own is not None:
            return own
        return self.pool if self.config.others == "mount-identity" else None

    def client(self, server: str, uid: int | None) -> ServerClient:
        """The client for ``server`` that a request of ``uid`` uses; EACCES if there is none."""
        if uid == NO_CALLER:
            raise OSError(errno.EACCES, "a request without a caller may act only through its open file")
        pool = self.pool_for(uid)
        if pool is None:
            raise OSError(errno.EACCES, f"uid {uid} has no etfs identity on this mount (etfs login)")
        try:
            return pool[server]
        except KeyError:
            raise OSError(errno.EACCES, f"uid {uid} did not log in to {server}") from None

    def epoch(self, server: str) -> int:
        """A counter that grows whenever any identity's client created a name on ``server``
        outside the filesystem (transfers): the filesystem's `namespace_epoch`."""
        total = self._retired.get(server, 0) + self.pool[server].namespace_epoch
        for p in self._pools.values():
            if server in p.clients:
                total += p[server].namespace_epoch
        return total

    def logged_in(self, uid: int) -> dict[str, str]:
        """server -> etfs user ``uid`` logged in as (empty if none)."""
        return dict(self._users.get(uid, {}))

    # --- transfers ------------------------------------------------------------------------------
    def engine_for(self, uid: int) -> TransferEngine | None:
        """The transfer engine of ``uid``'s `etfs cp`: the mount's for root, the uid's own
        (on its own identity) after a login, else None.  A uid without a login never copies
        as the mount's identity: a copy goes by server path and no kernel checks the
        caller's permissions on it."""
        if self.privileged(uid):
            return self.engine
        pool = self._pools.get(uid)
        if pool is None:
            return None
        engine = self._engines.get(uid)
        if engine is None:
            engine = self._engines[uid] = TransferEngine(pool, self.config)
        return engine

    def engine_of(self, *clients: ServerClient) -> TransferEngine | None:
        """The engine acting as the identity all ``clients`` belong to (open files' clients:
        `cp` through the mount), or None if they belong to different or forgotten ones."""
        owners = {self._owner(c) for c in clients}
        uid = owners.pop() if len(owners) == 1 else None
        if uid is None:
            return None
        return self.engine if uid == 0 else self.engine_for(uid)

    def _owner(self, client: ServerClient) -> int | None:
        """0 for the mount's clients, the uid whose login made ``client``, else None."""
        if self.pool.clients.get(client.name) is client:
            return 0
        for uid, pool in self._pools.items():
            if pool.clients.get(client.name) is client:
                return uid
        return None

    def engines(self) -> dict[int, TransferEngine]:
        """Every uid's engine (root's is the mount's), for root's `etfs status`."""
        return {0: self.engine, **self._engines}

    # --- login / logout -------------------------------------------------------------------------
    async def login(self, uid: int, credentials: dict[str, tuple[str, bytes]]) -> dict[str, str]:
        """Log in to every named server as (user, key); on success these become ``uid``'s
        identities (replacing earlier ones).  Raises `OSError` naming the first server that
        refused or could not be reached; nothing changes then."""
        if self.privileged(uid):
            raise OSError(errno.EPERM, "root and the mount's owner always act as the mount's identity")
        if not credentials:
            raise OSError(errno.EINVAL, "no servers to log in to")
        endpoints: dict[str, Endpoint] = {}
        for name, (user, key) in credentials.items():
            entry = self.config.servers.get(name)
            if entry is None:
                raise OSError(errno.ENOENT, f"this mount has no server {name!r}")
            endpoints[name] = dataclasses.replace(endpoint_for(entry, self.config), user=user, key=key)
        pool = Pool(self.config, self._nursery, endpoints)
        try:
            for name, client in pool.clients.items():
                try:
                    with trio.fail_after(self.config.connect_timeout * 2):
                        await client.connection()
                except RemoteError as exc:
                    raise OSError(
                        exc.errno or errno.EACCES, f"{name}: login as {endpoints[name].user} refused: {exc}"
                    ) from None
                except trio.TooSlowError:
                    raise OSError(errno.ETIMEDOUT, f"{name}: no answer") from None
                except OSError as exc:
                    raise OSError(exc.errno or errno.EIO, f"{name}: {exc.strerror or exc}") from None
        except BaseException:
            self._forget_pool(pool)
            raise
        self.logout(uid)
        self._pools[uid] = pool
        self._users[uid] = {name: ep.user for name, ep in endpoints.items()}
        log.info("uid %d logged in: %s", uid, ", ".join(f"{s} as {u}" for s, u in self._users[uid].items()))
        return self.logged_in(uid)

    def logout(self, uid: int) -> bool:
        """Forget ``uid``'s identities (True if it had any)."""
        pool = self._pools.pop(uid, None)
        self._users.pop(uid, None)
        self._engines.pop(uid, None)
        if pool is None:
            return False
        self._forget_pool(pool)
        log.info("uid %d logged out", uid)
        return True

    def _forget_pool(self, pool: Pool) -> None:
        for name, client in pool.clients.items():
            self._retired[name] = self._retired.get(name, 0) + client.namespace_epoch
            client.forget()

    def forget_all(self) -> None:
        """The mount ends: every uid's identities go."""
        for uid in list(self._pools):
            self.logout(uid)
