"""`server.yaml` -> typed `ServerConfig` (see `server.example.yaml` for every field)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etfs.common.yamlconfig import (
    DEFAULT_PORT,
    ConfigError,
    Fields,
    address_field,
    load_yaml,
    positive_seconds,
)
from etfs.protocol.auth import AuthKeyError, load_key
from etfs.protocol.transfer import BLOCK_SIZE, CAPABILITY_TTL

from .acl import ACL, Right, Rule
from .exports import EscapeError, normalize
from .identity import Account, lookup_account
from .peers import PeerPolicy, parse_entry
from .tcptuning import congestion_control_problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class User:
    name: str
    key: bytes
    groups: frozenset[str] = frozenset()
    # The local account this user's file operations run as (None: the server's own).
    account: Account | None = None
    may_chown: bool = False  # may give files to other owners / groups they are not in
    may_setid: bool = False  # may set setuid/setgid bits


@dataclass(frozen=True)
class Export:
    name: str
    path: Path
    acl: ACL
    umask: int = 0  # bits removed from the mode of every file and directory created here


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one client or user from exhausting the server (server.yaml `limits:`)."""

    preauth_connections: int = 256  # connections still authenticating, server-wide (64 KiB frames)
    connections_per_user: int = 256
    handles_per_user: int = 4096  # open files (Open/Create) over all of a user's connections
    threads: int = 32  # worker threads for file operations, server-wide
    threads_per_user: int = 8  # of those, how many one user's requests may hold at once
    inflight_per_connection: int = 64  # requests being answered at once on one connection
    # Payload (write data received, read data not yet sent) one connection / one user may hold:
    # beyond it the server stops reading their requests.  The server holds about twice this
    # in memory (a reply's bytes and its frame).
    reply_bytes_per_connection: int = 32 * 2**20
    payload_bytes_per_user: int = 96 * 2**20


@dataclass(frozen=True)
class TLSServerOptions:
    cert_file: Path
    key_file: Path
    # CA that signed the *other servers'* certificates: data connections this server opens
    # (pull from a source, push to a destination) verify the peer with it.
    ca_file: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    name: str
    listen: tuple[str, int]
    data_listen: tuple[str, int]
    exports: dict[str, Export]
    users: dict[str, User]
    state_dir: Path
    advertise_host: str = ""
    tls: TLSServerOptions | None = None
    max_transfers: int = 16
    max_streams: int = 16
    capability_ttl: float = CAPABILITY_TTL
    data_timeout: float = 30.0  # a peer silent this long on a data connection has vanished
    block_size: int = BLOCK_SIZE
    # bench/transfer_bench.py: through the whole transfer path sendfile beat read_send in every
    # configuration (e.g. 1 stream, verified: 1263 vs 638 MB/s), although raw loopback pairs vary.
    sender: str = "sendfile"  # or "read_send"
    receiver: str = "splice"  # or "recv_write" (bench/raw_pair.py: splice ~2x faster on loopback)
    # TCP_CONGESTION of data connections ("": the host's net.ipv4.tcp_congestion_control).
    congestion_control: str = ""
    # SO_SNDBUF/SO_RCVBUF of data connections in bytes.  0, kernel autotuning: bench/lfn_bench.py
    # measured fixed 64 MiB buffers faster for 1-2 streams but slower for 4 and more (deeper
    # queues at the bottleneck, more drops).
    socket_buffer: int = 0
    # Bytes per second all transfers together may send as a source (out) and receive as a
    # destination (in); 0: no limit (transfer.bwlimit, bwlimit_in, bwlimit_out).
    bwlimit_in: int = 0
    bwlimit_out: int = 0
    handshake_timeout: float = 10.0  # seconds a new connection has to authenticate
    limits: Limits = field(default_factory=Limits)
    # where data connections may go (default: anywhere)
    peers: PeerPolicy = field(default_factory=PeerPolicy)
    file: Path | None = field(default=None, compare=False)
    # "server.yaml:LINE" of state_dir, for errors found when the server creates it.
    state_dir_where: str = field(default="", compare=False)

    @property
    def default_export(self) -> str:
        return next(iter(self.exports))


def _rule(f: Fields) -> Rule:
    who = f.str("who", None) or f.str("user", None) or (("@" + f.str("group")) if f.has("group") else None)
    if not who:
        raise f.error(f"{f.what}: a rule needs 'who' (a user, @group or *)")
    prefix = f.str("path", "/")
    try:
        if not prefix.startswith("/"):
            raise EscapeError(prefix)
        prefix = normalize(prefix)  # the form request paths take, or the rule would never match
    except EscapeError:
        what = f"{f.what}.path must be an absolute path inside the export, like /tmp"
        raise f.error(what, "path") from None
    rights = set()
    for name in f.str_list("rights"):
        if name == "all":
            rights |= set(Right)
            continue
        try:
            rights.add(Right(name))
        except ValueError:
            choices = ", ".join(r.value for r in Right)
            raise f.error(
                f"{f.what}.rights: unknown right {name!r} (use {choices} or all)", "rights"
            ) from None
    f.done()
    return Rule(who=who, prefix=prefix, rights=frozenset(rights))


def default_data_port(control_port: int) -> int:
    """The data port when none is given: the next one (or "pick one" when control does)."""
    return control_port + 1 if 0 < control_port < 65535 else 0


def load_server_config(path: str | Path) -> ServerConfig:
    """Read and validate a `server.yaml`; raises `ConfigError`."""
    top = load_yaml(path)
    name = top.str("name")
    listen = address_field(top, "listen", None, DEFAULT_PORT) or ("127.0.0.1", DEFAULT_PORT)
    next_port = default_data_port(listen[1])
    data_listen = address_field(top, "data_listen", None, next_port) or (listen[0], next_port)
    default_account = _account(top, "run_as")
    users: dict[str, User] = {}
    for uname, u in top.items("users"):
        key_file = u.path("key_file")
        try:
            key = load_key(key_file)
        except AuthKeyError as exc:
            raise u.error(str(exc), "key_file") from None
        users[uname] = User(
            uname,
            key,
            frozenset(u.str_list("groups", [])),
            account=_account(u, "run_as") or default_account,
            may_chown=u.bool("may_chown", False),
            may_setid=u.bool("may_setid", False),
        )
        u.done()
    exports: dict[str, Export] = {}
    for ename, e in top.items("exports"):
        epath = e.path("path")
        if not epath.is_dir():
            raise e.error(f"{e.what}.path: {epath} is not a directory", "path")
        rules = []
        for r in e.sequence("acl"):
            rules.append(_rule(r))
            if problem := _unknown_subject(rules[-1].who, users):
                # A typo here silently grants nothing; not an error (the user may come later).
                log.warning("%s", r.error(f"{r.what}.who: {problem}; the rule applies to nobody"))
        umask = e.octal("umask", 0, maximum=0o777)
        exports[ename] = Export(ename, epath.resolve(), ACL(rules), umask)
        e.done()
    if not exports:
        raise top.error("config: no exports configured (an 'exports:' mapping is required)")
    tls = None
    if (t := top.mapping("tls")) is not None:
        tls = TLSServerOptions(
            cert_file=t.path("cert_file"), key_file=t.path("key_file"), ca_file=t.path("ca_file", None)
        )
        for p in (tls.cert_file, tls.key_file, *([tls.ca_file] if tls.ca_file else [])):
            if not os.access(p, os.R_OK):
                raise t.error(f"{t.what}: cannot read {p}")
        t.done()
    state_dir = top.path("state_dir", None) or Path(f"/var/lib/etfs/{name}")
    state_dir_where = (
        str(top.error("", "state_dir")).removesuffix(": ") if top.has("state_dir") else str(top.file)
    )
    kwargs: dict[str, Any] = {}
    if (tr := top.mapping("transfer")) is not None:
        kwargs = dict(
            max_transfers=tr.int("max_active", 16, minimum=1),
            max_streams=tr.int("max_streams", 16, minimum=1),
            capability_ttl=positive_seconds(tr, "capability_ttl", CAPABILITY_TTL),
            data_timeout=positive_seconds(tr, "data_timeout", 30.0),
            block_size=tr.int("block_size_mib", BLOCK_SIZE >> 20, minimum=1) * 2**20,
            sender=tr.choice("sender", ("read_send", "sendfile"), "sendfile"),
            receiver=tr.choice("receiver", ("recv_write", "splice"), "splice"),
            congestion_control=tr.str("congestion_control", ""),
            socket_buffer=_socket_buffer_mib(tr) * 2**20,
        )
        if kwargs["congestion_control"] and (
            problem := congestion_control_problem(kwargs["congestion_control"])
        ):
            raise tr.error(f"{tr.what}.congestion_control: {problem}", "congestion_control")
        both = tr.rate("bwlimit", 0)
        kwargs["bwlimit_in"] = tr.rate("bwlimit_in", both)
        kwargs["bwlimit_out"] = tr.rate("bwlimit_out", both)
        if tr.has("peers"):
            entries = []
            for text in tr.str_list("peers"):
                try:
                    entries.append(parse_entry(text))
                except ValueError as exc:
                    raise tr.error(f"{tr.what}: peers: {exc}", "peers") from None
            kwargs["peers"] = PeerPolicy(tuple(entries))
        tr.done()
    if (lim := top.mapping("limits")) is not None:
        d = Limits()
        kwargs["limits"] = Limits(
            preauth_connections=lim.int("preauth_connections", d.preauth_connections, minimum=1),
            connections_per_user=lim.int("connections_per_user", d.connections_per_user, minimum=1),
            handles_per_user=lim.int("handles_per_user", d.handles_per_user, minimum=1),
            threads=lim.int("threads", d.threads, minimum=1),
            threads_per_user=lim.int("threads_per_user", d.threads_per_user, minimum=1),
            inflight_per_connection=lim.int("inflight_per_connection", d.inflight_per_connection, minimum=1),
            reply_bytes_per_connection=lim.int("reply_mib_per_connection", 32, minimum=16) * 2**20,
            payload_bytes_per_user=lim.int("payload_mib_per_user", 96, minimum=16) * 2**20,
        )
        lim.done()
    cfg = ServerConfig(
        name=name,
        listen=listen,
        data_listen=data_listen,
        exports=exports,
        users=users,
        state_dir=state_dir,
        advertise_host=top.str("advertise", ""),
        handshake_timeout=positive_seconds(top, "handshake_timeout", 10.0),
        tls=tls,
        file=top.file,
        state_dir_where=state_dir_where,
        **kwargs,
    )
    top.done()
    return cfg


def _unknown_subject(who: str, users: dict[str, User]) -> str | None:
    """Why an ACL rule's ``who`` names nobody configured (a user or a @group), or None."""
    if who == "*":
        return None
    if who.startswith("@"):
        if any(who[1:] in u.groups for u in users.values()):
            return None
        return f"no user is in group {who[1:]!r}"
    return None if who in users else f"unknown user {who!r}"


def _account(f: Fields, key: str) -> Account | None:
    """``run_as``: a local account name or uid; it must exist."""
    if not f.has(key):
        return None
    spec = f.name_or_id(key)
    try:
        return lookup_account(spec)
    except KeyError as exc:
        raise f.error(f"{f.what}.{key}: {exc.args[0]}", key) from None


def mapping_problem(cfg: ServerConfig, *, as_root: bool, own_uid: int) -> str | None:
    """Why the user -> account mapping cannot be used by this process, or None.

    A root server must map every user to an account (it would otherwise act as root for
    them); a server that is not root cannot act as anyone but itself.
    """
    for user in cfg.users.values():
        if as_root and user.account is None:
            return (
                f"etfs-server runs as root but user {user.name!r} has no local account: set "
                "`run_as: ACCOUNT` in server.yaml (for all users, or per user), e.g. a dedicated "
                "unprivileged account; see README, Security"
            )
        if not as_root and user.account is not None and user.account.uid != own_uid:
            return (
                f"user {user.name!r} has run_as {user.account.name!r}, but etfs-server is not root "
                "and cannot act as another account: start it as root or drop run_as"
            )
    return None


__all__ = ["ConfigError", "Export", "Limits", "ServerConfig", "User", "load_server_config", "mapping_problem"]


def _socket_buffer_mib(tr: Fields) -> int:
    """``transfer.socket_buffer_mib``: 0 (kernel autotuning) to 1024; SO_SNDBUF/SO_RCVBUF take a C int."""
    mib: int = tr.int("socket_buffer_mib", 0, minimum=0)
    if mib > 1024:
        raise tr.error(f"{tr.what}.socket_buffer_mib must be at most 1024 (MiB)", "socket_buffer_mib")
    return mib
