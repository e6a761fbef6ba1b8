"""Connections from the client side to etfs servers (see `connection`), built from a config."""

from __future__ import annotations

import ssl

import trio

from etfs.config import ClientConfig, ServerEntry
from etfs.protocol.auth import load_key

from .connection import ConnectionLost, Endpoint, RemoteError, ServerClient

__all__ = ["ConnectionLost", "Endpoint", "Pool", "RemoteError", "ServerClient", "endpoint_for"]


def endpoint_for(entry: ServerEntry, config: ClientConfig) -> Endpoint:
    ctx = None
    if entry.tls is not None:
        ctx = ssl.create_default_context(cafile=str(entry.tls.ca_file) if entry.tls.ca_file else None)
    return Endpoint(
        name=entry.name,
        addresses=entry.addresses,
        user=entry.user,
        key=load_key(entry.key_file),
        export=entry.export,
        ssl_context=ctx,
        server_hostname=entry.tls.server_hostname if entry.tls else None,
        connect_timeout=config.connect_timeout,
        request_timeout=config.request_timeout,
    )


class Pool:
    """One `ServerClient` per configured server (or per given endpoint: a local user's own
    identities, see `etfs.identities`)."""

    def __init__(
        self, config: ClientConfig, nursery: trio.Nursery, endpoints: dict[str, Endpoint] | None = None
    ) -> None:
        self.config = config
        if endpoints is None:
            endpoints = {name: endpoint_for(e, config) for name, e in config.servers.items()}
        self.clients = {name: ServerClient(ep, nursery) for name, ep in endpoints.items()}

    def __getitem__(self, name: str) -> ServerClient:
        return self.clients[name]

    async def aclose(self) -> None:
        for c in self.clients.values():
            await c.aclose()
