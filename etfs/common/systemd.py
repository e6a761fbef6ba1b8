"""Running under systemd: logging with journal priorities, readiness notification, `-v`/`--version`.

Shared by `etfs` and `etfs-server`.  Nothing here needs systemd's Python bindings: journald
reads a ``<N>`` syslog priority at the start of each line a service writes to its stderr
(``SyslogLevelPrefix=``, on by default), and ``Type=notify`` units wait for one ``READY=1``
datagram on ``$NOTIFY_SOCKET`` (sd_notify(3)).  Outside systemd the log lines carry a time
stamp and the level name instead, and `notify` does nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

log = logging.getLogger(__name__)

# logging level -> syslog priority (journald's PRIORITY=): debug 7, info 6, warning 4, error 3, critical 2
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def stderr_is_journal() -> bool:
    """Is our stderr the journal?  systemd sets ``JOURNAL_STREAM=DEV:INODE`` of the stream it
    connected; a child whose stderr was redirected elsewhere inherits the variable, so compare."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<PRIORITY>logger: message``; journald stamps the time itself.  Every line of a
    multi-line record (a traceback) gets the prefix, or the journal would log it as info."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


def setup_logging(verbose: bool, default: int) -> None:
    """Log to stderr: DEBUG with ``-v``, else ``default``; journal priorities when stderr is the journal."""
    handler = logging.StreamHandler()
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else default)


def add_common_options(
    parser: argparse.ArgumentParser, version: str, subparsers: list[argparse.ArgumentParser]
) -> None:
    """``--version`` on the program, ``-v`` before and after every subcommand.

    A subcommand's ``-v`` defaults to SUPPRESS: argparse copies a subparser's defaults over the
    values the main parser already set, which would undo ``etfs -v mount``."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for sub in subparsers:
        sub.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager; False when none listens."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # abstract socket namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True
