"""The privilege model: which local account a user's file operations run as.

Every etfs user maps to a local account (``run_as`` in server.yaml, per user or for all),
the way GridFTP maps a certificate to a local user or an NFS server squashes root.  The
server performs each of that user's file operations with the account's *filesystem*
identity: fsuid, fsgid and supplementary groups, set per thread (`as_account`), so the
kernel's own permission checks apply beneath the ACL.  Leaving fsuid 0 also drops the
thread's filesystem capabilities, so a server started as root acting for ``bob`` has
exactly bob's powers over files; other threads (other users' requests, the server's own
state files) are not affected.

A server that is not root cannot switch identities: every account must then be its own.
A root server without a mapping refuses to start (`check_mapping`).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from etfs import _sendfile_cffi as native

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Account:
    """A local account: the filesystem identity a user's operations run with."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def lookup_account(spec: str | int) -> Account:
    """An account by name or numeric uid (its primary group and group list from the system).

    A uid without a passwd entry is accepted (its gid is then the same number, no groups),
    as containers often have no names for service uids.  Raises `KeyError` when a name is unknown.
    """
    text = str(spec)
    try:
        pw = pwd.getpwnam(text) if not text.isdigit() else pwd.getpwuid(int(text))
    except KeyError:
        if not text.isdigit():
            raise KeyError(f"no local account named {text!r}") from None
        uid = int(text)
        return Account(text, uid, uid, ())
    groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
    return Account(pw.pw_name, pw.pw_uid, pw.pw_gid, groups)


def own_account() -> Account:
    """The account the server process itself runs as."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return Account(name, uid, os.getegid(), tuple(sorted(set(os.getgroups()))))


def group_id(name: str) -> int:
    """A group's gid by name or number; raises `KeyError`."""
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


_SELF = own_account()
_current = threading.local()


def can_switch() -> bool:
    """Whether this process may take other filesystem identities (it runs as root)."""
    return _SELF.uid == 0


@contextmanager
def as_account(account: Account | None) -> Iterator[None]:
    """Run the body with ``account``'s filesystem identity on this thread, then restore it.

    A no-op for None or the server's own account; nesting restores the outer identity.
    """
    previous: Account | None = getattr(_current, "account", None)
    if account is None or account == (previous or _SELF):
        yield
        return
    native.set_fs_identity(account.uid, account.gid, account.groups)
    _current.account = account
    try:
        yield
    finally:
        back = previous or _SELF
        _current.account = previous
        native.set_fs_identity(back.uid, back.gid, back.groups)
