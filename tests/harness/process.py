"""Child processes of tests and benchmarks: their environment, waiting on them, stopping them.

Another process's state can only be polled: `wait_for` (sync) and `wait_until` (trio) poll a
condition with a deadline.  `stop_pid` stops a process this run started, by its pid
(SIGTERM, then SIGKILL); nothing here kills by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent.parent
PY = sys.executable


def child_env() -> dict[str, str]:
    """This environment with the repository importable, for ``python -m etfs...`` children."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    # pytest's "warnings are errors" must not reach the servers and daemons under test.
    e.pop("PYTHONWARNINGS", None)
    return e


def wait_for(cond: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``cond`` until it is true; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def wait_until(cond: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> None:
    """`wait_for` inside a trio run."""
    deadline = trio.current_time() + timeout
    while not cond():
        if trio.current_time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await trio.sleep(0.02)


async def wait_until_async(
    cond: Callable[[], Awaitable[object]], timeout: float = 20.0, what: str = "condition"
) -> None:
    """`wait_until` for a condition that must itself await (e.g. ask a server)."""
    deadline = trio.current_time() + timeout
    while not await cond():
        if trio.current_time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await trio.sleep(0.02)


def stop_pid(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM our own child by pid, SIGKILL it if it lingers; its exit status."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)  # a throttled (stopped) process cannot exit
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            proc.wait(5)
    return proc.returncode


@contextmanager
def throttled(proc: subprocess.Popen[bytes], run: float = 0.005, pause: float = 0.045) -> Iterator[None]:
    """Slow one of our own processes down by pausing it (SIGSTOP/SIGCONT by pid) most of the time.

    A test that must act *during* a transfer cannot rely on a loopback copy being slow: 600 MiB
    can finish between two polls.  A process that runs 10% of the time still answers every
    request, only later.
    """
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set() and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            done.wait(pause)
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            done.wait(run)

    t = threading.Thread(target=cycle, name="throttle", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
