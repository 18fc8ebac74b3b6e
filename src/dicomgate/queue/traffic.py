"""Traffic control of one destination: schedule windows, rate limit, circuit breaker.

Pure logic with an injectable clock, used by the delivery workers (egress/dispatcher.py)
and unit-tested on its own.

- :class:`Schedule`: when a destination may be sent to, e.g. ``"Mon-Fri 20:00-06:00"``
  (a window may run past midnight; it then belongs to the day it starts on).
- :class:`RateLimiter`: instances per second and bytes per second, as a virtual clock
  (GCRA): each send books ``n / rate`` seconds; a caller waits until its booking starts.
  Up to one second of unused rate is saved up, so the long-run rate is exact and short
  bursts are smooth.
- :class:`Breaker`: closed -> open after N consecutive failed batches -> one probe after
  the cool-down -> closed on success, open again on failure.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME_RE = re.compile(r"^([01]?\d|2[0-4]):([0-5]\d)$")
_BURST_SECONDS = 1.0

__all__ = ["Breaker", "RateLimiter", "Schedule", "Window", "parse_schedule"]


@dataclass(frozen=True)
class Window:
    """Open on ``days`` (0 = Monday) from ``start`` to ``end`` minutes after midnight.

    ``end <= start`` runs past midnight into the next day.
    """

    days: frozenset[int]
    start: int
    end: int

    def contains(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return (day in self.days and minute >= self.start) or (
            (day - 1) % 7 in self.days and minute < self.end
        )


_DAY_NAMES = {name: i for i, name in enumerate(DAYS)} | {
    name: i
    for i, name in enumerate(
        ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
    )
}


def _day(text: str, whole: str) -> int:
    try:
        return _DAY_NAMES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{whole!r} is not a day or day range (e.g. Mon-Fri, Sat,Sun)") from None


def _parse_days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.split(","):
        first, sep, last = part.partition("-")
        day, end = _day(first, part), _day(last, part) if sep else None
        days.add(day)
        while end is not None and day != end:  # Fri-Mon wraps over the week-end
            day = (day + 1) % 7
            days.add(day)
    return frozenset(days)


def _parse_time(text: str) -> int:
    found = _TIME_RE.match(text.strip())
    if not found:
        raise ValueError(f"{text.strip()!r} is not a time of day (HH:MM, 00:00-24:00)")
    minute = int(found[1]) * 60 + int(found[2])
    if minute > 24 * 60:
        raise ValueError(f"{text.strip()!r} is past 24:00")
    return minute


def parse_window(text: str) -> Window:
    """``"20:00-06:00"``, ``"Mon-Fri 19:00-07:00"``, ``"Sat,Sun"`` (whole days)."""
    spec = " ".join(text.split())
    if not spec:
        raise ValueError("an empty schedule window")
    days_text, _, times = spec.rpartition(" ") if " " in spec else ("", "", spec)
    if ":" not in times:  # days only: the whole day
        return Window(_parse_days(spec), 0, 24 * 60)
    days = _parse_days(days_text) if days_text else frozenset(range(7))
    start_text, sep, end_text = times.partition("-")
    if not sep:
        raise ValueError(f"{times!r}: write a window as HH:MM-HH:MM")
    start, end = _parse_time(start_text), _parse_time(end_text)
    if start == 24 * 60:
        raise ValueError(f"{times!r}: a window cannot start at 24:00")
    if start == end:
        raise ValueError(f"{times!r}: the window is empty (use 00:00-24:00 for a whole day)")
    return Window(days, start, end)


def parse_schedule(value: str | Sequence[str] | None) -> list[Window]:
    """The windows of a ``schedule`` setting; [] means always open."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [parse_window(item) for item in items]


class Schedule:
    """Whether a destination may be sent to now, and how long until that changes."""

    def __init__(
        self,
        windows: Sequence[Window],
        tz: tzinfo | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.windows = list(windows)
        self._tz = tz
        self._clock = clock or (lambda: datetime.now(self._tz).astimezone(self._tz))

    @property
    def always(self) -> bool:
        return not self.windows

    def is_open(self, when: datetime | None = None) -> bool:
        if not self.windows:
            return True
        when = when or self._clock()
        return any(w.contains(when) for w in self.windows)

    def seconds_until_open(self, when: datetime | None = None) -> float:
        """0 when open now; else seconds to the next opening (looked up minute by minute,
        at most a week ahead)."""
        when = when or self._clock()
        if self.is_open(when):
            return 0.0
        probe = when.replace(second=0, microsecond=0)
        for _ in range(7 * 24 * 60 + 1):
            probe += timedelta(minutes=1)
            if self.is_open(probe):
                return max(0.0, (probe - when).total_seconds())
        return 7 * 86400.0  # unreachable for a valid window list


class RateLimiter:
    """Books sends against instances/s and bytes/s limits (either may be ``None``)."""

    def __init__(
        self,
        instances_per_second: float | None,
        bytes_per_second: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instances_per_second = instances_per_second
        self.bytes_per_second = bytes_per_second
        self._clock = clock
        self._next = 0.0  # virtual time at which the next booking may start

    @property
    def limited(self) -> bool:
        return self.instances_per_second is not None or self.bytes_per_second is not None

    def batch_size(self, default: int) -> int:
        """A lease size that keeps one booking near one second of the instance rate."""
        if self.instances_per_second is None:
            return default
        return max(1, min(default, int(self.instances_per_second)))

    def ready_in(self) -> float:
        """Seconds until a new booking could start without waiting (0: now)."""
        if not self.limited:
            return 0.0
        return max(0.0, self._next - self._clock())

    def book(self, instances: int, size: int) -> float:
        """Book a send; returns the seconds to wait before it may start."""
        if not self.limited:
            return 0.0
        cost = 0.0
        if self.instances_per_second is not None:
            cost = max(cost, instances / self.instances_per_second)
        if self.bytes_per_second is not None:
            cost = max(cost, size / self.bytes_per_second)
        now = self._clock()
        start = max(self._next, now - _BURST_SECONDS)
        self._next = start + cost
        return max(0.0, start - now)


class Breaker:
    """Circuit breaker of one destination; ``failures == 0`` disables it."""

    def __init__(
        self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._clock = clock
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.threshold > 0 and self.failures >= self.threshold

    def allow(self) -> int | None:
        """How many jobs may be leased now: None = a full batch, 0 = none, 1 = a probe."""
        if not self.is_open:
            return None
        if self._clock() < self.open_until or self.probing:
            return 0
        self.probing = True
        return 1

    def release_probe(self) -> None:
        """The probe found nothing to send."""
        self.probing = False

    def record(self, success: bool) -> bool:
        """Record a batch's result; True when this result opened the breaker."""
        self.probing = False
        if success:
            self.failures = 0
            return False
        self.failures += 1
        if self.is_open:
            self.open_until = self._clock() + self.cooldown
            return self.failures == self.threshold
        return False
