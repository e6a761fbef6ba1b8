"""Capabilities: a source server's signed permission to read one file for one transfer.

The token is the msgpack of a `CapabilityBody` followed by its HMAC-SHA256 under a
per-server secret kept in the state directory; only the issuing server can check it.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

import msgspec

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
