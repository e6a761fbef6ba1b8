"""Is a daemon alive?  The one answer the mount code and the control registry share."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` running?

    A zombie (exited, not yet reaped by its parent: state ``Z`` in ``/proc/PID/stat``) is
    dead: its sockets are closed and its mounts are no longer served.  A process we may not
    signal (another user's) counts as alive.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False  # reaped between the two looks
    except OSError:
        return True
    # "PID (COMM) STATE ...": COMM may hold spaces and parentheses, so split after the last ")".
    return stat.rpartition(")")[2].split()[:1] != ["Z"]
