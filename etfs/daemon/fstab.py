"""`etfs CONFIG MOUNTPOINT -o OPTIONS`: the program mount(8) runs for an /etc/fstab line.

Either fstab form works, as for sshfs::

    /etc/etfs/mountpoints.yaml  /mnt/etfs  fuse.etfs  _netdev,x-systemd.automount  0 0
    etfs#/etc/etfs/mountpoints.yaml  /mnt/etfs  fuse  _netdev  0 0

mount(8) runs libfuse's ``mount.fuse3``, which drops the options meant for mount itself
(``_netdev``, ``nofail``, ``auto``/``noauto``, ``user``/``users``), adds ``dev,suid`` unless told
``nodev``/``nosuid``, and runs ``/bin/sh -c 'etfs SOURCE MOUNTPOINT -o OPTIONS'`` with no
``PATH`` (the shell's default then finds ``/usr/local/bin/etfs``; the second form may name
the program by its full path).  SOURCE is the mountpoints.yaml; MOUNTPOINT replaces its
``root:``.  The result is exactly `etfs mount -c SOURCE --root MOUNTPOINT`: the daemon detaches
and this returns once the mount answers.  ``x-systemd.*`` options are read by systemd's fstab
generator before any mount runs and are ignored here.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# Options that say nothing to etfs: mount(8)'s and systemd's own, the defaults of every mount,
# and FUSE options etfs sets by itself (a root mount always has allow_other and
# default_permissions).  ``dev``/``suid`` are accepted but never granted: etfs mounts are always
# nodev,nosuid, whatever mount.fuse3 adds, as a file server's setuid bits must not count here.
IGNORED = frozenset(
    {
        "rw",
        "defaults",
        "auto",
        "noauto",
        "nofail",
        "_netdev",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "async",
        "noatime",
        "allow_other",
        "default_permissions",
    }
)
IGNORED_PREFIXES = ("x-", "comment=")


class MountOptionError(ValueError):
    """An -o option etfs does not support; the message names it."""


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    """The subcommand names of a parser (argparse has no public accessor)."""
    return {
        name
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for name in action.choices
    }


def looks_like_helper_call(argv: list[str], commands: set[str]) -> bool:
    """``etfs SOURCE MOUNTPOINT ...`` rather than ``etfs COMMAND ...``: the first word is no
    subcommand or option but a path (so a mistyped command still gets argparse's message)."""
    if len(argv) < 2 or argv[0].startswith("-") or argv[0] in commands:
        return False
    return "/" in argv[0] or Path(argv[0]).is_file()


def parse_helper_args(argv: list[str]) -> argparse.Namespace:
    """The Namespace `etfs mount` would get; MountOptionError for options etfs cannot honour."""
    p = argparse.ArgumentParser(
        prog="etfs",
        usage="etfs CONFIG MOUNTPOINT [-o OPTIONS]  (how mount -t fuse.etfs runs etfs)",
    )
    p.add_argument("source", type=Path)
    p.add_argument("mountpoint", type=Path)
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    verbose: bool = args.verbose
    log_file: Path | None = None
    for group in args.options:
        for opt in group.split(","):
            name, eq, value = opt.partition("=")
            if opt in IGNORED or opt.startswith(IGNORED_PREFIXES) or not opt:
                continue
            if opt in ("verbose", "debug"):
                verbose = True
            elif name == "log_file" and eq and value:
                log_file = Path(value)
            elif opt == "ro":
                raise MountOptionError(
                    "mount option 'ro': etfs mounts are read-write (use the servers' ACLs)"
                )
            else:
                raise MountOptionError(
                    f"unknown mount option {opt!r} (etfs takes verbose and log_file=PATH; "
                    "mount and systemd options such as _netdev, nofail, x-systemd.* are fine)"
                )
    return argparse.Namespace(
        command="mount",
        config=args.source,
        root=args.mountpoint,
        foreground=False,
        log_file=log_file,
        verbose=verbose,
    )
