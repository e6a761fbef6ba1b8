"""`etfs` command line: mount, umount, demo, cp, status, login, logout.

Each subcommand lives with the code it drives; this module only parses arguments
and turns expected failures into one clear line and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from etfs import __version__
from etfs.common.systemd import add_common_options, setup_logging
from etfs.common.yamlconfig import ConfigError
from etfs.daemon.fstab import MountOptionError, looks_like_helper_call, parse_helper_args, subcommands
from etfs.protocol.transfer import CopyMode


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help (unless the help names it, or there is none to
    show: an off switch); an epilog of lines (exit statuses) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, "", argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + (" (default: off)" if action.default is False else " (default: %(default)s)")

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("exit status:"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etfs",
        description="e-transfer filesystem: servers as directories; cp between them goes server to server.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = sub.add_parser("mount", help="mount the configured servers")
    mount.add_argument("-c", "--config", type=Path, required=True, help="mountpoints.yaml")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    mount.add_argument("--log-file", type=Path, help="log here (default: stderr in the foreground)")
    mount.add_argument("--root", type=Path, help="mount here, not at the config's root (fstab's mountpoint)")
    mount.add_argument("--no-check", action="store_true", help="skip the login check of every server")

    umount = sub.add_parser("umount", help="unmount what 'etfs mount' mounted")
    umount.add_argument("-c", "--config", type=Path, help="mountpoints.yaml")
    umount.add_argument("mountpoint", nargs="?", type=Path, help="a mountpoint or the mount root")

    demo = sub.add_parser("demo", help="two local servers (jive, onsala) and a mount; nothing to configure")
    demo.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")

    from etfs.transfer.commands import exit_codes_epilog

    cp = sub.add_parser(
        "cp",
        help="copy files; between two servers the data goes server to server",
        description="Copy files; between two servers the data goes server to server. Without --mount, "
        "the mount is the one the paths (or the working directory) lie on.",
        epilog=exit_codes_epilog(),
        formatter_class=_HelpFormatter,
    )
    cp.add_argument(
        "sources", nargs="+", metavar="SRC", help="paths under etfs mountpoints, SERVER:PATH or local"
    )
    cp.add_argument("destination", metavar="DST", help="a file, or a directory to copy into")
    cp.add_argument("-r", "--recursive", action="store_true", help="copy directories and what is in them")
    cp.add_argument(
        "-L",
        "--dereference",
        action="store_true",
        help="follow symlinks (default: a tree's symlinks are copied as links, as cp -a / rsync -a)",
    )
    cp.add_argument(
        "--no-preserve",
        metavar="LIST",
        default="",
        help="do not keep these of the source: mode, timestamps or all, comma-separated "
        "(default: keep both, as cp -a)",
    )
    cp.add_argument(
        "--mode",
        choices=tuple(CopyMode),
        default="overwrite",
        help="new: never replace; resume: continue a broken copy; skip-existing: skip same size and time",
    )
    cp.add_argument(
        "--streams", type=int, help="parallel TCP streams per file, 1-64 (default: the configured number)"
    )
    direction = cp.add_mutually_exclusive_group()
    direction.add_argument(
        "--pull",
        dest="direction",
        action="store_const",
        const="pull",
        help="the destination connects to the source (default: as configured for the pair)",
    )
    direction.add_argument(
        "--push",
        dest="direction",
        action="store_const",
        const="push",
        help="the source connects to the destination (for a destination that only connects out)",
    )
    cp.add_argument(
        "--bwlimit",
        metavar="RATE",
        help="bandwidth limit for the whole command, in BYTES per second: 50M, 1.5G, 500k "
        "(K/M/G are 1024-based; KB/MB/GB 1000-based; 100Mbit for bits; a bare number is KiB/s, as rsync; "
        "default: none)",
    )
    cp.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    cp.add_argument("--json", action="store_true", help="JSON lines instead of a progress bar and summary")
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    cp.add_argument("--mount", type=Path, help="the mount root (default: the mount the paths are on)")

    status = sub.add_parser(
        "status",
        help="transfers of the running mount",
        description="Transfers of the running mount (on a root mount: your own; root sees all), and "
        "the bytes programs read and wrote through the mount.",
        formatter_class=_HelpFormatter,
    )
    status.add_argument("--json", action="store_true", help="one JSON object per refresh")
    status.add_argument(
        "--watch", action="store_true", help="refresh until interrupted, showing running transfers only"
    )
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes of --watch")
    status.add_argument(
        "--mount",
        type=Path,
        help="the mount root (default: the only one, or the one the working directory is in)",
    )
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
    add_common_options(p, __version__, list(sub.choices.values()))
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader that went away shows here, not as a complaint at exit
        return code
    except BrokenPipeError:
        # `etfs status | head`: the reader has what it wanted; exit quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        if looks_like_helper_call(argv, subcommands(parser)):
            args = parse_helper_args(argv)  # run by mount(8) for an fstab line
        else:
            args = parser.parse_args(argv)
    except MountOptionError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.verbose, logging.WARNING)
    try:
        if args.command == "mount":
            from etfs.daemon.mount import cmd_mount

            return cmd_mount(args)
        if args.command == "umount":
            from etfs.daemon.mount import cmd_umount

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
    except BrokenPipeError:
        raise  # not a failure: see main
    except OSError as exc:  # an unwritable --log-file or --dir, a root that cannot be created...
        print(f"etfs: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
