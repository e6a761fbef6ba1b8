"""Issue 9 item 4: no one can exhaust the server.

Each attack runs against a server of its own, with its memory sampled from
``/proc/PID/status`` (`MemoryGuard`, which SIGKILLs the server above `GUARD` to protect the
shared machine: the review saw 1.8 and 4.25 GiB) and a second user's requests timed while
the attack goes on.  Every loop is bounded in count and in time.

Bounds asserted (issue 9, "Done when"): under an unauthenticated attack the server stays
under `UNAUTH_RSS` and a legitimate login succeeds within `ANSWER`; under one user's flood
another user's ``Stat`` and 1 MiB ``Read`` are answered within `ANSWER`, and the server's
memory stays under `FLOOD_RSS` (per-connection backpressure on reply bytes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from .harness import KEYS, AttackServer, Deadline, MemoryGuard, MiB, timed
from .rawclient import HEADER, O_RDONLY, RawClient, ServerClosed

pytestmark = pytest.mark.attack

ANSWER = 1.0  # seconds: a legitimate login / Stat / 1 MiB Read while an attack runs
UNAUTH_RSS = 200 * MiB
FLOOD_RSS = 400 * MiB
GUARD = 768 * MiB
LIMIT_ERRNOS = {
    errno.EMFILE,
    errno.ENFILE,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EDQUOT,
    errno.ENOSPC,
    errno.ENOBUFS,
}


def alice_login(srv: AttackServer) -> float:
    """Seconds for alice to connect, log in and Stat; `FAILED` (inf) when that fails."""

    def run() -> None:
        with RawClient.login_to(srv.port, "alice", KEYS["alice"], timeout=PATIENCE) as c:
            c.stat("/tmp/secret/alice.txt")

    t, res = timed(run)
    if isinstance(res, Exception):
        NOTES.append(f"alice's login failed after {t:.2f} s: {res!r}")
        return FAILED
    return t


def alice_requests(srv: AttackServer) -> tuple[float, float]:
    """Seconds for alice's Stat, and for her Open + 1 MiB Read + Close (`FAILED` when one fails).

    On a connection alice opened before the attack: her login is timed by `alice_login`.
    """
    c = ALICE.get(srv.port)
    if c is None:
        return FAILED, FAILED
    t_stat, res = timed(lambda: c.stat("/tmp/secret/alice.txt"))
    if isinstance(res, Exception):
        NOTES.append(f"alice's Stat failed after {t_stat:.2f} s: {res!r}")
        return FAILED, FAILED

    def read() -> bytes:
        h = c.open("/tmp/bob/one-mib")
        try:
            return c.read(h, 0, MiB)
        finally:
            c.call("close", handle=h)

    t_read, data = timed(read)
    if isinstance(data, Exception) or len(data) != MiB:
        NOTES.append(f"alice's 1 MiB Read failed after {t_read:.2f} s: {data!r:.100}")
        t_read = FAILED
    return t_stat, t_read


FAILED = float("inf")
PATIENCE = 2.0  # seconds before a timed request counts as failed (the bound is ANSWER)
NOTES: list[str] = []  # why timed requests failed, for the assertion messages
ALICE: dict[int, RawClient] = {}  # alice's connection per server port


@pytest.fixture
def alice(fresh_server: AttackServer) -> Iterator[RawClient]:
    """alice, logged in before the attack starts; `alice_requests` uses this connection."""
    NOTES.clear()
    fresh_server.plant("/tmp/bob/one-mib", b"\1" * MiB)
    c = fresh_server.client("alice", timeout=PATIENCE)
    ALICE[fresh_server.port] = c
    try:
        yield c
    finally:
        ALICE.pop(fresh_server.port, None)
        c.close()


def facts(guard: MemoryGuard, **timings: object) -> str:
    """One line for assertion messages: memory, timings, failures."""
    items = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in timings.items())
    return f"{guard.describe()}; {items}" + (f"; {'; '.join(NOTES)}" if NOTES else "")


@contextlib.contextmanager
def guarded(srv: AttackServer) -> Iterator[MemoryGuard]:
    with MemoryGuard(srv.pid, kill_above=GUARD) as g:
        yield g


def pump(socks: list[socket.socket], payload: memoryview, seconds: float) -> int:
    """Send ``payload`` on every socket, non-blocking, for at most ``seconds``; bytes sent in all.

    A socket the server closed or stopped reading is left alone (that is a fine defence).
    """
    pos = dict.fromkeys(socks, 0)
    for s in socks:
        s.setblocking(False)
    dl = Deadline(seconds)
    total = 0
    while dl and pos:
        _, writable, _ = select.select([], list(pos), [], min(0.2, dl.left))
        if not writable:
            break  # nobody reads any more
        for s in writable:
            try:
                n = s.send(payload[pos[s] : pos[s] + 4 * MiB])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                del pos[s]
                continue
            pos[s] += n
            total += n
            if pos[s] >= len(payload):
                del pos[s]
    return total


def closed_by_peer(s: socket.socket, seconds: float) -> bool:
    """Did the server close (or reset) this connection within ``seconds``?"""
    s.setblocking(True)
    s.settimeout(seconds)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:
        return False


# --- unauthenticated -------------------------------------------------------------------------------
def test_huge_frame_before_login(fresh_server: AttackServer) -> None:
    """One 24 MiB frame, an array of empty arrays, instead of a Hello."""
    srv = fresh_server
    NOTES.clear()
    n = 24 * MiB - 5
    body = b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n  # array32 of n empty fixarrays
    frame = memoryview(HEADER.pack(len(body)) + body)
    logins: list[float] = []
    with guarded(srv) as guard:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        try:
            pump([s], frame, 5.0)
            time.sleep(0.2)
            for _ in range(3):
                logins.append(alice_login(srv))
                if logins[-1] >= ANSWER:
                    break
                time.sleep(0.2)
            closed = closed_by_peer(s, 2.0)
        finally:
            s.close()
    what = facts(guard, logins=logins, closed=closed)
    assert not guard.killed and guard.peak_rss < UNAUTH_RSS, what
    assert max(logins) < ANSWER, what
    assert closed, "the server kept the connection that sent a 24 MiB frame before login: " + what
    assert srv.alive()


def test_stalled_unauthenticated_connections(fresh_server: AttackServer) -> None:
    """60 connections, each stalled one byte short of a 24 MiB pre-login frame."""
    srv = fresh_server
    NOTES.clear()
    length = 24 * MiB
    payload = memoryview(HEADER.pack(length) + b"\x90" * (length - 1))
    socks: list[socket.socket] = []
    logins: list[float] = []
    with guarded(srv) as guard:
        try:
            for _ in range(60):
                socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
            sent = pump(socks, payload, 8.0)
            for _ in range(3):
                logins.append(alice_login(srv))
                if logins[-1] >= ANSWER:
                    break
                time.sleep(0.2)
        finally:
            for s in socks:
                s.close()
    what = facts(guard, logins=logins, sent_mib=sent // MiB)
    assert not guard.killed and guard.peak_rss < UNAUTH_RSS, what
    assert max(logins) < ANSWER, what
    assert srv.alive()


def test_trickling_data_port_connections(fresh_server: AttackServer) -> None:
    """300 connections dribble a hello into the data port while bob runs a real transfer."""
    srv = fresh_server
    NOTES.clear()
    stop = threading.Event()
    socks: list[socket.socket] = []

    def trickle() -> None:
        i = 0
        while not stop.is_set():
            for s in socks:
                try:
                    s.send(b"\x00\x00\x00\x40"[i : i + 1] if i < 4 else b"\x81")
                except OSError:
                    pass
            i += 1
            stop.wait(0.2)

    info: dict[str, object] = {"state": "not started", "reason": ""}
    took = login = FAILED
    with guarded(srv) as guard:
        t = threading.Thread(target=trickle, daemon=True)
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", srv.data_port), timeout=5)
                s.setblocking(False)
                socks.append(s)
            t.start()
            time.sleep(0.5)
            login = alice_login(srv)
            with srv.client("bob") as c:
                cap = c.ok("transferoffer", path="/tmp/bob/src.txt", ttl=60.0)
                cap["data_host"] = "127.0.0.1"
                t0 = time.monotonic()
                started = c.ok(
                    "transferstart",
                    capability=cap,
                    source_name="attack",
                    path="/tmp/bob/trickle-copy",
                    mode="overwrite",
                    streams=1,
                    direction="pull",
                    verify=True,
                    block_size=0,
                    transfer_id=cap["transfer_id"],  # a capability serves its own transfer only
                    preserve_times=False,
                )
                info = c.wait_transfer(started["transfer_id"], timeout=5.0)
                took = time.monotonic() - t0
        finally:
            stop.set()
            if t.is_alive():
                t.join(5)
            for s in socks:
                s.close()
    what = facts(guard, login=login, transfer=info["state"], after=took, reason=info["reason"])
    assert not guard.killed and guard.peak_rss < UNAUTH_RSS, what
    assert login < ANSWER, what
    assert info["state"] == "done", what
    assert srv.path("/tmp/bob/trickle-copy").read_bytes() == srv.path("/tmp/bob/src.txt").read_bytes()


# --- one authenticated user's flood ----------------------------------------------------------------
def test_handle_flood_hits_a_per_user_limit(fresh_server: AttackServer, alice: RawClient) -> None:
    """bob opens handles (at most 20,000 attempts); he must hit a clear limit, alice must not notice."""
    srv = fresh_server
    first_err = None
    opened = 0
    with guarded(srv) as guard, srv.client("bob", timeout=20) as bob:
        dl = Deadline(20.0)
        while opened < 20_000 and first_err is None and dl:
            for r in bob.pipeline([("open", {"path": "/tmp/bob/src.txt", "flags": O_RDONLY})] * 500):
                if r.ok:
                    opened += 1
                elif first_err is None:
                    first_err = r
        login = alice_login(srv)
        t_stat, t_read = alice_requests(srv)
    what = facts(guard, opened=opened, error=first_err, login=login, stat=t_stat, read=t_read)
    assert not guard.killed, what
    assert first_err is not None, f"bob opened {opened} handles without hitting any limit: " + what
    assert first_err.errno in LIMIT_ERRNOS, what
    text = first_err.message.lower()
    assert "limit" in text or "handle" in text, "not a clear limit message: " + what
    assert max(login, t_stat, t_read) < ANSWER, what


def _small_window_client(srv: AttackServer) -> RawClient:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    c = RawClient(s)
    try:
        s.connect(("127.0.0.1", srv.port))
        c.login("bob", KEYS["bob"])
    except BaseException:
        c.close()
        raise
    return c


def test_unread_pipelined_reads_are_bounded(fresh_server: AttackServer, alice: RawClient) -> None:
    """4 connections send 64 Reads of 16 MiB each and never read a reply."""
    srv = fresh_server
    big = srv.plant("/tmp/bob/big16")
    os.truncate(big, 16 * MiB)
    clients: list[RawClient] = []
    times: list[tuple[float, float]] = []
    with guarded(srv) as guard:
        try:
            for _ in range(4):
                c = _small_window_client(srv)
                clients.append(c)
                h = c.open("/tmp/bob/big16")
                for _ in range(64):
                    c.send_request("read", handle=h, offset=0, size=16 * MiB)
            for _ in range(3):
                time.sleep(0.5)
                times.append(alice_requests(srv))
                if max(times[-1]) >= ANSWER:
                    break
        except OSError as exc:
            NOTES.append(f"the attack broke off: {exc!r}")
        finally:
            for c in clients:
                c.close()
    what = facts(guard, connections=len(clients), alice=times)
    assert not guard.killed and guard.peak_rss < FLOOD_RSS, what
    assert times and all(max(t) < ANSWER for t in times), what
    assert srv.alive()


def test_checksum_flood_does_not_starve_others(fresh_server: AttackServer, alice: RawClient) -> None:
    """bob asks for 40 Checksums of a 1 TiB sparse file; alice's requests go on, also after bob left."""
    srv = fresh_server
    huge = srv.plant("/tmp/bob/huge")
    os.truncate(huge, 1 << 40)
    times: list[tuple[float, float]] = []
    with guarded(srv) as guard:
        bob = srv.client("bob")
        try:
            for _ in range(40):
                bob.send_request("checksum", path="/tmp/bob/huge", offset=0, length=-1)
            time.sleep(0.5)
            times.append(alice_requests(srv))
            if max(times[-1]) < ANSWER:
                times.append(alice_requests(srv))
        finally:
            bob.close()
        if max(max(t) for t in times) < ANSWER:
            time.sleep(0.5)
            times.append(alice_requests(srv))  # bob has left: his checksums must not linger
    what = facts(guard, alice=times)
    assert not guard.killed, what
    assert all(max(t) < ANSWER for t in times), what


def test_server_survives_garbage_after_login(fresh_server: AttackServer) -> None:
    """Sanity for the suite: an authenticated frame of garbage ends in an error, the server lives."""
    srv = fresh_server
    NOTES.clear()
    with srv.client("bob") as c:
        c.send_raw(HEADER.pack(3) + b"\xc1\xc1\xc1")
        with contextlib.suppress(ServerClosed, OSError):
            r = c.recv_reply()
            assert not r.ok
    assert alice_login(srv) < ANSWER, NOTES
    assert srv.alive()
