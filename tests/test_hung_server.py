"""Issue 14 item 6: a stopped (hung) server costs its callers the configured timeout, no more.

One server is SIGSTOPped (by pid).  A `stat` under its directory fails within the client's
``request_timeout`` (not that plus ``connect_timeout`` plus retries) and the mount's log
names the server; the other server's directory answers at once meanwhile.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.mount import Mount, write_client_config
from harness.server import ServerFactory, ServerProcess

REQUEST_TIMEOUT = 4.0
CONNECT_TIMEOUT = 1.5


@pytest.fixture
def mount_with_timeouts(
    start_server: ServerFactory, key_file: Path, tmp_path: Path
) -> Iterator[tuple[ServerProcess, ServerProcess, Mount]]:
    """jive and onsala, mounted with short timeouts (REQUEST_TIMEOUT, CONNECT_TIMEOUT)."""
    jive, onsala = start_server("jive"), start_server("onsala")
    root = tmp_path / "mnt" / ".etfs"
    mps = {s.name: tmp_path / "mnt" / s.name for s in (jive, onsala)}
    cfg = write_client_config(tmp_path / "mountpoints.yaml", [jive, onsala], key_file, root, mps)
    text = cfg.read_text()
    text = text.replace("connect_timeout: 2", f"connect_timeout: {CONNECT_TIMEOUT}")
    text = text.replace("request_timeout: 10", f"request_timeout: {REQUEST_TIMEOUT}")
    cfg.write_text(text)
    m = Mount(cfg, root, mps, tmp_path / "mount.log")
    try:
        m.start()
        yield jive, onsala, m
    finally:
        try:
            m.stop()
        except Exception:
            m.cleanup()


def timed_stat(path: Path) -> tuple[float, OSError | None]:
    t0 = time.monotonic()
    try:
        os.stat(path)
    except OSError as exc:
        return time.monotonic() - t0, exc
    return time.monotonic() - t0, None


def test_stat_under_a_stopped_server_fails_within_the_timeout(
    mount_with_timeouts: tuple[ServerProcess, ServerProcess, Mount],
) -> None:
    jive, onsala, m = mount_with_timeouts
    for i in range(3):
        (jive.export / "tmp" / f"f{i}").write_bytes(b"x")
        (onsala.export / "tmp" / f"g{i}").write_bytes(b"y")
    assert (m.dir("jive") / "tmp").is_dir() and (m.dir("onsala") / "tmp").is_dir()
    assert jive.proc is not None
    others: list[float] = []
    stop = threading.Event()

    def other_server() -> None:
        # Meanwhile the other server's directory keeps answering (names never looked up before).
        i = 0
        while not stop.is_set():
            (onsala.export / "tmp" / f"h{i}").write_bytes(b"z")
            took, err = timed_stat(m.dir("onsala") / "tmp" / f"h{i}")
            assert err is None, err
            others.append(took)
            i += 1
            time.sleep(0.05)

    time.sleep(1.5)  # past attr_ttl and entry_ttl: the path is looked up again, from the top
    os.kill(jive.proc.pid, signal.SIGSTOP)
    watcher = threading.Thread(target=other_server)
    try:
        watcher.start()
        took, err = timed_stat(m.dir("jive") / "tmp" / "f0")
        took2, err2 = timed_stat(m.dir("jive") / "tmp" / "f1")
    finally:
        stop.set()
        watcher.join()
        os.kill(jive.proc.pid, signal.SIGCONT)
    print(f"stat under the stopped server failed after {took:.2f} s ({err}); the next after {took2:.2f} s")
    print(f"other server meanwhile: {len(others)} stats, slowest {max(others):.3f} s")
    assert err is not None and err2 is not None
    # Not one timeout per request in a row (the server's own directory, then tmp, then f0:
    # REQUEST_TIMEOUT + CONNECT_TIMEOUT and more).
    assert took < REQUEST_TIMEOUT + 0.8, took
    assert took2 < REQUEST_TIMEOUT + 0.8, took2
    assert others and max(others) < 1.0
    log = m.log.read_text()
    assert "jive" in log and "did not answer" in log, log[-2000:]
    # The server answers again once it runs: the mount recovers by itself.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if timed_stat(m.dir("jive") / "tmp" / "f2")[1] is None:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the mount did not recover after SIGCONT")
