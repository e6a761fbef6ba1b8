"""Capabilities: a source server's signed permission to read one file for one transfer.

The token is the msgpack of a `CapabilityBody` followed by its HMAC-SHA256 under a
per-server secret kept in the state directory; only the issuing server can check it.

A capability means one transfer.  The source remembers what it issued (`Issued`, in
memory: a restarted source refuses older capabilities, the client asks again): the first
data connection (or push) binds it to its transfer id and destination, and it is used up
when the transfer ends, successfully or not.  No new transfer id, no other destination,
no connection after the end.  Each capability also has a secret, given only to the client
that asked for it: the data-port greeting proves knowledge of it (`etfs.protocol.data`).
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from etfs.common.ratelimit import Throttle
from etfs.protocol import data as d
from etfs.protocol.transfer import FailureCode

from .errors import TransferError

log = logging.getLogger(__name__)


class CapabilityBody(msgspec.Struct, frozen=True, array_like=True):
    transfer_id: str
    export: str
    path: str
    size: int
    mtime_ns: int
    ino: int
    expires: float
    user: str
    dev: int = 0
    ctime_ns: int = 0  # with dev, ino, size and mtime: the identity the file must keep

    def identity(self) -> tuple[int, int, int, int, int]:
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)


def file_identity(s: os.stat_result) -> tuple[int, int, int, int, int]:
    """What "the same file, unchanged" means: ctime moves on every write and utime cannot set it back."""
    return (s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)


class Signer:
    """Signs and checks capabilities with a per-server secret kept in the state directory."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    @classmethod
    def load(cls, state_dir: Path) -> Signer:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "capability.key"
        try:
            return cls(path.read_bytes())
        except FileNotFoundError:
            secret = secrets.token_bytes(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret)
            return cls(secret)

    def sign(self, body: CapabilityBody) -> bytes:
        raw = msgspec.msgpack.encode(body)
        return raw + hmac.new(self.secret, raw, hashlib.sha256).digest()

    def check(self, token: bytes) -> CapabilityBody:
        raw, mac = token[:-32], token[-32:]
        if len(token) < 33 or not hmac.compare_digest(
            mac, hmac.new(self.secret, raw, hashlib.sha256).digest()
        ):
            raise TransferError(
                errno.EACCES, "capability refused: not signed by this server", FailureCode.CAPABILITY_REFUSED
            )
        body = msgspec.msgpack.decode(raw, type=CapabilityBody)
        if body.expires < time.time():
            raise TransferError(errno.EACCES, "capability refused: expired", FailureCode.CAPABILITY_EXPIRED)
        return body


def refused(why: str) -> TransferError:
    return TransferError(errno.EACCES, f"capability refused: {why}", FailureCode.CAPABILITY_REFUSED)


class UsedUp(TransferError):
    """A data connection for a capability whose transfer has ended.

    Refused like any other, but also what a transfer's own last streams meet when the first
    ones already fetched every block: the listener does not warn about it.
    """

    def __init__(self) -> None:
        super().__init__(
            errno.EACCES,
            "capability refused: used up (a capability serves one transfer)",
            FailureCode.CAPABILITY_REFUSED,
        )


FORGET_AFTER = 60.0  # seconds past expiry an issued capability is still known (to say "expired")


@dataclass
class Issued:
    """A capability this server issued, and what became of it."""

    body: CapabilityBody
    token: bytes
    secret: bytes
    destination: str | None = None  # bound by the first data connection or push
    streams: int = 0  # data connections the bound transfer opens in all
    opened: int = 0
    live: int = 0
    ended: bool = False
    throttle: Throttle | None = None  # the bandwidth limits its streams answer to (None: none)


class CapabilityTable:
    """Issues capabilities and admits each data connection against what was issued (thread-safe)."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self._by_key: dict[bytes, Issued] = {}
        self._lock = threading.Lock()

    def issue(self, body: CapabilityBody) -> Issued:
        token = self.signer.sign(body)
        secret = self._secret_of(token)
        issued = Issued(body, token, secret)
        now = time.time()
        with self._lock:
            for kid in [k for k, i in self._by_key.items() if i.body.expires + FORGET_AFTER < now]:
                del self._by_key[kid]
            self._by_key[d.key_id(secret)] = issued
        return issued

    def secret_for(self, kid: bytes) -> bytes | None:
        with self._lock:
            issued = self._by_key.get(kid)
        return issued.secret if issued is not None else None

    def _check(self, kid: bytes, token: bytes) -> Issued:
        issued = self._by_key.get(kid)
        if issued is None or not hmac.compare_digest(issued.token, token):
            raise refused("not issued by this server")
        self.signer.check(token)  # signature and expiry
        if issued.ended:
            raise UsedUp()
        return issued

    def admit(self, kid: bytes, hello: d.DataHello) -> Issued:
        """A pull connection of ``hello``'s transfer: bound, counted, or refused."""
        with self._lock:
            issued = self._check(kid, hello.token)
            if hello.transfer_id != issued.body.transfer_id:
                raise refused("issued for another transfer")
            if issued.destination is None:
                issued.destination = f"pull:{hello.destination}"
                issued.streams = max(1, hello.streams)
            elif issued.destination != f"pull:{hello.destination}":
                raise refused("bound to another destination")
            if issued.opened >= issued.streams:
                raise refused("its transfer has all its data connections")
            issued.opened += 1
            issued.live += 1
            return issued

    def claim_push(self, token: bytes, destination: str, streams: int) -> Issued:
        """A TransferPush: binds the capability to the destination's data port, once."""
        with self._lock:
            issued = self._check(d.key_id(self._secret_of(token)), token)
            if issued.destination is not None:
                raise refused("already bound to a transfer")
            issued.destination, issued.streams = f"push:{destination}", streams
            issued.opened = issued.live = streams
            if streams == 0:
                issued.ended = True
            return issued

    def _secret_of(self, token: bytes) -> bytes:
        # Derived, not stored: the key id of a token presented to TransferPush finds its entry.
        return hmac.new(self.signer.secret, b"etfs-capability-secret\0" + token, hashlib.sha256).digest()

    def release(self, issued: Issued, ended: bool) -> None:
        """One data connection is over; ``ended``: its transfer said it has every block.

        Used up when the transfer says so, or when every connection it announced has come
        and gone (a failed transfer opens no new ones).
        """
        with self._lock:
            issued.live -= 1
            if ended or (issued.live <= 0 and issued.opened >= issued.streams):
                issued.ended = True
