"""Issue 9 items 5 and 6: capabilities mean one transfer; servers do not become a client's proxy.

Transfers run between the server and itself on loopback (the destination pulls from its own
data port), which is all these attacks need.  The test server allows ``transfer.peers:
[127.0.0.0/8]`` (see `harness`), so item 6 is about what a server sends to an *allowed*
address; one test repeats the proxy attack with the default ``peers``.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from .harness import ALICE_SECRET, AttackServer, Deadline, attack_server
from .rawclient import DataConnection, RawClient, ServerClosed

pytestmark = pytest.mark.attack

# Bytes a client chooses and a server must never deliver to something that is not etfs.
SMUGGLED = b"GET /CLIENT-CHOSEN HTTP/1.1\r\nHost: victim\r\n\r\n"
SMUGGLED_ID = "ClientChosenTransferId"


def start_args(cap: dict[str, Any], path: str, tid: str = "") -> dict[str, Any]:
    return {
        "capability": cap,
        "source_name": "attack",
        "path": path,
        "mode": "overwrite",
        "streams": 2,
        "direction": "pull",
        "verify": True,
        "block_size": 0,
        "transfer_id": tid or cap["transfer_id"],
        "preserve_times": False,
    }


def offer(c: RawClient, path: str) -> dict[str, Any]:
    cap: dict[str, Any] = c.ok("transferoffer", path=path, ttl=60.0)
    cap["data_host"] = "127.0.0.1"  # what a real client fills in (the address it reached)
    return cap


def alice_finished_transfer(srv: AttackServer, dst: str) -> dict[str, Any]:
    """alice copies /tmp/secret/alice.txt to ``dst``; the capability, once the transfer is done."""
    with srv.client("alice") as a:
        cap = offer(a, "/tmp/secret/alice.txt")
        started = a.ok("transferstart", **start_args(cap, dst))
        info = a.wait_transfer(started["transfer_id"], timeout=10.0)
    assert info["state"] == "done", f"alice's own transfer failed: {info}"
    assert srv.path(dst).read_bytes() == ALICE_SECRET
    return cap


# --- item 5: capability reuse ----------------------------------------------------------------------
def test_legitimate_transfer_works(shared_server: AttackServer) -> None:
    """The baseline the other tests build on (passes today)."""
    alice_finished_transfer(shared_server, "/tmp/secret/copy-baseline.txt")


def test_capability_dead_after_transfer_on_data_port(shared_server: AttackServer) -> None:
    srv = shared_server
    cap = alice_finished_transfer(srv, "/tmp/secret/copy-dp.txt")
    served = []
    for stream in range(3):
        dc = DataConnection.connect(srv.data_port)
        try:
            try:
                reply = dc.hello("pull", cap["token"], cap["transfer_id"], stream)
            except (ServerClosed, OSError):
                continue
            if reply["t"] == "ready":
                data = dc.fetch(0, cap["size"])
                served.append((stream, data[:20]))
        finally:
            dc.close()
    assert not served, f"the data port served a finished transfer's capability again: {served}"


def test_capability_reuse_by_another_user(shared_server: AttackServer) -> None:
    srv = shared_server
    cap = alice_finished_transfer(srv, "/tmp/secret/copy-bob.txt")
    with srv.client("bob") as b:
        r = b.call("transferstart", **start_args(cap, "/tmp/bob/stolen.txt", "bob-steals-1"))
        info = b.wait_transfer("bob-steals-1", timeout=10.0) if r.ok else {"state": f"refused: {r.message}"}
    stolen = srv.path("/tmp/bob/stolen.txt")
    assert not (stolen.exists() and b"ALICE-SECRET" in stolen.read_bytes()), (
        f"bob copied alice's file ({info})"
    )
    assert info["state"] != "done", info


def test_capability_reuse_with_new_transfer_id(shared_server: AttackServer) -> None:
    srv = shared_server
    cap = alice_finished_transfer(srv, "/tmp/secret/copy-first.txt")
    with srv.client("alice") as a:
        r = a.call("transferstart", **start_args(cap, "/tmp/secret/copy-second.txt", "alice-again-1"))
        info = a.wait_transfer("alice-again-1", timeout=10.0) if r.ok else {"state": f"refused: {r.message}"}
    assert info["state"] != "done", f"the capability served a second transfer: {info}"


# --- item 6: the server as a proxy -----------------------------------------------------------------
class Listener:
    """A plain TCP listener (not etfs) that records what connects to it and says nothing."""

    def __init__(self, backlog: int = 16, accept: bool = True) -> None:
        self.accept = accept
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conns: list[tuple[socket.socket, bytearray]] = []
        while not self._stop.wait(0 if self.accept else 0.05):
            if not self.accept:
                continue
            try:
                c, _ = self.sock.accept()
                c.settimeout(0.05)
                conns.append((c, bytearray()))
                self.connections += 1
            except (TimeoutError, OSError):
                pass
            for c, buf in conns:
                try:
                    buf += c.recv(65536)
                except (TimeoutError, OSError):
                    pass
        for c, buf in conns:
            self.received.append(bytes(buf))
            c.close()

    @property
    def data(self) -> bytes:
        return b"".join(self.received)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@contextmanager
def listening(backlog: int = 16, accept: bool = True) -> Iterator[Listener]:
    lst = Listener(backlog, accept)
    lst._thread.start()
    try:
        yield lst
    finally:
        lst.stop()


def forged_capability(port: int) -> dict[str, Any]:
    return {
        "token": SMUGGLED,
        "transfer_id": SMUGGLED_ID,
        "path": "/tmp/bob/src.txt",
        "size": 4096,
        "mtime_ns": 0,
        "data_host": "127.0.0.1",
        "data_port": port,
        "expires": time.time() + 60,
        "data_tls": False,
        "ino": 0,
    }


def _pull_towards(c: RawClient, port: int, tid: str, wait: float = 1.0) -> tuple[Any, ...]:
    """Start a pull whose 'source' is 127.0.0.1:port; what the client can see of the outcome."""
    r = c.call("transferstart", **start_args(forged_capability(port), f"/tmp/bob/{tid}", tid))
    if not r.ok:
        return ("refused", r.errno, r.message.replace(str(port), "PORT"))
    info = c.wait_transfer(tid, timeout=wait)
    return (info["state"], info["errno"], str(info["reason"]).replace(str(port), "PORT"))


def _assert_nothing_smuggled(lst: Listener, what: str) -> None:
    data = lst.data
    leaked = [m for m in (SMUGGLED, SMUGGLED_ID.encode(), b"CLIENT-CHOSEN") if m in data]
    assert not leaked, f"{what}: the non-etfs listener received client-chosen bytes {leaked}: {data[:120]!r}"


def test_pull_sends_no_client_bytes_to_a_non_etfs_listener(shared_server: AttackServer) -> None:
    with listening() as lst, shared_server.client("bob") as c:
        outcome = _pull_towards(c, lst.port, "proxy-pull-1")
        time.sleep(0.3)
    _assert_nothing_smuggled(lst, f"pull ({outcome})")


def test_push_sends_no_client_bytes_to_a_non_etfs_listener(shared_server: AttackServer) -> None:
    with listening() as lst, shared_server.client("bob") as c:
        cap = offer(c, "/tmp/bob/src.txt")
        r = c.call(
            "transferpush",
            capability=cap,
            ticket=SMUGGLED,
            host="127.0.0.1",
            port=lst.port,
            streams=1,
            tls=False,
        )
        time.sleep(1.0)
    _assert_nothing_smuggled(lst, f"push ({'accepted' if r.ok else r.message})")


def test_default_peers_do_not_proxy() -> None:
    """The same pull with the default ``transfer.peers`` (no entry in server.yaml)."""
    with attack_server(extra={"transfer": {}}) as srv, listening() as lst, srv.client("bob") as c:
        outcome = _pull_towards(c, lst.port, "proxy-default-1")
        time.sleep(0.3)
    _assert_nothing_smuggled(lst, f"default peers ({outcome})")


def test_errors_do_not_map_ports(shared_server: AttackServer) -> None:
    """Pulls towards a closed port, a 'filtered' one (SYNs dropped) and a silent listener look alike."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    with (
        listening() as silent,
        listening(backlog=0, accept=False) as filtered,
        shared_server.client("bob") as c,
    ):
        # Nothing is accepted there: one queued connection fills the backlog ...
        filler = socket.create_connection(("127.0.0.1", filtered.port), timeout=2)
        try:  # ... and SYNs to it are dropped, like a filtering firewall's
            started = {
                name: c.call(
                    "transferstart",
                    **start_args(forged_capability(port), f"/tmp/bob/map-{name}", f"map-{name}"),
                )
                for name, port in (
                    ("closed", closed_port),
                    ("filtered", filtered.port),
                    ("open", silent.port),
                )
            }
            # All three run at once.  Wait until they have ended (the filtered connect alone takes
            # ~5 s; today the silent listener keeps its transfer running for data_timeout, 30 s).
            dl = Deadline(7.0)
            outcomes = {}
            for name, r in started.items():
                port = {"closed": closed_port, "filtered": filtered.port, "open": silent.port}[name]
                if not r.ok:
                    outcomes[name] = ("refused", r.errno, r.message.replace(str(port), "PORT"))
                    continue
                info = c.wait_transfer(f"map-{name}", timeout=dl.left)
                outcomes[name] = (
                    info["state"],
                    info["errno"],
                    str(info["reason"]).replace(str(port), "PORT"),
                )
        finally:
            filler.close()
    norm = {k: (s, e, re.sub(r"map-\w+", "ID", m)) for k, (s, e, m) in outcomes.items()}
    assert len(set(norm.values())) == 1, f"the answers tell the ports apart: {norm}"
