"""`etfs.common.ratelimit`: rates as written on command lines and in YAML, and the token bucket's
arithmetic (with a fake clock: the real-clock checks are in `test_bwlimit.py`)."""

from __future__ import annotations

import threading

import pytest

from etfs.common.ratelimit import (
    MAX_PIECE,
    MIN_PIECE,
    RateError,
    Throttle,
    TokenBucket,
    format_rate,
    parse_rate,
    piece_size,
    throttle_of,
)

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("50M", 50 * MIB),
        ("1.5G", int(1.5 * GIB)),
        ("500k", 500 * KIB),
        ("500K", 500 * KIB),
        ("250", 250 * KIB),  # a bare number is KiB/s, as rsync and rclone read it
        (250, 250 * KIB),  # (a YAML integer too)
        ("10MiB/s", 10 * MIB),
        ("10Mi", 10 * MIB),
        ("8M/s", 8 * MIB),
        ("1GB", 10**9),  # KB/MB/GB: powers of 1000, as rsync reads them
        ("100KB", 100_000),
        ("100Mbit", 100 * 10**6 // 8),  # bits: network units, powers of 1000
        ("1Gbps", 10**9 // 8),
        ("65536B", 65536),
        (" 2M ", 2 * MIB),
        ("0", 0),
        ("0M", 0),
        ("off", 0),
    ],
)
def test_parse_rate(text: str | int, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("fast", "expected a number"),
        ("-5M", "expected a number"),
        ("5X", "unknown unit"),
        ("50Mb", "unknown unit"),  # bits or bytes? refused rather than guessed
        ("1k", "below the smallest limit"),
        ("100B", "below the smallest limit"),
        ("", "expected a number"),
    ],
)
def test_parse_rate_refuses(text: str, problem: str) -> None:
    with pytest.raises(RateError) as exc:
        parse_rate(text)
    assert problem in str(exc.value) and "\n" not in str(exc.value)


def test_format_rate() -> None:
    assert format_rate(0) == "unlimited"
    assert format_rate(8 * MIB) == "8 MiB/s"
    assert format_rate(1536) == "1.5 KiB/s"
    assert format_rate(100) == "100 B/s"


def test_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    b = TokenBucket(1000 * KIB, clock=clock)
    assert b.burst == pytest.approx(100 * KIB)  # 0.1 s worth
    assert b.reserve(100 * KIB) == 0.0  # a full bucket lets one burst through at once
    # Empty now: the next 50 KiB wait until they are earned.
    assert b.reserve(50 * KIB) == pytest.approx(0.05)
    clock.now += 0.05
    assert b.reserve(0) == pytest.approx(0.0)
    # Debt: a piece larger than the burst passes, later.
    assert b.reserve(300 * KIB) == pytest.approx(0.3)


def test_bucket_refills_only_up_to_the_burst() -> None:
    clock = FakeClock()
    b = TokenBucket(1000, burst=500, clock=clock)
    b.reserve(500)
    clock.now += 3600  # an idle hour earns no more than one burst
    assert b.reserve(500) == 0.0
    assert b.reserve(1000) == pytest.approx(1.0)


def test_bucket_long_run_rate_is_exact() -> None:
    """A sender that waits what it is told sends at the rate (plus one burst)."""
    clock = FakeClock()
    rate = 8 * MIB
    b = TokenBucket(rate, clock=clock)
    start, sent = clock.now, 0
    for _ in range(1000):
        clock.now += b.reserve(64 * KIB)
        sent += 64 * KIB
    assert (sent - b.burst) / (clock.now - start) == pytest.approx(rate, rel=1e-6)


def test_bucket_set_rate() -> None:
    clock = FakeClock()
    b = TokenBucket(1000, clock=clock)
    b.reserve(100)
    b.set_rate(2000)
    assert b.rate == 2000 and b.burst == 200
    assert b.reserve(400) == pytest.approx(0.2)


def test_bucket_is_thread_safe() -> None:
    """Concurrent reservations are all counted: with the clock stopped the debt is their sum."""
    clock = FakeClock()
    b = TokenBucket(1000, burst=1000, clock=clock)
    waits: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [b.reserve(10) for _ in range(2000)]
        with lock:
            waits.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(waits) == pytest.approx((8 * 2000 * 10 - 1000) / 1000)
    assert len({round(w, 9) for w in waits if w > 0}) == 8 * 2000 - 100  # every wait distinct


def test_bucket_refuses_no_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_throttle_waits_for_the_slowest_bucket() -> None:
    clock = FakeClock()
    slept: list[float] = []
    fast = TokenBucket(10 * MIB, burst=0, clock=clock)
    slow = TokenBucket(1 * MIB, burst=0, clock=clock)
    th = Throttle([fast, slow], sleep=slept.append)
    th.take(MIB)
    assert slept == [pytest.approx(1.0)]
    # Both buckets paid: the fast one is in debt for its share too.
    assert fast.reserve(0) == pytest.approx(0.1)
    assert th.piece == piece_size(1 * MIB)


def test_no_throttle_without_limits() -> None:
    assert throttle_of([None, None]) is None
    b = TokenBucket(MIB)
    th = throttle_of([None, b])
    assert th is not None and th.buckets == (b,)


def test_piece_size_bounds() -> None:
    assert piece_size(8 * KIB) == MIN_PIECE
    assert piece_size(8 * MIB) == int(8 * MIB * 0.05)
    assert piece_size(10 * GIB) == MAX_PIECE
