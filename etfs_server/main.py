"""`etfs-server` command line: run a server from `server.yaml` or from quick-start flags;
`etfs-server keygen USER` makes a user's key file."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import trio

from etfs import __version__
from etfs.common import excgroups
from etfs.common.safefile import check_replaceable, write_atomic
from etfs.common.systemd import add_common_options, notify, setup_logging
from etfs.common.yamlconfig import DEFAULT_PORT, ConfigError, parse_address

from .acl import ACL, ALL_RIGHTS, Rule
from .config import Export, ServerConfig, User, default_data_port, load_server_config, mapping_problem
from .identity import lookup_account

log = logging.getLogger("etfs_server")

DEFAULT_KEY_DIR = Path("/etc/etfs/keys")
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etfs-server",
        description="Export directories to etfs clients and stream files directly to other etfs servers.",
    )
    p.add_argument("-c", "--config", type=Path, help="server.yaml (see server.example.yaml)")
    p.add_argument("--name", help="server name (quick start; default: the host name)")
    p.add_argument("--listen", help="control address HOST:PORT (default 127.0.0.1:7070; port 0 picks one)")
    p.add_argument("--data-listen", help="data address HOST:PORT (default: control port + 1)")
    p.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="export PATH as NAME (quick start: every user gets all rights on it)",
    )
    p.add_argument("--user", action="append", default=[], metavar="NAME=KEYFILE", help="a user (quick start)")
    p.add_argument(
        "--run-as",
        metavar="ACCOUNT",
        help="the local account (name or uid) file operations run as, for users the config maps "
        "to none (no run_as); required when started as root",
    )
    p.add_argument("--state-dir", type=Path, help="where transfer records are kept")
    p.add_argument("--port-file", type=Path, help="write 'CONTROL DATA' ports here once listening")
    sub = p.add_subparsers(dest="command", metavar="[COMMAND]", help="(none: run the server)")
    keygen = sub.add_parser("keygen", help="make a user's key file and print the line for server.yaml")
    keygen.add_argument("user", help="the user name (letters, digits, . _ -)")
    keygen.add_argument(
        "--key-dir",
        type=Path,
        help=f"where USER.key goes (default: {DEFAULT_KEY_DIR} as root, else the current directory)",
    )
    add_common_options(p, __version__, [keygen])
    return p


def _quick_config(args: argparse.Namespace) -> ServerConfig:
    from etfs.protocol.auth import AuthKeyError, load_key

    if not args.export or not args.user:
        raise ConfigError(
            "command line", None, "give -c server.yaml, or at least one --export and one --user"
        )
    exports = {}
    for spec in args.export:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_dir():
            raise ConfigError("command line", None, f"--export {spec!r}: expected NAME=DIRECTORY")
        exports[name] = Export(name, Path(path).resolve(), ACL([Rule("*", "/", ALL_RIGHTS)]))
    account = None
    if args.run_as:
        try:
            account = lookup_account(args.run_as)
        except KeyError as exc:
            raise ConfigError("command line", None, f"--run-as: {exc.args[0]}") from None
    users = {}
    for spec in args.user:
        name, sep, keyfile = spec.partition("=")
        if not sep:
            raise ConfigError("command line", None, f"--user {spec!r}: expected NAME=KEYFILE")
        try:
            users[name] = User(name, load_key(keyfile), account=account)
        except AuthKeyError as exc:
            raise ConfigError("command line", None, str(exc)) from None
    listen = parse_address(args.listen or f"127.0.0.1:{DEFAULT_PORT}", DEFAULT_PORT)
    next_port = default_data_port(listen[1])
    data = parse_address(args.data_listen, next_port) if args.data_listen else (listen[0], next_port)
    name = args.name or "etfs"
    return ServerConfig(
        name=name,
        listen=listen,
        data_listen=data,
        exports=exports,
        users=users,
        state_dir=args.state_dir or Path(tempfile.gettempdir()) / f"etfs-state-{name}",
    )


def _with_default_account(config: ServerConfig, spec: str) -> ServerConfig:
    """``--run-as`` with a config: the account of every user that has no run_as of their own."""
    try:
        account = lookup_account(spec)
    except KeyError as exc:
        raise ConfigError("command line", None, f"--run-as: {exc.args[0]}") from None
    users = {
        name: u if u.account is not None else dataclasses.replace(u, account=account)
        for name, u in config.users.items()
    }
    return dataclasses.replace(config, users=users)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, logging.INFO)
    if args.command == "keygen":
        return cmd_keygen(args.user, args.key_dir)
    try:
        config = load_server_config(args.config) if args.config else _quick_config(args)
        if args.state_dir:
            config = dataclasses.replace(config, state_dir=args.state_dir)
        if args.run_as and args.config:
            config = _with_default_account(config, args.run_as)
        if args.listen and args.config:
            config = dataclasses.replace(config, listen=parse_address(args.listen, DEFAULT_PORT))
        if args.data_listen and args.config:
            data = parse_address(args.data_listen, default_data_port(config.listen[1]))
            config = dataclasses.replace(config, data_listen=data)
    except (ConfigError, ValueError) as exc:
        print(f"etfs-server: {exc}", file=sys.stderr)
        return 2
    if args.port_file:
        try:
            check_replaceable(args.port_file)
        except OSError as exc:
            print(f"etfs-server: --port-file: {exc.strerror}", file=sys.stderr)
            return 2
    if problem := _state_dir_problem(config, from_command_line=bool(args.state_dir)):
        print(f"etfs-server: {problem}", file=sys.stderr)
        return 2
    euid = os.geteuid()
    if problem := mapping_problem(config, as_root=euid == 0, own_uid=euid):
        print(f"etfs-server: {problem}", file=sys.stderr)
        return 2
    for user in config.users.values():
        if euid == 0 and user.account is not None and user.account.is_root:
            log.info("user %s runs as root here (run_as: root): only the ACL limits them", user.name)
    try:
        trio.run(_run, config, args.port_file)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"etfs-server: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # trio wraps a failure to bind (address not ours, port in use) in exception groups.
        if not excgroups.only(group, OSError):
            raise
        print(f"etfs-server: cannot listen: {excgroups.first(group, OSError)}", file=sys.stderr)
        return 1
    return 0


def cmd_keygen(user: str, key_dir: Path | None) -> int:
    """Write a new random key to KEY_DIR/USER.key (mode 0600, never over an existing file) and
    print the server.yaml line naming it; the same file goes to the user's mountpoints.yaml."""
    from etfs.protocol.auth import generate_key_text

    if not USER_NAME.fullmatch(user):
        print(
            f"etfs-server keygen: {user!r} is no user name (letters, digits, '.', '_', '-')", file=sys.stderr
        )
        return 2
    key_dir = key_dir or (DEFAULT_KEY_DIR if os.geteuid() == 0 else Path.cwd())
    path = (key_dir / f"{user}.key").absolute()
    try:
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        print(
            f"etfs-server keygen: {path} exists; not replacing it (remove it to make a new key)",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"etfs-server keygen: {exc.filename or key_dir}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        os.write(fd, generate_key_text().encode())
    finally:
        os.close(fd)
    # JSON strings are YAML strings: the path stays one scalar whatever characters it has.
    print(f"  {user}: {{key_file: {json.dumps(str(path))}}}")
    print(
        f"etfs-server keygen: wrote {path} (mode 0600). Add the line above under 'users:' in "
        f"server.yaml, and give {user} a copy of the key file for key_file in their mountpoints.yaml.",
        file=sys.stderr,
    )
    return 0


def _state_dir_problem(config: ServerConfig, from_command_line: bool) -> str | None:
    """Create the state directory now, so that a bad one is reported as the setting it came
    from (``server.yaml:LINE`` or ``--state-dir``) instead of a bare errno at startup."""
    where = "--state-dir" if from_command_line else (config.state_dir_where or "state_dir")
    path = config.state_dir
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        return f"{where}: state_dir {path}: cannot create: {exc.strerror}"
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        return f"{where}: state_dir {path}: not a directory this server can write to"
    return None


async def _run(config: ServerConfig, port_file: Path | None) -> None:
    from .server import EtfsServer

    server = EtfsServer(config)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(server.serve)
        if port_file:
            write_atomic(port_file, f"{ports.control} {ports.data}\n")
        notify("READY=1")  # Type=notify: both ports listen
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for sig in signals:
                log.info("received %s, shutting down", signal.Signals(sig).name)
                break
        # Graceful: give running requests a moment, then stop.
        nursery.cancel_scope.deadline = trio.current_time() + 2
        await server.transfers.shutdown()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main())
