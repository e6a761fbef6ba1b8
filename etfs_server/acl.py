"""Access control: per export, rules of (user or @group) x path prefix x rights; default deny.

A request is allowed when any rule whose subject matches the user and whose path
is the request's path or one of its parents grants the right.  Denials are logged
with user, path and right, and surface to the client as EACCES.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


class Right(enum.Enum):
    READ = "read"
    WRITE = "write"
    LIST = "list"
    DELETE = "delete"
    TRANSFER_OUT = "transfer-out"
    TRANSFER_IN = "transfer-in"


ALL_RIGHTS = frozenset(Right)


@dataclass(frozen=True)
class Rule:
    who: str  # a user name, "@group" or "*"
    prefix: str  # export-relative, starts with "/"
    rights: frozenset[Right]

    def names(self, user: str, groups: frozenset[str]) -> bool:
        """Whether the rule's subject is this user."""
        return self.who in ("*", user) or (self.who.startswith("@") and self.who[1:] in groups)

    def applies(self, user: str, groups: frozenset[str], path: str) -> bool:
        if not self.names(user, groups):
            return False
        return self.prefix == "/" or path == self.prefix or path.startswith(self.prefix + "/")


class AccessDenied(PermissionError):
    def __init__(self, user: str, path: str, right: Right) -> None:
        super().__init__(13, f"permission denied: user {user!r} lacks {right.value!r} on {path}")
        self.user, self.path, self.right = user, path, right


class ACL:
    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def rights(self, user: str, groups: frozenset[str], path: str) -> frozenset[Right]:
        granted: set[Right] = set()
        for rule in self.rules:
            if rule.applies(user, groups, path):
                granted |= rule.rights
        return frozenset(granted)

    def check(self, user: str, groups: frozenset[str], path: str, right: Right) -> None:
        if right not in self.rights(user, groups, path):
            log.warning("denied: user=%s path=%s right=%s", user, path, right.value)
            raise AccessDenied(user, path, right)

    def visible(self, user: str, groups: frozenset[str], path: str) -> bool:
        """May the user learn that ``path`` exists (stat/lookup)?

        Yes with any right on it, with `list` on its parent, or when a rule grants
        something beneath it (so `/tmp` is reachable from a root the user cannot list).
        """
        if self.rights(user, groups, path):
            return True
        parent = path.rsplit("/", 1)[0] or "/"
        if Right.LIST in self.rights(user, groups, parent):
            return True
        return self.rules_beneath(user, groups, path)

    def rules_beneath(self, user: str, groups: frozenset[str], path: str) -> bool:
        """Whether a rule for this user starts strictly beneath ``path``.

        Then the things inside ``path`` do not all have the rights ``path`` has, and moving
        ``path`` elsewhere would change them: renames of such a directory are refused.
        """
        return any(r.prefix.startswith(path.rstrip("/") + "/") and r.names(user, groups) for r in self.rules)
