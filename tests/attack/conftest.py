"""Fixtures of the attack suite: real servers with the review's layout (see `harness`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import AttackServer, attack_server


@pytest.fixture(scope="module")
def shared_server() -> Iterator[AttackServer]:
    """One server per module, for attacks that leave it usable (each test uses its own names)."""
    with attack_server() as srv:
        yield srv


@pytest.fixture
def fresh_server() -> Iterator[AttackServer]:
    """A server of its own, for attacks that may wreck it (memory, threads, handles)."""
    with attack_server() as srv:
        yield srv
