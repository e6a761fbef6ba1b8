"""Challenge-response authentication: HMAC-SHA256 over both nonces, no secret on the wire.

The client sends a fresh nonce in `Hello`; the server answers with its own fresh
nonce in `Challenge`.  The client proves it holds the user's key with
``HMAC(key, "etfs-client" | server nonce | client nonce | user | export)`` and the
server proves the same with the ``"etfs-server"`` label in `Welcome` (mutual
authentication).  A recorded proof is useless later because the server's nonce
differs on every connection.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

NONCE_BYTES = 32
MIN_KEY_BYTES = 16


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def _mac(key: bytes, label: bytes, first: bytes, second: bytes, user: str, export: str) -> bytes:
    msg = b"\0".join([label, first, second, user.encode(), export.encode()])
    return hmac.new(key, msg, hashlib.sha256).digest()


def client_proof(key: bytes, server_nonce: bytes, client_nonce: bytes, user: str, export: str) -> bytes:
    return _mac(key, b"etfs-client", server_nonce, client_nonce, user, export)


def server_proof(key: bytes, server_nonce: bytes, client_nonce: bytes, user: str, export: str) -> bytes:
    return _mac(key, b"etfs-server", client_nonce, server_nonce, user, export)


def verify(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


class AuthKeyError(ValueError):
    """A key file is missing, unreadable or too short."""


def load_key(path: str | Path) -> bytes:
    """Read a key file: its stripped contents (any text or bytes, at least 16 bytes).

    Refused, as ssh refuses a private key, when others may read or write it: a key file of
    ours with any group or other bits, or anyone's with other bits (every local user could
    then read it, and log in as its user).  Group bits on someone else's file are a choice
    (a key shared with the group the server runs in).
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read().strip()
    except OSError as exc:
        raise AuthKeyError(f"cannot read key file {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007 or (st.st_uid == os.geteuid() and mode & 0o070):
        raise AuthKeyError(
            f"key file {path} is accessible by {'others' if mode & 0o007 else 'its group'} "
            f"(mode {mode:04o}); a key must be private: chmod 600 {path}"
        )
    if len(data) < MIN_KEY_BYTES:
        raise AuthKeyError(f"key file {path} holds {len(data)} bytes; at least {MIN_KEY_BYTES} are needed")
    return data


def generate_key_text() -> str:
    """A new random key, as text suitable for a key file."""
    return os.urandom(32).hex() + "\n"
