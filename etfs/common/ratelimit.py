"""Bandwidth limits: rates as people write them (`parse_rate`) and the token bucket that
enforces them on data connections (`TokenBucket`, `Throttle`).

Units follow rsync's and rclone's ``--bwlimit``: a bare number is KiB/s (1024 bytes per
second); ``K``/``M``/``G``/``T`` (also ``Ki``, ``KiB``...) are powers of 1024 bytes, ``KB``/
``MB``/``GB``/``TB`` powers of 1000 bytes (as rsync reads them), ``B`` is bytes, and
``bit``/``bps`` suffixes (``100Mbit``, ``1Gbps``) are bits, powers of 1000, divided by 8.
A trailing ``/s`` is allowed; ``0`` or ``off`` means no limit.

The bucket is pure logic over an injectable monotonic clock: `TokenBucket.reserve` takes
bytes and answers how long the caller must wait before sending them (it may go into
debt, so a piece larger than the burst still passes, just later).  The data path sleeps
outside the bucket's lock; nothing here runs at all when no limit is set.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

KIB = 1024
# Rates below this would make a data connection wait longer than its timeout between pieces.
MIN_RATE = 8 * KIB
# At most this much may go out at once after an idle spell (and the piece a sender sends
# between two looks at the bucket is about half of it): bursts stay ~0.1 s of the rate.
BURST_SECONDS = 0.1
MIN_PIECE = 1024
MAX_PIECE = 1 << 20

_RATE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<prefix>[kmgtKMGT]?)(?P<unit>[A-Za-z]*)(?:/s)?")
_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


class RateError(ValueError):
    """A rate that cannot be read; ``str()`` says what was wrong and what is accepted."""


def parse_rate(text: str | int) -> int:
    """Bytes per second from ``50M``, ``1.5G``, ``500k``, ``100Mbit``, ``250`` (KiB/s); 0: no limit."""
    raw = str(text).strip()
    if raw.lower() in ("0", "off", "none", "unlimited"):
        return 0
    m = _RATE.fullmatch(raw)
    if m is None:
        raise RateError(f"bad rate {raw!r}: expected a number with an optional unit, like 50M, 1.5G or 500k")
    num, prefix, unit = float(m["num"]), m["prefix"].lower(), m["unit"]
    power = _POWER[prefix]
    if unit.lower() in ("bit", "bits", "bps"):
        factor = 1000**power / 8  # network rates are decimal bits
    elif not prefix and not unit:
        factor = KIB  # a bare number: KiB/s, as rsync and rclone read it
    elif not prefix and unit == "B":
        factor = 1
    elif prefix and unit in ("", "i", "iB", "ib"):
        factor = KIB**power
    elif prefix and unit == "B":
        factor = 1000**power
    else:
        raise RateError(
            f"bad rate {raw!r}: unknown unit {m['prefix'] + unit!r} "
            "(use K/M/G = 1024-based bytes, KB/MB/GB = 1000-based bytes, Mbit = megabits)"
        )
    rate = int(num * factor)
    if rate == 0 and num == 0:
        return 0
    if rate < MIN_RATE:
        raise RateError(f"rate {raw!r} is below the smallest limit, {MIN_RATE // KIB} KiB/s")
    return rate


def format_rate(rate: int) -> str:
    """``8 MiB/s`` for 8388608; ``unlimited`` for 0."""
    if not rate:
        return "unlimited"
    value, unit = float(rate), "B/s"
    for unit in ("B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"):
        if value < 1024 or unit == "TiB/s":
            break
        value /= 1024
    return f"{value:.4g} {unit}"


def piece_size(rate: int) -> int:
    """How many bytes a limited sender sends between two looks at its buckets."""
    return max(MIN_PIECE, min(MAX_PIECE, int(rate * BURST_SECONDS / 2)))


class TokenBucket:
    """``rate`` bytes per second with bursts of at most ``burst`` bytes; thread-safe.

    Tokens refill continuously with the clock up to ``burst``; `reserve` takes its bytes at
    once, even into debt, and returns the seconds until that debt is paid: callers that
    wait that long before sending never exceed the rate by more than one burst.
    """

    def __init__(
        self, rate: int, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self._clock = clock
        self._lock = threading.Lock()
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, rate * BURST_SECONDS)
        self._tokens = self.burst
        self._last = clock()

    def set_rate(self, rate: int) -> None:
        """A new rate (the configuration changed) from now on; what was taken stays taken."""
        with self._lock:
            self._refill()
            self.rate = float(rate)
            self.burst = max(1.0, rate * BURST_SECONDS)
            self._tokens = min(self._tokens, self.burst)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes``; seconds to wait before sending them (0.0: send now)."""
        with self._lock:
            self._refill()
            self._tokens -= nbytes
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Throttle:
    """The buckets one sender answers to (its transfer's, its server pair's, its server's).

    `take` reserves from every bucket and sleeps for the longest wait, so each bucket's
    rate holds on its own.  A sender with no limit has no Throttle at all.
    """

    def __init__(self, buckets: Sequence[TokenBucket], sleep: Callable[[float], None] = time.sleep) -> None:
        if not buckets:
            raise ValueError("a throttle needs at least one bucket")
        self.buckets = tuple(buckets)
        self._sleep = sleep
        self.piece = piece_size(int(min(b.rate for b in self.buckets)))

    def delay(self, nbytes: int) -> float:
        return max(b.reserve(nbytes) for b in self.buckets)

    def take(self, nbytes: int) -> None:
        wait = self.delay(nbytes)
        if wait > 0:
            self._sleep(wait)


def throttle_of(buckets: Sequence[TokenBucket | None]) -> Throttle | None:
    """A `Throttle` over the buckets that are set, or None when no limit applies."""
    present = [b for b in buckets if b is not None]
    return Throttle(present) if present else None
