"""`etfs login` / `etfs logout`: a local user's own etfs identity on a shared (root) mount.

`etfs login` runs as the local user, reads that user's credentials file (mountpoints-style:
``servers: NAME: {user: ..., key_file: ...}``, by default ``~/.config/etfs/login.yaml``) and
the key files it names, and hands user and key per server to the running mount's daemon
over its control socket.  The daemon takes the caller's uid from the socket (SO_PEERCRED),
logs in to each server with them and keeps them in memory for that uid (`etfs.identities`).
`etfs logout` makes the daemon forget them.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import Any

from etfs.api import EtfsError as CommandError
from etfs.api import find_mount, lines, request
from etfs.common.yamlconfig import ConfigError, load_yaml
from etfs.protocol.auth import AuthKeyError, load_key

DEFAULT_LOGIN_FILE = Path("~/.config/etfs/login.yaml")
# Keys of a mountpoints.yaml server entry that a login file may carry (and that login ignores).
_IGNORED_SERVER_KEYS = ("address", "export", "mountpoint", "peer_address", "tls", "transfer")


def read_credentials(path: Path) -> dict[str, dict[str, str]]:
    """server -> {"user": U, "key": HEX} from a login file; `ConfigError` if it is wrong.

    The file and its key files must not be writable by others, and key files not readable
    by group or others: they are this user's secrets.
    """
    top = load_yaml(path)
    _check_private(top.file, top, secret=False)
    out: dict[str, dict[str, str]] = {}
    for name, s in top.items("servers"):
        user = s.str("user")
        key_file = s.path("key_file")
        for key in _IGNORED_SERVER_KEYS:
            if s.has(key):
                s.node(key)  # read: not an error for done()
        _check_private(key_file, s, secret=True)
        try:
            secret = load_key(key_file)
        except AuthKeyError as exc:
            raise s.error(f"{s.what}.key_file: {exc}", "key_file") from None
        s.done()
        out[name] = {"user": user, "key": secret.hex()}
    if not out:
        raise top.error("no servers in the login file (a 'servers:' mapping is required)")
    return out


def _check_private(path: Path, where: Any, secret: bool) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise where.error(f"cannot read {path}: {exc.strerror}") from None
    if st.st_uid != os.geteuid():
        raise where.error(f"{path} belongs to uid {st.st_uid}, not to you ({os.geteuid()})")
    bad = stat.S_IWGRP | stat.S_IWOTH | ((stat.S_IRGRP | stat.S_IROTH) if secret else 0)
    if st.st_mode & bad:
        what = "readable or writable" if secret else "writable"
        raise where.error(f"{path} is {what} by group or others (mode {stat.S_IMODE(st.st_mode):04o})")


def _ask(mount_root: Path | None, req: dict[str, Any]) -> dict[str, Any]:
    mount = find_mount(mount_root)
    s = request(mount.socket, req)
    with s:
        reply = next(iter(lines(s)), None)
    if not isinstance(reply, dict):
        raise CommandError("the mount daemon gave no answer")
    if reply.get("event") != "done":
        raise CommandError(str(reply.get("message") or "refused"))
    return reply


def cmd_login(args: argparse.Namespace) -> int:
    path = Path(os.path.expanduser(args.config or DEFAULT_LOGIN_FILE))
    try:
        servers = read_credentials(path)
        reply = _ask(args.mount, {"op": "login", "servers": servers})
    except ConfigError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"etfs: login failed: {exc}", file=sys.stderr)
        return 1
    for server, user in sorted(reply.get("servers", {}).items()):
        print(f"{server}: logged in as {user}")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    try:
        reply = _ask(args.mount, {"op": "logout"})
    except CommandError as exc:
        print(f"etfs: logout failed: {exc}", file=sys.stderr)
        return 1
    print("logged out" if reply.get("logged_out") else "was not logged in")
    return 0
