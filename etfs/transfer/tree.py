"""What `etfs cp -r` copies: files, symlinks and directories of a tree, and their metadata.

`plan` expands the command line into the files to copy (each one `etfs.api.start_copy`),
the symlinks to recreate and the directories created on the way.  Like `cp -a` / `rsync -a`,
symlinks are copied as links by default (a link leading outside an export is just a name
then, and a link to a directory is not followed), and directories get their source's mode
and times once everything inside them is written (`finish_dirs`; writing into a directory
changes its mtime).  ``dereference`` (-L) follows links instead.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from etfs.api import EtfsError, Location
from etfs.protocol.transfer import WORK_FILE, CopyMode, local_part_name

log = logging.getLogger(__name__)


class PlanError(EtfsError):
    """The command line names something that cannot be copied (nothing was copied)."""


@dataclass
class Plan:
    files: list[tuple[Location, Location]] = field(default_factory=list)
    links: list[tuple[Location, Location]] = field(default_factory=list)
    # (source, destination) of every directory created or entered, parents first
    dirs: list[tuple[Location, Location]] = field(default_factory=list)
    special: list[Location] = field(default_factory=list)  # FIFOs, sockets, devices: skipped


Resolver = Callable[[str], Location]


def _followed(loc: Location, resolve: Resolver) -> Location:
    """Where a symlink leads, as a location: servers refuse paths through symlinks, so a
    followed link is named by its real path (on the mount: a server path, else local)."""
    return resolve(os.path.realpath(loc.fs_path)) if loc.fs_path.is_symlink() else loc


def plan(
    sources: list[Location],
    dest: Location,
    recursive: bool,
    dereference: bool = False,
    resolve: Resolver | None = None,
) -> Plan:
    """Expand the command line into what to copy, creating the destination's directories.

    A symlink named as a source is followed unless ``recursive`` (as `cp`); inside a tree,
    links are copied as links unless ``dereference``.  ``resolve`` names a real path
    (`etfs.api.Mount.resolve`), for the links followed.
    """
    resolver: Resolver = resolve or (lambda p: Location(None, p, Path(p)))
    out = Plan()
    dest_is_dir = dest.fs_path.is_dir()
    if len(sources) > 1 and not dest_is_dir:
        raise PlanError(f"target '{dest}' is not a directory")
    for src in sources:
        follow = dereference or not recursive
        try:
            st = src.fs_path.stat() if follow else src.fs_path.lstat()
        except OSError as exc:
            raise PlanError(f"cannot stat '{src}': {exc.strerror}") from None
        target = dest.child(Path(src.path).name) if dest_is_dir else dest
        if stat.S_ISLNK(st.st_mode):
            out.links.append((src, target))
            continue
        if follow:
            src = _followed(src, resolver)
        if stat.S_ISDIR(st.st_mode):
            if not recursive:
                raise PlanError(f"-r not specified; omitting directory '{src}'")
            _walk(src, target, dereference, out, {(st.st_dev, st.st_ino)}, resolver)
        elif stat.S_ISREG(st.st_mode):
            out.files.append((src, target))
        else:
            out.special.append(src)
    return out


def _mkdir(d: Location) -> None:
    try:
        d.fs_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PlanError(f"cannot create directory '{d}': {exc.strerror}") from None


def _walk(
    src: Location,
    dst: Location,
    dereference: bool,
    out: Plan,
    above: set[tuple[int, int]],
    resolve: Resolver,
) -> None:
    _mkdir(dst)
    out.dirs.append((src, dst))
    try:
        entries = sorted(os.scandir(src.fs_path), key=lambda e: e.name)
    except OSError as exc:
        raise PlanError(f"cannot read directory '{src}': {exc.strerror}") from None
    for entry in entries:
        if WORK_FILE.search(entry.name):  # copies in progress are never copied
            continue
        s, d = src.child(entry.name), dst.child(entry.name)
        try:
            if entry.is_symlink():
                if not dereference:
                    out.links.append((s, d))
                    continue
                s = _followed(s, resolve)
            st = entry.stat(follow_symlinks=True)
        except OSError as exc:
            raise PlanError(f"cannot stat '{s}': {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in above:
                raise PlanError(f"'{s}' leads back to a directory it is in (a symlink loop with -L)")
            _walk(s, d, dereference, out, above | {key}, resolve)
        elif stat.S_ISREG(st.st_mode):
            out.files.append((s, d))
        else:
            out.special.append(s)


def copy_link(src: Location, dst: Location, mode: str, preserve: Iterable[str]) -> str:
    """Recreate the symlink ``src`` at ``dst`` (its target unchanged, as `cp -a`): "done" or
    "skipped" (skip-existing, same target); `OSError` otherwise.  Replacing is atomic."""
    target = os.readlink(src.fs_path)
    try:
        existing: str | None = os.readlink(dst.fs_path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: there is something, not a link
            raise
        existing = ""
        if dst.fs_path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "destination is a directory") from None
    if existing is not None:
        if mode == CopyMode.NEW:
            raise FileExistsError(errno.EEXIST, "destination exists (mode new)")
        if mode == CopyMode.SKIP_EXISTING and existing == target:
            return "skipped"
    tmp = dst.fs_path.with_name(local_part_name(dst.fs_path.name))
    os.symlink(target, tmp)
    try:
        if "timestamps" in preserve:
            st = src.fs_path.lstat()
            try:
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            except OSError as exc:  # not every filesystem sets a link's times
                log.debug("%s: cannot set the link's times: %s", dst, exc)
        os.replace(tmp, dst.fs_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return "done"


def finish_dirs(dirs: list[tuple[Location, Location]], preserve: Iterable[str]) -> list[str]:
    """Give each created directory its source's mode and times, deepest first (after its
    contents are written).  Returns one message per directory that could not be set."""
    keep = set(preserve)
    problems: list[str] = []
    for src, dst in reversed(dirs):
        try:
            st = src.fs_path.stat()
            if "mode" in keep:
                os.chmod(dst.fs_path, stat.S_IMODE(st.st_mode))
            if "timestamps" in keep:
                os.utime(dst.fs_path, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError as exc:
            problems.append(f"cannot keep the mode and times of '{dst}': {exc.strerror}")
    return problems
