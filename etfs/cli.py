"""`etfs` command line: mount, umount, demo, cp, status, login, logout.

Each subcommand lives with the code it drives; this module only parses arguments
and turns expected failures into one clear line and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from etfs.config import ConfigError
from etfs.protocol.transfer import CopyMode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etfs",
        description="e-transfer filesystem: servers as directories; cp between them goes server to server.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = sub.add_parser("mount", help="mount the configured servers")
    mount.add_argument("-c", "--config", type=Path, required=True, help="mountpoints.yaml")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--log-file", type=Path, help="log here (default: stderr in the foreground)")

    umount = sub.add_parser("umount", help="unmount what 'etfs mount' mounted")
    umount.add_argument("-c", "--config", type=Path, help="mountpoints.yaml")
    umount.add_argument("mountpoint", nargs="?", type=Path, help="a mountpoint or the mount root")

    demo = sub.add_parser("demo", help="two local servers (jive, onsala) and a mount; nothing to configure")
    demo.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")

    cp = sub.add_parser("cp", help="copy files; between two servers the data goes server to server")
    cp.add_argument(
        "sources", nargs="+", metavar="SRC", help="paths under etfs mountpoints, SERVER:PATH or local"
    )
    cp.add_argument("destination", metavar="DST")
    cp.add_argument("-r", "--recursive", action="store_true")
    cp.add_argument("--mode", choices=tuple(CopyMode), default="overwrite")
    cp.add_argument("--streams", type=int, help="parallel TCP streams per file")
    direction = cp.add_mutually_exclusive_group()
    direction.add_argument("--pull", dest="direction", action="store_const", const="pull")
    direction.add_argument("--push", dest="direction", action="store_const", const="push")
    cp.add_argument(
        "--bwlimit",
        metavar="RATE",
        help="bandwidth limit for the whole command, in BYTES per second: 50M, 1.5G, 500k "
        "(K/M/G are 1024-based; KB/MB/GB 1000-based; 100Mbit for bits; a bare number is KiB/s, as rsync)",
    )
    cp.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    cp.add_argument("--json", action="store_true", help="JSON lines instead of a progress bar")
    cp.add_argument("--mount", type=Path, help="the mount root, if several mounts run")

    status = sub.add_parser("status", help="transfers of the running mount")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--mount", type=Path, help="the mount root, if several mounts run")
    status.add_argument("--server", help="list the transfer records a server keeps (they survive restarts)")

    login = sub.add_parser("login", help="use your own etfs identity on a shared (root) mount")
    login.add_argument(
        "-c",
        "--config",
        type=Path,
        help="your credentials: servers: NAME: {user, key_file} (default ~/.config/etfs/login.yaml)",
    )
    login.add_argument("--mount", type=Path, help="the mount root, if several mounts run")

    logout = sub.add_parser("logout", help="make the mount forget the identity 'etfs login' gave it")
    logout.add_argument("--mount", type=Path, help="the mount root, if several mounts run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "mount":
            from etfs.mount import cmd_mount

            return cmd_mount(args)
        if args.command == "umount":
            from etfs.mount import cmd_umount

            return cmd_umount(args)
        if args.command == "demo":
            from etfs.demo import cmd_demo

            return cmd_demo(args)
        if args.command == "cp":
            from etfs.transfer.commands import cmd_cp

            return cmd_cp(args)
        if args.command == "status":
            from etfs.transfer.commands import cmd_status

            return cmd_status(args)
        if args.command == "login":
            from etfs.login import cmd_login

            return cmd_login(args)
        if args.command == "logout":
            from etfs.login import cmd_logout

            return cmd_logout(args)
    except ConfigError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable --log-file or --dir, a root that cannot be created...
        print(f"etfs: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
