"""Before mounting: log in to every configured server once, and say what is wrong.

A wrong user, key or export, or a TLS setup that cannot work, will not mend by retrying:
`etfs mount` refuses to mount and names each such server.  A server that cannot be reached
(refused, timed out) may come up later: the mount goes ahead and says so.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import trio

from etfs.config import ClientConfig, ServerEntry

from . import connection, endpoint_for
from .connection import RemoteError, ServerClient, TLSError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    server: str
    message: str  # one line, starting with the server's name
    permanent: bool  # retrying cannot help (refused login, unknown export, TLS)


async def _check(entry: ServerEntry, config: ClientConfig, nursery: trio.Nursery, out: list[Problem]) -> None:
    try:
        endpoint = endpoint_for(entry, config)
    except (OSError, ValueError) as exc:  # ssl: a missing or unreadable tls.ca_file
        out.append(Problem(entry.name, f"{entry.name}: TLS set-up failed: {exc}", permanent=True))
        return
    client = ServerClient(endpoint, nursery)
    try:
        await client.connection()
    except RemoteError as exc:
        detail = (exc.strerror or str(exc)).removeprefix(f"{entry.name}: ")
        if exc.errno == errno.EACCES and not isinstance(exc, TLSError):
            detail += f" (user {entry.user!r}, key_file {entry.key_file})"
        out.append(Problem(entry.name, f"{entry.name}: {detail}", permanent=True))
    except OSError as exc:
        detail = (exc.strerror or str(exc)).removeprefix(f"cannot reach server {entry.name}: ")
        message = f"{entry.name}: unreachable ({detail}); the mount retries it when it is used"
        out.append(Problem(entry.name, message, permanent=False))
    finally:
        await client.aclose()


def check_servers(config: ClientConfig) -> list[Problem]:
    """Try every server at once (each within connect_timeout per address); the problems found,
    in configuration order."""
    # The lines printed below say it all; the connection's own warnings would repeat them.
    conn_log = logging.getLogger(connection.__name__)
    level = conn_log.level
    conn_log.setLevel(logging.ERROR)
    try:
        return trio.run(_check_all, config)
    finally:
        conn_log.setLevel(level)


async def _check_all(config: ClientConfig) -> list[Problem]:
    found: list[Problem] = []
    async with trio.open_nursery() as nursery:
        for entry in config.servers.values():
            nursery.start_soon(_check, entry, config, nursery, found)
    order = list(config.servers)
    return sorted(found, key=lambda p: order.index(p.server))


__all__ = ["Problem", "check_servers"]
