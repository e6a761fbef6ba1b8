"""`etfs mount` / `etfs umount`: run the FUSE daemon and set up the per-server mountpoints.

Topology (docs/architecture.md section 1): ONE pyfuse3 mount at ``config.root`` whose top-level
directories are the servers, so a `cp` between two servers stays on one FUSE superblock and
reaches the daemon as one copy_file_range request.  Each server's configured ``mountpoint`` is a
bind mount of ``ROOT/NAME`` (root) or a symlink to it (anyone else).

Without ``--foreground`` the command re-executes itself with ``--foreground`` in a new session
and returns only once the mount answers (or prints the daemon's error and exits 1).  The daemon
writes ``<root's parent>/daemon.json`` (pid, root, config, mountpoints) so `etfs umount`, `etfs
status` and friends can find it, and removes it at exit.  SIGINT/SIGTERM unmount everything.
Leftovers of a crashed daemon (ENOTCONN on stat) are cleaned up at the next mount.
`umount ROOT` (umount(8), systemd) also ends the daemon, which notices and removes the mountpoints.
An /etc/fstab line reaches `cmd_mount` through `etfs.daemon.fstab` (the fstab mountpoint is ``--root``).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from etfs.common.safefile import log_handler, open_append, read_regular, write_atomic
from etfs.common.systemd import PLAIN_FORMAT, notify, stderr_is_journal
from etfs.config import ClientConfig, load_client_config
from etfs.daemon.procs import pid_alive

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
READ_AHEAD_KB = 1024
FUSE_OPTIONS = ("subtype=etfs", "noatime")
_FUSE_DEVICE = (10, 229)  # misc major, FUSE_MINOR
UNMOUNT_POLL = 0.5  # seconds between looks at /proc/self/mounts for an umount(8) of the root


def fsname(config: ClientConfig) -> str:
    """The mount's source as `mount` and `df` show it: ``etfs:jive,onsala``.

    It names the servers, so two etfs mounts can be told apart, and the colon keeps `df` and
    findmnt from taking it for a path (a bare ``etfs`` did when a directory of that name was in
    the current directory)."""
    return "etfs:" + ",".join(config.servers)


def fsname_option(config: ClientConfig) -> str:
    # libfuse splits -o values at commas unless escaped with a backslash.
    return "fsname=" + fsname(config).replace("\\", "\\\\").replace(",", "\\,")


# --- helpers shared by mount and umount --------------------------------------------------------
def registry_path(root: Path) -> Path:
    return root.parent / "daemon.json"


def read_registry(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(read_regular(registry_path(root)))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_our_daemon(pid: int) -> bool:
    """Is ``pid`` still an etfs process?  A registry outlives a crashed
    daemon, and its pid may since belong to an unrelated process that must not be signalled."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"etfs.cli" in b" ".join(args) or any(a.endswith(b"/etfs") for a in args[:2])


def _mounted_paths() -> set[str]:
    out = set()
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 1:
                    out.add(parts[1].replace("\\040", " ").replace("\\011", "\t"))
    except OSError:
        pass
    return out


def _is_mounted(path: Path) -> bool:
    # /proc only: os.path.ismount stats, which hangs on a FUSE mount nobody serves.
    return str(path) in _mounted_paths()


def _stale(path: Path) -> bool:
    """A mount whose daemon is gone: stat says ENOTCONN (or ECONNABORTED after an abort)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


_MNT_DETACH = 2


def detach(path: Path) -> bool:
    """umount2(path, MNT_DETACH) without any stat of the path.

    umount(8) stats its argument first, which hangs on a FUSE mount whose loop is not
    serving requests any more (our own teardown, or a stuck daemon).  Needs root.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(str(path)), _MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOENT):
        log.warning("umount2(%s): %s", path, os.strerror(err))
    return False


def force_unmount(path: Path) -> None:
    """Lazily unmount whatever is mounted at path (FUSE or bind); quiet when nothing is."""
    if os.geteuid() == 0:
        detach(path)
    if (_is_mounted(path) or _stale(path)) and shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u", "-z", str(path)]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _mountpoints(config: ClientConfig) -> dict[str, Path]:
    return {name: e.mountpoint for name, e in config.servers.items() if e.mountpoint is not None}


def cleanup_stale(config: ClientConfig) -> None:
    """Remove mounts and the registry left by a daemon that died without unmounting."""
    root = config.root
    reg = read_registry(root)
    if reg is not None and isinstance(reg.get("pid"), int) and pid_alive(reg["pid"]):
        if _is_mounted(root) and not _stale(root):
            raise RuntimeError(
                f"{root} is already mounted by etfs (pid {reg['pid']}); run 'etfs umount' first"
            )
    for path in [*_mountpoints(config).values(), root]:
        if _stale(path) or _etfs_on_top(path):
            log.warning("cleaning up a stale mount at %s", path)
            force_unmount(path)
    if reg is not None and not (isinstance(reg.get("pid"), int) and pid_alive(reg["pid"])):
        registry_path(root).unlink(missing_ok=True)


def _etfs_on_top(path: Path) -> bool:
    """Is the topmost mount at path the etfs filesystem (the FUSE root or a bind mount of it)?

    Only the topmost: under fstab's ``x-systemd.automount`` the root is an autofs mount of
    systemd's, which the FUSE mount covers once systemd starts it and must never be removed."""
    if str(path) not in _mounted_paths():
        return False
    top = ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and fields[4] == str(path):
                    top = right  # later lines are mounted on top of earlier ones
    except OSError:
        pass
    return top.startswith("fuse") and "etfs" in top


# --- etfs mount ---------------------------------------------------------------------------------
def cmd_mount(args: argparse.Namespace) -> int:
    config = load_client_config(args.config)
    if getattr(args, "root", None) is not None:  # fstab's mountpoint, or --root
        config = dataclasses.replace(config, root=Path(os.path.abspath(args.root)))
    if problem := fuse_problem():
        print(f"etfs mount: {problem}", file=sys.stderr)
        return 1
    if args.log_file is not None:
        open_append(args.log_file).close()  # an unusable log file is reported before any waiting
    if not getattr(args, "no_check", False) and not _servers_usable(config):
        return 1
    if args.foreground:
        return run_foreground(config, args.log_file)
    return _start_background(config, args)


def fuse_problem() -> str | None:
    """Why no FUSE filesystem can be mounted here (one line), or None: found before mounting,
    instead of libfuse's message and a traceback."""
    dev = "/dev/fuse"
    try:
        st = os.stat(dev)
    except FileNotFoundError:
        return f"{dev} does not exist: load the fuse module (modprobe fuse) or give the container the device"
    except OSError as exc:
        return f"{dev}: {exc.strerror}"
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != _FUSE_DEVICE:
        kind = (
            f"char device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            if stat.S_ISCHR(st.st_mode)
            else "not a char device"
        )
        return f"{dev} is not the FUSE device (char 10:229) but {kind}: cannot mount"
    if not os.access(dev, os.R_OK | os.W_OK):
        mode = stat.S_IMODE(st.st_mode)
        return f"{dev} may not be opened by uid {os.getuid()} (mode {mode:04o}): cannot mount"
    return None


def _servers_usable(config: ClientConfig) -> bool:
    """Log in to every server once; print one line per server with a problem.  False when
    one of them refuses for good (the mount would only ever get EACCES or ENOENT from it)."""
    from etfs.client.probe import check_servers

    problems = check_servers(config)
    for p in problems:
        print(f"etfs mount: {p.message}", file=sys.stderr)
    if any(p.permanent for p in problems):
        print(f"etfs mount: not mounting: fix the servers' entries in {config.file}", file=sys.stderr)
        return False
    return True


def _start_background(config: ClientConfig, args: argparse.Namespace) -> int:
    try:
        cleanup_stale(config)
    except RuntimeError as exc:
        print(f"etfs mount: {exc}", file=sys.stderr)
        return 1
    config.root.parent.mkdir(parents=True, exist_ok=True)
    # Under systemd (a mount unit running the fstab helper, a service) the daemon keeps our
    # stderr, the journal; elsewhere it logs to a file, as nobody reads a detached stderr.
    to_journal = args.log_file is None and stderr_is_journal()
    log_file: Path = args.log_file or config.root.parent / "daemon.log"
    cmd = [sys.executable, "-m", "etfs.cli"]
    if getattr(args, "verbose", False):
        cmd.append("-v")
    cmd += ["mount", "-c", str(Path(args.config).resolve()), "--root", str(config.root), "--foreground"]
    cmd.append("--no-check")  # we just checked the servers
    if not to_journal:
        cmd += ["--log-file", str(log_file)]
    with open(os.devnull, "ab") if to_journal else open_append(log_file) as logf:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=None if to_journal else subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    where = "the journal" if to_journal else str(log_file)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            # The daemon's own one-line errors say why; else the end of its log.
            tail = "" if to_journal else _tail(log_file)
            said = [ln for ln in tail.splitlines() if ln.startswith("etfs mount: ")]
            if said:
                print("\n".join(said), file=sys.stderr)
            else:
                if tail:
                    print(tail, file=sys.stderr)
                print(f"etfs mount: the daemon exited with status {code}; see {where}", file=sys.stderr)
            return 1
        if _ready(config, proc.pid):
            print(f"etfs: mounted {config.root} (pid {proc.pid}); log: {where}")
            return 0
        time.sleep(0.05)
    print(f"etfs mount: the mount did not become ready in {READY_TIMEOUT:.0f}s; see {where}", file=sys.stderr)
    proc.terminate()
    return 1


def _ready(config: ClientConfig, pid: int) -> bool:
    reg = read_registry(config.root)
    if reg is None or reg.get("pid") != pid or not os.path.ismount(config.root):
        return False
    try:
        os.stat(config.root)
    except OSError:
        return False
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _setup_logging(log_file: Path | None) -> None:
    root_logger = logging.getLogger()
    if log_file is None:
        if stderr_is_journal() and root_logger.level > logging.INFO:
            root_logger.setLevel(logging.INFO)  # a daemon's journal holds what its log file would
        return
    handler = log_handler(log_file)
    handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    for h in list(root_logger.handlers):
        root_logger.removeHandler(h)
    root_logger.addHandler(handler)
    if root_logger.level > logging.INFO or root_logger.level == logging.NOTSET:
        root_logger.setLevel(logging.INFO)


def run_foreground(config: ClientConfig, log_file: Path | None = None) -> int:
    """Mount, serve until unmounted or signalled, clean up; the daemon's body."""
    _setup_logging(log_file)
    try:
        cleanup_stale(config)
    except RuntimeError as exc:
        print(f"etfs mount: {exc}", file=sys.stderr)
        return 1
    try:
        from etfs import copyrange

        # ETFS_COPYRANGE=0 mounts without the hook (to measure what it costs ordinary I/O).
        if os.environ.get("ETFS_COPYRANGE", "1") != "0":
            copyrange.install()
            # ETFS_FAST_XATTR=0: every getxattr goes through pyfuse3's loop (to measure the gain).
            copyrange.enable_fast_xattr(os.environ.get("ETFS_FAST_XATTR", "1") != "0")
    except Exception as exc:
        log.warning(
            "copy_file_range hook unavailable (%s): cp between servers will go through this client", exc
        )
    root = config.root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"etfs mount: cannot create {root}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        trio.run(_serve, config)
    except KeyboardInterrupt:
        pass
    except (OSError, RuntimeError, BaseExceptionGroup) as exc:
        first = _leaf(exc, (OSError, RuntimeError))
        if first is None:
            raise
        text = (first.strerror if isinstance(first, OSError) else None) or str(first)
        if log_file is not None:  # else the log is stderr, where the line below goes anyway
            log.error("mount failed: %s", text)
        print(f"etfs mount: {text}", file=sys.stderr)
        return 1
    return 0


def _leaf(exc: BaseException, types: tuple[type[Exception], ...]) -> BaseException | None:
    """The one error inside (nested) exception groups, if it is one of ``types``; else None
    (several errors, or something unexpected: a traceback is then the right report)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, types) else None


def _init_fuse(ops: Any, root: Path, options: set[str]) -> None:
    """pyfuse3.init, with libfuse's own complaint (printed to fd 2) turned into the error's
    text: one line that says why instead of "fuse_session_mount failed"."""
    import pyfuse3

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as said:
        os.dup2(said.fileno(), 2)
        try:
            pyfuse3.init(ops, str(root), options)
        except RuntimeError as exc:
            os.dup2(saved, 2)
            said.seek(0)
            why = "; ".join(
                ln.strip() for ln in said.read().decode(errors="replace").splitlines() if ln.strip()
            )
            raise OSError(errno.EIO, f"cannot mount {root}: {why or exc}") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        if text := said.read():  # a warning on success: keep it where it was going
            os.write(2, text)


async def _serve(config: ClientConfig) -> None:
    import pyfuse3

    from etfs.client import Pool
    from etfs.daemon.services import run_client_services
    from etfs.fs import EtfsOperations

    root = config.root
    options = {*FUSE_OPTIONS, fsname_option(config)}
    if os.geteuid() == 0:
        # The daemon is root, users of the mountpoints are not: let them in, and let the kernel
        # check every caller's uid and groups against the mode bits the servers report, as on a
        # local disk (without default_permissions any local user could do what the daemon's
        # etfs identity may).
        options.update(("allow_other", "default_permissions"))
    async with trio.open_nursery() as nursery:
        pool = Pool(config, nursery)
        ops = EtfsOperations(config, pool, nursery)
        log.debug("mounting %s with FUSE options %s", root, ",".join(sorted(options)))
        _init_fuse(ops, root, options)
        mounted = True
        session_open = True

        def terminate() -> None:
            # pyfuse3.terminate after pyfuse3.close dereferences a freed session (SIGSEGV in
            # fuse_session_exit): a watcher can still wake while the teardown below awaits.
            if session_open:
                pyfuse3.terminate()

        links: list[Path] = []
        binds: list[Path] = []
        try:
            try:
                from etfs import copyrange

                copyrange.require_installed()
            except Exception as exc:
                log.warning(
                    "copy_file_range is not installed (%s): cp between servers goes through the client", exc
                )
            await nursery.start(run_client_services, ops, pool, config)
            # Everything that stats the mount must run while pyfuse3.main serves requests.
            nursery.start_soon(_after_mount, config, binds, links)
            nursery.start_soon(_watch_signals, config, binds, links, terminate)
            nursery.start_soon(_watch_unmount, config, binds, links, terminate)
            # Keep a few request workers alive: with the default of one, pyfuse3 starts and ends a
            # task for nearly every request under load.
            await pyfuse3.main(min_tasks=8)
        finally:
            with trio.CancelScope(shield=True):
                _teardown(config, binds, links)
                if mounted:
                    session_open = False
                    try:
                        pyfuse3.close(unmount=True)
                    except Exception as exc:
                        log.warning("pyfuse3.close: %s", exc)
                    if _is_mounted(root):
                        force_unmount(root)
                _log_fast_xattr()
                await pool.aclose()
            nursery.cancel_scope.cancel()


def _log_fast_xattr() -> None:
    from etfs import copyrange

    answered, chained = copyrange.fast_xattr_stats()
    if answered:
        log.info("getxattr fast path: %d answered in C, %d requests read right after", answered, chained)


async def _watch_signals(config: ClientConfig, binds: list[Path], links: list[Path], terminate: Any) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for sig in signals:
            log.info("received %s: unmounting", signal.Signals(sig).name)
            # Mountpoints first, while the FUSE loop still answers (unmounting may stat them).
            await trio.to_thread.run_sync(_teardown, config, binds, links)
            terminate()
            return


async def _watch_unmount(config: ClientConfig, binds: list[Path], links: list[Path], terminate: Any) -> None:
    """`umount ROOT` (umount(8), systemd stopping the fstab mount) ends the daemon too.

    While bind mounts of ROOT's directories exist they keep the FUSE connection open, so the
    daemon would never learn that the root is gone: look for it, then undo the binds and stop."""
    root = config.root
    # The topmost mount, not any: under x-systemd.automount systemd's autofs mount stays at ROOT
    # after the FUSE mount on top of it is gone.
    while not await trio.to_thread.run_sync(_etfs_on_top, root):
        await trio.sleep(UNMOUNT_POLL)  # pyfuse3.init mounted it; /proc may show it a moment later
    while True:
        await trio.sleep(UNMOUNT_POLL)
        if not await trio.to_thread.run_sync(_etfs_on_top, root):
            break
    log.info("%s was unmounted: removing the mountpoints and stopping", root)
    await trio.to_thread.run_sync(_teardown, config, binds, links)
    terminate()


async def _after_mount(config: ClientConfig, binds: list[Path], links: list[Path]) -> None:
    root = config.root
    st = await trio.to_thread.run_sync(os.stat, root)
    if os.geteuid() == 0:
        _raise_readahead(st.st_dev)
    for name, mp in _mountpoints(config).items():
        target = root / name
        try:
            if os.geteuid() == 0:
                await _bind(target, mp)
                binds.append(mp)
            else:
                _symlink(target, mp)
                links.append(mp)
        except OSError as exc:
            log.error("cannot set up mountpoint %s for %s: %s", mp, name, exc)
    reg = {
        "pid": os.getpid(),
        "root": str(root),
        "config": str(config.file.resolve()),
        "mountpoints": {n: str(p) for n, p in _mountpoints(config).items()},
        "bind_mounts": [str(p) for p in binds],
        "symlinks": [str(p) for p in links],
        "started": time.time(),
    }
    write_atomic(registry_path(root), json.dumps(reg, indent=1) + "\n")
    log.info("etfs mounted at %s (%d servers)", root, len(config.servers))
    notify("READY=1")  # Type=notify units: the mount and the mountpoints are usable now


def _raise_readahead(dev: int) -> None:
    # docs/architecture.md section 3: read_ahead_kb=1024 lets the kernel read ahead in 1 MiB
    # (passthrough reads 0.96 -> 1.55 GB/s).
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        bdi.write_text(f"{READ_AHEAD_KB}\n")
    except OSError as exc:
        log.warning("cannot raise %s: %s", bdi, exc)


async def _bind(target: Path, mp: Path) -> None:
    if mp.is_symlink():
        mp.unlink()
    mp.mkdir(parents=True, exist_ok=True)
    result = await trio.run_process(
        ["mount", "--bind", str(target), str(mp)], capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        raise OSError(errno.EIO, result.stderr.decode(errors="replace").strip() or "mount --bind failed")


def _symlink(target: Path, mp: Path) -> None:
    mp.parent.mkdir(parents=True, exist_ok=True)
    if mp.is_symlink():
        mp.unlink()
    elif mp.is_dir():
        mp.rmdir()  # only an empty directory can be replaced (OSError otherwise)
    mp.symlink_to(target)


def _teardown(config: ClientConfig, binds: list[Path], links: list[Path]) -> None:
    while binds:
        detach(binds.pop())
    while links:
        mp = links.pop()
        try:
            if mp.is_symlink():
                mp.unlink()
        except OSError:
            pass
    reg = read_registry(config.root)
    if reg is not None and reg.get("pid") == os.getpid():
        registry_path(config.root).unlink(missing_ok=True)


# --- etfs umount --------------------------------------------------------------------------------
def _find_registry(args: argparse.Namespace) -> tuple[Path, dict[str, Any] | None, ClientConfig | None]:
    if args.config is not None:
        config = load_client_config(args.config)
        return config.root, read_registry(config.root), config
    if args.mountpoint is None:
        raise RuntimeError("give -c CONFIG or a mountpoint")
    target = Path(os.path.abspath(args.mountpoint))
    candidates = [target]
    if target.is_symlink():
        candidates.append(Path(os.path.realpath(target)).parent)
    candidates += [Path(p) for p in _mounted_paths()]
    for root in candidates:
        reg = read_registry(root)
        if reg is None:
            continue
        if str(target) == reg.get("root") or str(target) in reg.get("mountpoints", {}).values():
            return Path(reg["root"]), reg, None
    return target, None, None


def cmd_umount(args: argparse.Namespace) -> int:
    try:
        root, reg, config = _find_registry(args)
    except RuntimeError as exc:
        print(f"etfs umount: {exc}", file=sys.stderr)
        return 2
    pid = reg.get("pid") if reg else None
    if isinstance(pid, int) and pid_alive(pid) and not is_our_daemon(pid):
        pid = None  # the daemon died and its pid was reused: only the mounts are left to undo
    if isinstance(pid, int) and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            print(f"etfs umount: daemon {pid} did not exit; unmounting lazily", file=sys.stderr)
    # Whatever is left (crashed or stuck daemon): lazy unmounts.
    mps = [Path(p) for p in (reg or {}).get("mountpoints", {}).values()]
    if config is not None:
        mps += list(_mountpoints(config).values())
    for mp in mps:
        if _is_mounted(mp) or _stale(mp):
            force_unmount(mp)
        elif mp.is_symlink() and os.path.realpath(mp).startswith(str(root) + "/"):
            mp.unlink()
    if _is_mounted(root) or _stale(root):
        force_unmount(root)
    if reg is not None and not (isinstance(pid, int) and pid_alive(pid)):
        registry_path(root).unlink(missing_ok=True)
    # The control registry (PID.json, PID.sock) of this daemon and any other dead one.
    from etfs.daemon.control import forget_dead_daemons

    forget_dead_daemons()
    if _is_mounted(root):
        print(f"etfs umount: {root} is still mounted", file=sys.stderr)
        return 1
    if reg is None and config is None:
        print(f"etfs umount: no etfs mount found for {args.mountpoint}", file=sys.stderr)
        return 1
    return 0
