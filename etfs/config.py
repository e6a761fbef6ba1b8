"""The client's ``mountpoints.yaml`` -> typed, validated objects.

Read with `etfs.common.yamlconfig` (``file:line`` errors, unknown keys refused), the same
machinery the server's ``server.yaml`` uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from etfs.common.yamlconfig import (
    DEFAULT_PORT,
    Fields,
    _non_negative,
    address_field,
    load_yaml,
    parse_address,
    positive_seconds,
)
from etfs.protocol.auth import AuthKeyError, load_key
from etfs.protocol.transfer import BLOCK_SIZE, DATA_DIRECTIONS, STREAMS, CopyMode

# Seconds; the defaults of mountpoints.yaml's connect_timeout and request_timeout, and of a
# connection made without a config.
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0

# --- the client's mountpoints.yaml -----------------------------------------------------------------
THIRD_PARTY = ("auto", "always", "never")
DIRECTIONS = tuple(DATA_DIRECTIONS)
MODES = tuple(CopyMode)
# `others:` in mountpoints.yaml: local users without their own identity act as the mount's
# etfs user, or get EACCES.
OTHERS = ("mount-identity", "refuse")


@dataclass(frozen=True)
class TransferDefaults:
    streams: int = STREAMS
    direction: str = "pull"
    third_party: str = "auto"
    verify: bool = True
    block_size: int = BLOCK_SIZE
    # Bytes/s for all transfers of one (source, destination) pair together; 0: no limit.
    bwlimit: int = 0


@dataclass(frozen=True)
class TLSClientOptions:
    ca_file: Path | None = None
    server_hostname: str | None = None


@dataclass(frozen=True)
class ServerEntry:
    name: str
    addresses: tuple[tuple[str, int], ...]
    user: str
    key_file: Path
    export: str = ""
    mountpoint: Path | None = None
    peer_address: tuple[str, int] | None = None
    tls: TLSClientOptions | None = None
    transfer: TransferDefaults | None = None


@dataclass(frozen=True)
class PairOverride:
    source: str
    destination: str
    streams: int | None = None
    direction: str | None = None
    third_party: str | None = None
    bwlimit: int | None = None


@dataclass(frozen=True)
class CacheOptions:
    attr_ttl: float = 1.0
    entry_ttl: float = 1.0
    negative_ttl: float = 0.5
    dir_ttl: float = 1.0


@dataclass(frozen=True)
class ClientConfig:
    file: Path
    root: Path
    servers: dict[str, ServerEntry]
    cache: CacheOptions = field(default_factory=CacheOptions)
    transfer: TransferDefaults = field(default_factory=TransferDefaults)
    pairs: tuple[PairOverride, ...] = ()
    connect_timeout: float = CONNECT_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT
    # On a shared (root) mount: what a local uid without an `etfs login` identity gets.
    others: str = "mount-identity"

    def transfer_for(self, source: str, destination: str) -> TransferDefaults:
        """Transfer settings for one server pair: pair override > destination's > global."""
        base = self.servers[destination].transfer or self.transfer
        for p in self.pairs:
            if p.source == source and p.destination == destination:
                return TransferDefaults(
                    streams=p.streams or base.streams,
                    direction=p.direction or base.direction,
                    third_party=p.third_party or base.third_party,
                    verify=base.verify,
                    block_size=base.block_size,
                    bwlimit=base.bwlimit if p.bwlimit is None else p.bwlimit,
                )
        return base


def default_root() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() == 0:
        return Path("/run/etfs/root")
    if runtime:
        return Path(runtime) / "etfs" / "root"
    return Path(f"/tmp/etfs-{os.geteuid()}/root")


def _transfer_defaults(f: Fields, base: TransferDefaults) -> TransferDefaults:
    result = TransferDefaults(
        streams=f.int("streams", base.streams, minimum=1),
        direction=f.choice("direction", DIRECTIONS, base.direction),
        third_party=f.choice("third_party", THIRD_PARTY, base.third_party),
        verify=f.bool("verify", base.verify),
        block_size=f.int("block_size_mib", base.block_size // 2**20, minimum=1) * 2**20,
        bwlimit=f.rate("bwlimit", base.bwlimit),
    )
    if result.streams > 64:
        raise f.error(f"{f.what}.streams must be at most 64", "streams")
    f.done()
    return result


def load_client_config(path: str | Path) -> ClientConfig:
    """Read and validate a `mountpoints.yaml`; raises `ConfigError`."""
    top = load_yaml(path)
    file = top.file
    root = top.path("root", None) or default_root()
    cache = CacheOptions()
    if (c := top.mapping("cache")) is not None:
        cache = CacheOptions(
            attr_ttl=_non_negative(c, "attr_ttl", cache.attr_ttl),
            entry_ttl=_non_negative(c, "entry_ttl", cache.entry_ttl),
            negative_ttl=_non_negative(c, "negative_ttl", cache.negative_ttl),
            dir_ttl=_non_negative(c, "dir_ttl", cache.dir_ttl),
        )
        c.done()
    transfer = TransferDefaults()
    if (t := top.mapping("transfer")) is not None:
        transfer = _transfer_defaults(t, transfer)
    servers: dict[str, ServerEntry] = {}
    for name, s in top.items("servers"):
        if not name or "/" in name or name.startswith("."):
            raise s.error(f"server name {name!r} must be a plain file name")
        addrs_text = s.str_list("address")
        try:
            addresses = tuple(parse_address(a, DEFAULT_PORT) for a in addrs_text)
        except ValueError as exc:
            raise s.error(f"{s.what}.address: {exc}", "address") from None
        key_file = s.path("key_file")
        try:
            load_key(key_file)  # unreadable, empty or too short: say so now, not at connect time
        except AuthKeyError as exc:
            raise s.error(f"{s.what}.key_file: {exc}", "key_file") from None
        tls = None
        if (tf := s.mapping("tls")) is not None:
            tls = TLSClientOptions(
                ca_file=tf.path("ca_file", None), server_hostname=tf.str("server_name", None)
            )
            tf.done()
        sub = s.mapping("transfer")
        servers[name] = ServerEntry(
            name=name,
            addresses=addresses,
            user=s.str("user"),
            key_file=key_file,
            export=s.str("export", ""),
            mountpoint=s.path("mountpoint", None),
            peer_address=address_field(s, "peer_address", None, DEFAULT_PORT),
            tls=tls,
            transfer=_transfer_defaults(sub, transfer) if sub is not None else None,
        )
        s.done()
    if not servers:
        raise top.error("config: no servers configured (a 'servers:' mapping is required)")
    pairs = []
    for p in top.sequence("pairs"):
        po = PairOverride(
            source=p.str("source"),
            destination=p.str("destination"),
            streams=p.int("streams", None, minimum=1),
            direction=p.choice("direction", (*DIRECTIONS, None), None),
            third_party=p.choice("third_party", (*THIRD_PARTY, None), None),
            bwlimit=p.rate("bwlimit", None),
        )
        for side in (po.source, po.destination):
            if side not in servers:
                raise p.error(f"{p.what}: unknown server {side!r}")
        p.done()
        pairs.append(po)
    cfg = ClientConfig(
        file=file,
        root=root,
        servers=servers,
        cache=cache,
        transfer=transfer,
        pairs=tuple(pairs),
        connect_timeout=positive_seconds(top, "connect_timeout", CONNECT_TIMEOUT),
        request_timeout=positive_seconds(top, "request_timeout", REQUEST_TIMEOUT),
        others=top.choice("others", OTHERS, "mount-identity"),
    )
    top.done()
    return cfg
