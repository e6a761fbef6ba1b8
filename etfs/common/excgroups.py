"""Looking inside the exception groups trio's nurseries raise.

A failure in a nursery comes out wrapped (possibly several levels deep); callers usually want
to know whether a group holds only one kind of error, or the first error of a kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions in ``exc`` that are not groups, depth first (``exc`` itself if not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


def only(exc: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """True if every exception in ``exc`` is one of ``kinds``."""
    return all(isinstance(leaf, kinds) for leaf in leaves(exc))


def first(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of ``kind`` in ``exc``, or None."""
    for leaf in leaves(exc):
        if isinstance(leaf, kind):
            return leaf
    return None


@contextlib.contextmanager
def single_errors() -> Iterator[None]:
    """Turn a nursery's group holding an OSError into that OSError (the first one).

    Groups of only Cancelled (or other BaseExceptions) pass unchanged, so cancellation keeps
    working; callers that handle OSError see one, not a group.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        err = first(group, OSError)
        if err is None:
            raise
        raise err from None
