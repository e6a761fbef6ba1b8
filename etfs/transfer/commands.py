"""`etfs cp` and `etfs status`: the command-line face of `etfs.api`.

Paths name files under an etfs mountpoint (``/mnt/jive/tmp/x``), as ``SERVER:PATH``,
or on the local disk.  Server-to-server copies are done by the mount daemon's engine
(so they show in `etfs status`); copies between the local disk and a server go
through the mount like any file copy, into a hidden part file renamed at the end.
The mount is the one the paths (or the working directory) lie on; `--mount` chooses.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from etfs import api
from etfs.api import CANCELLED, DONE, FAILED, Copy, CopyResult, EtfsError, Location, NoMountError

from . import status_view, tree

log = logging.getLogger(__name__)

PARALLEL_FILES = 4

# `etfs cp`'s exit statuses (listed in its --help; scripts may rely on them).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_MOUNT = 3
EXIT_BAD_PATHS = 4
EXIT_INTERRUPTED = 130
EXIT_CODES = (
    (EXIT_OK, "every file was copied (or skipped: already there)"),
    (EXIT_FAILED, "some copies failed (one line each on stderr); the others were done"),
    (EXIT_USAGE, "bad usage: an unknown option or a bad value"),
    (
        EXIT_NO_MOUNT,
        "no etfs mount to use: none running, several and the paths do not say which,\n"
        "       or its daemon is unreachable",
    ),
    (
        EXIT_BAD_PATHS,
        "nothing was copied: a source is missing, a directory without -r,\n"
        "       or the target is not a directory",
    ),
    (EXIT_INTERRUPTED, "Ctrl-C: the running copies were stopped on the servers (part files kept)"),
)

# Kept for callers of the old names.
CommandError = EtfsError


def exit_codes_epilog() -> str:
    return "exit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES)


class Interrupt:
    """Ctrl-C on `etfs cp`: cancels every running copy and remembers that it did.

    The first SIGINT cancels each copy (`Copy.cancel`: the daemon cancels a server-to-server
    transfer on both servers and answers once they stopped; local copies stop at their next
    chunk); the command exits 130 after that.  A second SIGINT exits at once.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._copies: set[Copy] = set()

    def __bool__(self) -> bool:
        return self.event.is_set()

    def add(self, c: Copy) -> None:
        with self._lock:
            self._copies.add(c)
            if self.event.is_set():
                c.cancel()

    def discard(self, c: Copy) -> None:
        with self._lock:
            self._copies.discard(c)

    def fire(self, *_: object) -> None:
        if self.event.is_set():
            os._exit(EXIT_INTERRUPTED)  # second Ctrl-C: do not wait any longer
        print("etfs: cancelling (Ctrl-C again to quit without waiting)", file=sys.stderr, flush=True)
        with self._lock:
            self.event.set()
            for c in self._copies:
                c.cancel()


class Reporter:
    """Progress for humans (rich, on a TTY), JSON lines (--json), or nothing (-q)."""

    def __init__(self, as_json: bool, quiet: bool = False) -> None:
        self.json = as_json
        self.lock = threading.Lock()
        self.progress: Any = None
        self._last: dict[str, float] = {}
        if not as_json and not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.progress = Progress(
                *status_view.progress_columns(), console=Console(stderr=True), transient=False
            )
            self.progress.start()
        self.tasks: dict[str, Any] = {}

    def event(self, c: Copy, ev: dict[str, Any]) -> None:
        src, dst = c.source, c.destination
        key = str(dst)
        if ev.get("event") == "progress":
            # JSON lines once a second, the bar ten times a second
            now = time.monotonic()
            if now - self._last.get(key, 0.0) < (1.0 if self.json else 0.1):
                return
            self._last[key] = now
        if ev.get("event") not in ("progress", "done"):
            return  # errors and cancels are reported once, by `error`
        with self.lock:
            if self.json:
                print(json.dumps({"source": str(src), "destination": str(dst), **ev}), flush=True)
            elif self.progress is not None and "transfer" in ev:
                t = ev["transfer"]
                if key not in self.tasks:
                    self.tasks[key] = self.progress.add_task(
                        Path(dst.path).name, total=t["bytes_total"] or None
                    )
                self.progress.update(
                    self.tasks[key], completed=t["bytes_done"], total=t["bytes_total"] or None
                )

    def error(self, src: Location | str, dst: Location | str, message: str) -> None:
        with self.lock:
            if self.json:
                print(
                    json.dumps(
                        {"source": str(src), "destination": str(dst), "event": "error", "message": message}
                    ),
                    flush=True,
                )
            print(f"etfs: cannot copy '{src}' to '{dst}': {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _preserve(args: argparse.Namespace) -> frozenset[str]:
    dropped = {p.strip() for p in (args.no_preserve or "").split(",") if p.strip()}
    if "all" in dropped:
        return frozenset()
    unknown = dropped - api.PRESERVE_ALL
    if unknown:
        raise ValueError(f"--no-preserve takes mode, timestamps or all, not {', '.join(sorted(unknown))}")
    return api.PRESERVE_ALL - dropped


def cmd_cp(args: argparse.Namespace) -> int:
    if args.streams is not None and not 1 <= args.streams <= 64:
        print("etfs: --streams must be between 1 and 64", file=sys.stderr)
        return EXIT_USAGE
    try:
        preserve = _preserve(args)
    except ValueError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        # One limit for the whole command (every file), as rsync's --bwlimit.
        bwlimit = api.BandwidthLimit.parse(args.bwlimit) if getattr(args, "bwlimit", None) else None
    except ValueError as exc:
        print(f"etfs: --bwlimit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        mount = api.find_mount(args.mount, [*args.sources, args.destination])
        sources = [mount.resolve(s) for s in args.sources]
        dest = mount.resolve(args.destination)
        todo = tree.plan(sources, dest, args.recursive, args.dereference, mount.resolve)
    except NoMountError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return EXIT_NO_MOUNT
    except EtfsError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return EXIT_BAD_PATHS
    quiet = getattr(args, "quiet", False)
    rep = Reporter(args.json, quiet)
    interrupt = Interrupt()
    started = time.monotonic()
    for special in todo.special:
        print(f"etfs: skipping '{special}': not a regular file, directory or symlink", file=sys.stderr)

    def one(pair: tuple[Location, Location]) -> CopyResult:
        src, dst = pair
        if interrupt:
            return CopyResult(str(src), str(dst), CANCELLED, message="not started before Ctrl-C")
        c = api.start_copy(
            src,
            dst,
            mount=mount,
            mode=args.mode,
            streams=args.streams,
            direction=args.direction,
            verify=False if args.no_verify else None,
            preserve=preserve,
            on_event=rep.event,
            bwlimit=bwlimit,
        )
        interrupt.add(c)
        try:
            result = c.wait()
        finally:
            interrupt.discard(c)
        if not result.ok:
            rep.error(src, dst, result.message or result.outcome)
        return result

    link_failures = 0
    for src, dst in todo.links:
        try:
            tree.copy_link(src, dst, args.mode, preserve)
        except OSError as exc:
            rep.error(src, dst, exc.strerror or str(exc))
            link_failures += 1
    previous = signal.signal(signal.SIGINT, interrupt.fire)
    try:
        with concurrent.futures.ThreadPoolExecutor(PARALLEL_FILES) as pool:
            futures = [pool.submit(one, pair) for pair in todo.files]
            # (a bare wait: Ctrl-C runs `interrupt.fire` in this thread meanwhile)
            concurrent.futures.wait(futures)
            results = [f.result() for f in futures]
    finally:
        signal.signal(signal.SIGINT, previous)
        rep.close()
    dir_problems = [] if interrupt else tree.finish_dirs(todo.dirs, preserve)
    for problem in dir_problems:
        print(f"etfs: {problem}", file=sys.stderr)
    if not quiet and not args.json:
        links = len(todo.links) - link_failures
        print(status_view.summary_line(results, time.monotonic() - started, links), flush=True)
    if interrupt and any(r.outcome != DONE for r in results):
        # Every copy is over on the servers now (finished, failed or stopped with its part file).
        return EXIT_INTERRUPTED
    failed = link_failures or dir_problems or any(r.outcome in (FAILED, CANCELLED) for r in results)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    interval = getattr(args, "interval", 1.0)
    if not interval > 0:
        print("etfs: --interval must be more than 0 seconds", file=sys.stderr)
        return 2
    try:
        mount = api.find_mount(args.mount)
    except EtfsError as exc:
        print(f"etfs: {exc}", file=sys.stderr)
        return 1
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                if args.server:
                    records = api.server_records(args.server, mount)
                    reply: dict[str, Any] = {
                        "server": args.server,
                        "transfers": [t.as_dict() for t in records],
                    }
                    st = api.Status(records)
                else:
                    st = api.status(mount)
                    reply = {"transfers": [t.as_dict() for t in st.transfers]}
                    if st.mount_io:
                        reply["mount_io"] = {
                            io.server: {"read": io.read, "written": io.written} for io in st.mount_io
                        }
            except EtfsError as exc:
                print(f"etfs: {exc}", file=sys.stderr)
                return 1
            if args.json:
                if args.watch:
                    reply["transfers"] = [t for t in reply["transfers"] if api.Transfer.from_dict(t).running]
                print(json.dumps(reply), flush=True)
            else:
                text = "\n".join(status_view.render_status(st, live_only=args.watch, own_uid=os.getuid()))
                if args.watch and tty:
                    print("\033[H\033[2J" + text, flush=True)  # redraw in place
                elif args.watch:
                    # Piped: plain blocks, each headed by its time, no escape codes.
                    print(f"--- {time.strftime('%H:%M:%S')}\n{text}", flush=True)
                else:
                    print(text, flush=True)
            if not args.watch:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0 if args.watch else 130
    except BrokenPipeError:  # `etfs status --watch | head`
        return 0
